"""Tokenizer and causal LM loading; the device and numeric precision."""

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from medlm._paths import looks_like_local_path, scratch_directory
from medlm.errors import MedLMError, first_line
from medlm.hub import HubUnavailable, check_hub, model_in_cache
from medlm.offline import OFFLINE_BASES, cache_dir, resolve_base_name
from medlm.prompts import ensure_pad_token

log = logging.getLogger(__name__)

DEQUANTIZED_FORMAT = 1  # bump when what _load_gguf keeps changes


def load_tokenizer_and_model(name_or_path: str):
    """A Hub id, an offline base name, a ``save_pretrained`` directory or a GGUF file ->
    (tokenizer with a pad token, model in fp32: mixed precision is autocast over fp32 weights)."""
    path = str(resolve_base_name(name_or_path) or os.path.expanduser(name_or_path))
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return ensure_pad_token(*_load_gguf(name_or_path, path))
    if os.path.isdir(path):  # absolute: MLflow looks a relative path up on the Hub (card, licence)
        return ensure_pad_token(*_pretrained(name_or_path, os.path.abspath(path)))
    if looks_like_local_path(name_or_path):
        raise MedLMError(f"model {name_or_path!r} not found: expected a Hub model id, an "
                         f"offline base ({', '.join(OFFLINE_BASES)}), a directory saved with "
                         "save_pretrained, or a .gguf file")
    offline = check_hub()
    loaded = _pretrained(name_or_path, name_or_path, offline)  # an error first, alone
    where = (f"local Hugging Face cache (the Hub is not reachable: {offline})" if offline
             else "Hugging Face Hub (or its local cache)")
    log.info("model %s: from the %s", name_or_path, where)
    return ensure_pad_token(*loaded)


