"""Loading a tokenizer and causal LM, and choosing the device and numeric precision."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medlm._paths import looks_like_local_path
from medlm.errors import MedLMError, first_line
from medlm.hub import HubUnavailable, check_hub, model_in_cache
from medlm.offline import cache_dir, known_bases, resolve_base_name
from medlm.prompts import ensure_pad_token

log = logging.getLogger(__name__)


def load_tokenizer_and_model(name_or_path: str):
    """A Hub id, an offline base name (``medlm.offline.OFFLINE_BASES``), a ``save_pretrained``
    directory or a GGUF file -> (tokenizer, model in fp32).

    Weights stay fp32 whatever the checkpoint's dtype (a GGUF file is de-quantized): mixed
    precision is autocast, so the optimizer always updates fp32 master weights. A missing pad
    token becomes end-of-text. ``trust_remote_code`` is never turned on: a model whose
    architecture transformers has built in loads as that (code its config names is ignored),
    one that needs its own code is refused; weights load from safetensors only, never from a
    pickle (``pytorch_model.bin``).
    """

    base = resolve_base_name(name_or_path)
    path = str(base) if base else os.path.expanduser(name_or_path)
    is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
    if not (os.path.isdir(path) or is_gguf) and looks_like_local_path(name_or_path):
        raise MedLMError(f"model {name_or_path!r} not found: expected a Hub model id, an "
                         f"offline base ({known_bases()}), a directory saved with "
                         "save_pretrained, or a .gguf file")
    local = os.path.isdir(path) or is_gguf
    offline = None if local else check_hub()
    # An absolute path keeps name_or_path from being mistaken for a Hub id later (MLflow looks
    # up model cards and licenses by it).
    if is_gguf:
        cached = dequantized_cache(path)
        if (loaded := _read_dequantized(cached)) is not None:
            return loaded
        source = os.path.dirname(os.path.abspath(path))
        extra = {"gguf_file": os.path.basename(path)}
        log.info("de-quantizing %s (GGUF) to fp32, once: later runs read %s", name_or_path,
                 cached)
    else:
        source = os.path.abspath(path) if local else name_or_path
        extra = {}
        if not local and not offline:
            log.info("loading model %s from the Hugging Face Hub (or its local cache)", source)
    tokenizer, model = _from_pretrained(name_or_path, source, extra, offline,
                                        "GGUF file" if is_gguf else "directory" if local
                                        else "Hub id")
    if offline:
        log.info("model %s: from the local Hugging Face cache (the Hub is not reachable: %s)",
                 name_or_path, offline)
    if is_gguf:
        _forget_gguf_quantization(model)
        _save_dequantized(tokenizer, model, cached)
    return ensure_pad_token(tokenizer, model)


def _read_dequantized(cached: Path):
    """(tokenizer, model) of a GGUF file de-quantized before (a plain fp32 model, read in a
    second); None where there is none, or it is damaged in any way (then it is converted
    again)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not cached.is_dir():
        return None
    try:
        return ensure_pad_token(
            AutoTokenizer.from_pretrained(str(cached), trust_remote_code=False),
            AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32,
                                                 trust_remote_code=False, use_safetensors=True))
    except Exception as error:  # noqa: BLE001 - damaged in any way: convert again
        log.warning("the de-quantized copy in %s is unreadable (%s): converting the GGUF file "
                    "again", cached, first_line(error))
        shutil.rmtree(cached, ignore_errors=True)
        return None


def _from_pretrained(name_or_path: str, source: str, extra: dict, offline: str | None,
                     where: str):
    """transformers' tokenizer and fp32 model from ``source``; a failure is one line naming
    ``name_or_path`` (``where``: what kind of source it is), or ``HubUnavailable`` offline.

    No code that comes with a model runs (``trust_remote_code=False``: transformers would
    otherwise ask on stdin, and a ``y`` imports the directory's Python), and no pickle is
    unpickled (``use_safetensors``; a GGUF file is its own format)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = extra if "gguf_file" in extra else {**extra, "use_safetensors": True}
    try:
        return (AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra),
                AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                     trust_remote_code=False, **weights))
    except (OSError, ValueError, KeyError, ImportError) as error:
        if "trust_remote_code" in str(error):
            raise MedLMError(f"model {name_or_path!r} needs the Python code that comes with it "
                             "(its config's auto_map names an architecture transformers does "
                             "not have), and MedLM never runs a model's own code: expected a "
                             "model of an architecture built into transformers (GPT-2, Llama, "
                             "...)") from None
        pickles = _pickled_weights(source) if where == "directory" else []
        if pickles:
            raise MedLMError(f"model {name_or_path!r} holds its weights only as a pickle "
                             f"({', '.join(pickles)}), which MedLM does not load (unpickling can "
                             "run code): expected model.safetensors: re-save the model with "
                             "save_pretrained (safetensors is its default)") from None
        reason = first_line(error)
        if offline:
            cached = model_in_cache(name_or_path)  # then the reason is worth naming
            raise HubUnavailable("model", name_or_path, offline, reason if cached else "") from None
        hint = "" if where != "Hub id" else f" (no Hub access? an offline base: {known_bases()})"
        raise MedLMError(f"could not load model {name_or_path!r} ({where}: {reason[:200]}): "
                         "expected a causal LM Hub id, save_pretrained directory or .gguf "
                         f"file{hint}") from None


def _pickled_weights(directory: str) -> list[str]:
    """The pickled weight files of a directory that holds no safetensors ones."""
    names = sorted(path.name for path in Path(directory).iterdir() if path.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return []
    return [name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]


def dequantized_cache(gguf_path: str) -> Path:
    """Where a GGUF file's de-quantized model is kept (parsing a GGUF file and de-quantizing
    it takes ~17 s for SmolLM2-135M; reading the result back, ~0.2 s): one directory per file,
    keyed by its real path, size, modification time, the transformers and gguf versions that
    converted it and MedLM's own conversion (``DEQUANTIZED_FORMAT``), under
    ``$MEDLM_CACHE/dequantized``."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    import transformers


    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = ""
    stat = os.stat(gguf_path)
    # the file itself, however reached: a cache directory that links to another one's bases
    # (the tests' and benchmarks' own caches do) finds the same copy
    key = "|".join(map(str, (os.path.realpath(gguf_path), stat.st_size, stat.st_mtime_ns,
                             transformers.__version__, gguf_version, DEQUANTIZED_FORMAT)))
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "dequantized" / f"{Path(gguf_path).stem}-{digest}"


DEQUANTIZED_FORMAT = 1  # bump when what _save_dequantized writes changes


def _save_dequantized(tokenizer, model, target: Path) -> None:
    """Written beside, then renamed in one step: a kill leaves no half-written model to load
    (and its leftover is removed by a later save). A cache that cannot be written (read-only,
    full) only costs the next run the conversion; another process (a torchrun rank) that
    wrote it first is as good."""
    import shutil
    import tempfile
    import time

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*"):  # a killed save's, not a live one
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(str(partial))
            tokenizer.save_pretrained(str(partial))
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except Exception as error:  # noqa: BLE001 - OSError, SafetensorError, ...: only a cache
        if not target.is_dir():
            log.warning("could not keep the de-quantized model in %s (%s): the next run "
                        "converts the GGUF file again", target, first_line(error))