def _pretrained(name_or_path: str, source: str, offline: str | None = None,
                gguf_file: str | None = None):
    """transformers' (tokenizer, fp32 model), or a one-line error; no model's own code runs (else
    transformers asks on stdin, and a ``y`` imports it), no pickle is unpickled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only to load
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    where = "GGUF file" if gguf_file else "directory" if os.path.isdir(source) else "Hub id"
    try:
        return (AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra),
                AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                     trust_remote_code=False,
                                                     **(extra or {"use_safetensors": True})))
    except (OSError, ValueError, KeyError, ImportError) as error:
        if "trust_remote_code" in str(error):
            raise MedLMError(f"model {name_or_path!r} needs the Python code that comes with it "
                             "(auto_map), and MedLM never runs a model's own code: expected an "
                             "architecture built into transformers (GPT-2, Llama, ...)") from None
        names = sorted(p.name for p in Path(source).iterdir()) if where == "directory" else []
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles and not any(name.endswith(".safetensors") for name in names):
            raise MedLMError(f"model {name_or_path!r} holds its weights only as a pickle "
                             f"({', '.join(pickles)}), which MedLM does not load (unpickling can "
                             "run code): expected model.safetensors: re-save it with "
                             "save_pretrained") from None
        reason = first_line(error)
        if offline:  # the reason is worth naming only for a model in the cache
            raise HubUnavailable("model", name_or_path, offline,
                                 reason if model_in_cache(name_or_path) else "") from None
        raise MedLMError(f"could not load model {name_or_path!r} ({where}: {reason[:200]}): "
                         "expected a causal LM Hub id, save_pretrained directory, .gguf file "
                         f"or offline base ({', '.join(OFFLINE_BASES)})") from None


def _load_gguf(name_or_path: str, path: str):
    """A GGUF file de-quantized to fp32 once (~17 s for SmolLM2-135M), then read back from
    ``dequantized_cache`` (~0.2 s); a damaged copy is converted again."""
    cached = dequantized_cache(path)
    if cached.is_dir():
        try:
            return _pretrained(name_or_path, str(cached))
        except Exception as error:  # noqa: BLE001 - damaged in any way: convert again
            log.warning("the de-quantized copy in %s is unreadable (%s): converting the GGUF "
                        "file again", cached, first_line(error))
            shutil.rmtree(cached, ignore_errors=True)
    log.info("de-quantizing %s (GGUF) to fp32, once: later runs read %s", name_or_path, cached)
    tokenizer, model = _pretrained(name_or_path, os.path.dirname(os.path.abspath(path)),
                                   gguf_file=os.path.basename(path))
    if getattr(model, "hf_quantizer", None) is not None:  # else save_pretrained refuses it
        model.hf_quantizer.remove_quantization_config(model)
    try:  # renamed when whole: a kill leaves no half-written copy
        with scratch_directory(cached.parent, f".{cached.name}.") as partial:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            os.replace(partial, cached)
    except Exception as error:  # noqa: BLE001 - OSError, SafetensorError, ...: only a cache
        if not cached.is_dir():  # else another process (a torchrun rank) wrote it first
            log.warning("could not keep the de-quantized model in %s (%s): the next run "
                        "converts the GGUF file again", cached, first_line(error))
    return tokenizer, model


def dequantized_cache(gguf_path: str) -> Path:
    """Per GGUF file (its real path: a cache linking to another's bases finds the same copy), size,
    modification time and the versions that convert it."""
    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = ""
    stat = os.stat(gguf_path)
    key = "|".join(map(str, (os.path.realpath(gguf_path), stat.st_size, stat.st_mtime_ns,
                             version("transformers"), gguf_version, DEQUANTIZED_FORMAT)))
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "dequantized" / f"{Path(gguf_path).stem}-{digest}"


def tokenizer_sha256(tokenizer) -> str:
    """Vocabulary and end-of-text token: losses compare across runs only when it is the same."""
    content = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def context_size(model) -> int | None:
    values = (getattr(model.config, name, None)
              for name in ("n_positions", "max_position_embeddings", "n_ctx"))
    return next((value for value in values if isinstance(value, int) and value > 0), None)


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
        return torch.device(next(kind for kind, present in has.items() if present))
    if not has.get(requested):
        raise MedLMError(f"--device {requested} is not available on this machine: "
                         "expected auto or cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: fp32, or autocast to bf16/fp16 over fp32 weights."""

    name: str  # fp32 | bf16 | fp16
    device: torch.device  # a str is made one
    tf32: bool = False  # fp32 matrix products in TF32 (CUDA, compute capability 8.0 and later)

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def numerics(self) -> str:
        """What changes the numbers: ``name``, with ``+tf32`` where fp32 products run in TF32."""
        return f"{self.name}+tf32" if self.tf32 else self.name

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self):
        if dtype := self.autocast_dtype:
            return torch.autocast(self.device_type, dtype=dtype)
        return contextlib.nullcontext()

    def answer_autocast(self):
        """bf16 (2.1x fp32's speed on AVX512-BF16); fp16 in fp32: no overflow stops a run."""
        return self.autocast() if self.name == "bf16" else contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


@functools.cache
def peak_flops(precision: Precision) -> float:
    """Matmul FLOP/s in ``precision``, measured once per process: MFU's peak on any device."""
    size, repeats = (4096, 10) if precision.device_type == "cuda" else (1024, 3)
    dtype = precision.autocast_dtype or torch.float32
    # not torch.randn: the run's random stream must not depend on whether this ran yet
    left = torch.full((size, size), 0.5, device=precision.device, dtype=dtype)
    synchronize = getattr(torch, precision.device_type).synchronize
    left @ left  # warm-up: kernels chosen, memory allocated
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        left @ left
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