def _forget_gguf_quantization(model) -> None:
    """A GGUF checkpoint is fully de-quantized to fp32 on load, yet transformers keeps marking
    the model as quantized, which makes ``save_pretrained`` refuse it. It is a plain model now."""
    model.hf_quantizer = None
    for attribute in ("is_quantized", "quantization_method"):
        if hasattr(model, attribute):
            setattr(model, attribute, False if attribute == "is_quantized" else None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def tokenizer_sha256(tokenizer) -> str:
    """Fingerprint of what a tokenizer turns text into (vocabulary and end-of-text token):
    losses are comparable across runs only when it is the same."""
    import hashlib
    import json

    content = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def context_size(model) -> int | None:
    """Longest sequence the model's position embeddings allow, when the config says."""
    config = model.config
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_max_length(requested: int | None, model) -> int | None:
    """``--max-length``, defaulting to and bounded by the model's context size."""
    context = context_size(model)
    if requested is None:
        return context
    if context is not None and requested > context:
        raise MedLMError(f"--max-length {requested} exceeds the model's context size: expected "
                         f"at most {context}")
    return requested


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for one that is absent is an error."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
           "cpu": True}
    if requested == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if has[kind]))
    if requested not in has:
        raise MedLMError(f"--device {requested!r} is invalid: expected auto, cuda, mps or cpu")
    if not has[requested]:
        raise MedLMError(f"--device {requested} is not available on this machine: "
                         "expected auto or cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: fp32, or autocast to bf16/fp16 over fp32 weights."""

    name: str  # fp32 | bf16 | fp16
    device: torch.device  # where it runs (a str is made a torch.device)

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def answer_autocast(self):
        """The autocast answers are written under (scored answers, samples, evaluate): bf16's
        (2.1x faster than fp32 for distilgpt2 on an AVX512-BF16 CPU); fp16 (older GPUs)
        decodes in fp32, where an overflow cannot stop a run after its checkpoint."""
        return self.autocast() if self.name == "bf16" else contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


@functools.cache
def peak_flops(precision: Precision) -> float:
    """The device's matmul throughput in ``precision`` (FLOP/s), measured once per process: what
    the model FLOPs utilisation (MFU) is against. nanoGPT divides by the A100's datasheet
    figure; a measured peak also holds for any CPU and for a GPU no table lists."""
    size = 4096 if precision.device_type == "cuda" else 1024
    dtype = precision.autocast_dtype or torch.float32
    # not torch.randn: the run's random stream (dropout, shuffles) must not depend on whether
    # the peak was measured yet in this process
    left = right = torch.full((size, size), 0.5, device=precision.device, dtype=dtype)
    synchronize = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(
        precision.device_type, lambda: None)
    left @ right  # warm-up: kernels chosen, memory allocated
    synchronize()
    repeats = 10 if precision.device_type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        left @ right
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


@contextlib.contextmanager
def casts_cached(model, device: torch.device):
    """Under autocast, let frozen weights (LoRA's base) be cast once per call too: autocast
    caches the casts of leaf tensors that require grad only, so for the duration (under
    no_grad, which builds no graph) they are marked as requiring it."""
    frozen = ([parameter for parameter in model.parameters() if not parameter.requires_grad]
              if torch.is_autocast_enabled(device.type) else [])
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def cpu_kind() -> str:
    """The CPU features that decide MedLM's speed, for every reported figure: ``AVX512-BF16``
    (or ``AMX-BF16``: native bf16), else the vector ISA torch dispatches to (``AVX512``,
    ``AVX2``, ...), with ``no native bf16`` said out loud."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX-BF16"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return f"{torch.backends.cpu.get_cpu_capability()}, no native bf16"


def cpu_count() -> int:
    """Cores this process may use (its affinity: a container's limit), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else the platform's word for it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_supports_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated, slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cuda_supports_bf16() -> bool:
    """Native bf16 on the current GPU (compute capability 8.0+, Ampere and newer; ROCm). Not
    ``torch.cuda.is_bf16_supported()``'s default, which also counts emulation and so says yes on
    every CUDA GPU, T4/V100/P100 included, where bf16 has no tensor cores."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


# What emulated bf16 costs on a CPU without it (measured; see experiments/README.md, Precision).
CPU_EMULATED_BF16 = ("one distilgpt2 training step of 8x53 tokens took 187 s in bf16 autocast "
                     "against 4 s in fp32 on an AVX2-only AMD EPYC")


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """Pick the autocast dtype; ``auto`` picks what is fastest without hurting the loss.

    CUDA: bf16 where the GPU has it natively, else fp16 with a GradScaler. CPU: bf16 where the
    CPU has native bf16 (measured ~1.5x faster per epoch than fp32 for distilgpt2 on an
    AVX512-BF16 CPU, same validation loss; experiments/README.md, Precision), else fp32. MPS:
    fp32. The hardware is asked through torch's own queries, so tests patch those, not an argument.
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        bf16_ok = cuda_supports_bf16()
    elif device_type == "cpu":
        bf16_ok = cpu_supports_bf16()
    else:
        bf16_ok = False
    if requested == "auto":
        if device_type == "cuda":
            return Precision("bf16" if bf16_ok else "fp16", device)
        return Precision("bf16" if bf16_ok else "fp32", device)
    if requested == "fp16" and device_type != "cuda":
        raise MedLMError(f"--precision fp16 is not supported on {device_type}: expected auto, "
                         "fp32 or bf16 (fp16 autocast needs a CUDA device)")
    if requested == "bf16" and device_type == "cuda" and not bf16_ok:
        raise MedLMError("--precision bf16 is not supported natively by this GPU (compute "
                         "capability below 8.0): expected auto (fp16 + GradScaler here), fp16 "
                         "or fp32")
    if requested == "bf16" and device_type == "cpu" and not bf16_ok:
        log.warning("WARNING: --precision bf16 on a CPU without native bf16 (%s): bf16 is "
                    "emulated and extremely slow here (%s); --precision auto picks fp32 on this "
                    "CPU", cpu_kind(), CPU_EMULATED_BF16)
    if requested not in ("fp32", "bf16", "fp16"):
        raise MedLMError(f"--precision {requested!r} is invalid: expected auto, fp32, bf16 or "
                         "fp16")
    return Precision(requested, device)


def describe_device(device: torch.device) -> str:
    """Human name of the hardware, for results.csv's ``gpu`` column and run params."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu: {cpu_name()}, {cpu_count()} cores, {cpu_kind()}"