@contextlib.contextmanager
def casts_cached(model, device: torch.device):
    """Under autocast, frozen weights (LoRA's base) cast once per call too: autocast caches only
    casts of leaves that require grad, so (under no_grad) they are marked so for the call."""
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
    """``AMX-BF16`` or ``AVX512-BF16`` (native bf16), else the vector ISA torch dispatches to."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX-BF16"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return f"{torch.backends.cpu.get_cpu_capability()}, no native bf16"


def cpu_count() -> int:
    """Cores this process may use (its affinity: a container's limit), not the host's count."""
    affinity = getattr(os, "sched_getaffinity", None)  # not on macOS, Windows
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_precision(requested: str, device: torch.device | str,
                      tf32: bool = True) -> Precision:
    """``auto``: bf16 where the device has it natively (CPU: ~1.5x faster per epoch than fp32,
    same loss; experiments/README.md, Precision), else fp16 + GradScaler on CUDA, else fp32 (MPS:
    fp32 too, unmeasured; ``bf16`` there on request). On CUDA it also sets this process's fp32
    matrix products to TF32 (``tf32``; Ampere and later), as litgpt: they are what the fp32 ops
    outside autocast, ``--precision fp32`` and fp32 answers run."""
    device_type = torch.device(device).type
    if device_type == "cuda":  # not counting emulation (T4, V100: no bf16 tensor cores)
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        tf32 = tf32 and torch.cuda.get_device_properties(torch.cuda.current_device()).major >= 8
    else:
        native_bf16 = device_type == "cpu" and (torch.cpu._is_amx_tile_supported()
                                                  or torch.cpu._is_avx512_bf16_supported())
        tf32 = False
    if requested == "auto":
        return Precision("bf16" if native_bf16 else "fp16" if device_type == "cuda" else "fp32",
                         device, tf32)
    if requested == "fp16" and device_type != "cuda":
        raise MedLMError(f"--precision fp16 is not supported on {device_type}: expected auto, "
                         "fp32 or bf16 (fp16 autocast needs a GradScaler, which MedLM runs on "
                         "CUDA only)")
    if requested == "bf16" and device_type == "cuda" and not native_bf16:
        raise MedLMError("--precision bf16 is not supported natively by this GPU (compute "
                         "capability below 8.0): expected auto (fp16 + GradScaler here), fp16 "
                         "or fp32")
    if requested == "bf16" and device_type == "mps" and not (
            torch.amp.is_autocast_available("mps") and torch.backends.mps.is_macos_or_newer(14, 0)):
        raise MedLMError("--precision bf16 on mps needs macOS 14 or later and a PyTorch with "
                         "MPS autocast (2.5 or later): expected auto or fp32 here")
    if requested == "bf16" and device_type == "cpu" and not native_bf16:  # experiments/README.md
        log.warning("WARNING: --precision bf16 on a CPU without native bf16 (%s): bf16 is "
                    "emulated and extremely slow here (one distilgpt2 training step of 8x53 "
                    "tokens took 187 s in bf16 autocast against 4 s in fp32 on an AVX2-only AMD "
                    "EPYC); --precision auto picks fp32 on this CPU", cpu_kind())
    return Precision(requested, device, tf32)


def set_deterministic(enabled: bool, device: torch.device | str) -> None:
    """``--deterministic``: kernels that give the same result every time (torch's deterministic
    algorithms, cuBLAS's fixed workspace; on CUDA attention in plain matrix products: flash and
    memory-efficient attention's backward stays non-deterministic under ``warn_only``), warning
    where an op has none; off (torch's default), CUDA may sum in another order run to run. (The
    attention switches are global: on a CPU, which repeats anyway, its flash kernel is kept.)"""
    if enabled:  # read when cuBLAS starts: before this process's first CUDA product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    fused_attention = not (enabled and torch.device(device).type == "cuda")
    for backend in (torch.backends.cuda.enable_flash_sdp,
                    torch.backends.cuda.enable_mem_efficient_sdp,
                    torch.backends.cuda.enable_cudnn_sdp):
        backend(fused_attention)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu: {cpu_name()}, {cpu_count()} cores, {cpu_kind()}"
