import os
from types import SimpleNamespace

import pytest
import torch

from medlm.errors import MedLMError
from medlm.modeling import (
    context_size,
    effective_max_length,
    load_tokenizer_and_model,
    resolve_device,
    resolve_precision,
)


def pretend_gpu(monkeypatch, major: int) -> None:
    """torch's own CUDA queries answer as a GPU of compute capability ``major`` would, and
    creating a bf16 tensor on it succeeds (emulation, as on a real T4 or V100)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


def pretend_cpu(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("major, expected, scaler", [
    (8, "bf16", False),  # A100, RTX 30xx and newer
    (7, "fp16", True),  # T4, V100: bf16 only emulated -> fp16 autocast + GradScaler
    (6, "fp16", True),  # P100
])
def test_auto_precision_on_cuda_asks_for_native_bf16(monkeypatch, major, expected, scaler):
    pretend_gpu(monkeypatch, major)
    precision = resolve_precision("auto", "cuda")
    assert precision.name == expected
    assert precision.needs_grad_scaler is scaler


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native_bf16, expected):
    pretend_cpu(monkeypatch, native_bf16)
    assert resolve_precision("auto", "cpu").name == expected


def test_auto_precision_on_mps_is_fp32():
    assert resolve_precision("auto", "mps").name == "fp32"


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused(monkeypatch):
    pretend_gpu(monkeypatch, 7)
    with pytest.raises(MedLMError, match="bf16 is not supported natively by this GPU"):
        resolve_precision("bf16", "cuda")
    pretend_gpu(monkeypatch, 8)
    assert resolve_precision("bf16", "cuda").name == "bf16"


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_cost(monkeypatch, caplog):
    pretend_cpu(monkeypatch, False)
    with caplog.at_level("WARNING", logger="medlm"):
        assert resolve_precision("bf16", "cpu").name == "bf16"
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "without native bf16" in warning and "187 s in bf16 autocast against 4 s in fp32" in (
        warning)
    caplog.clear()
    pretend_cpu(monkeypatch, True)
    resolve_precision("bf16", "cpu")
    assert not caplog.records


def test_fp16_on_cuda_gets_an_enabled_grad_scaler_and_fp32_does_not(monkeypatch):
    pretend_gpu(monkeypatch, 8)
    fp16 = resolve_precision("fp16", "cuda")
    assert fp16.autocast_dtype == torch.float16 and fp16.needs_grad_scaler
    assert resolve_precision("fp32", "cuda").autocast_dtype is None
    pretend_cpu(monkeypatch, True)
    assert not resolve_precision("bf16", "cpu").grad_scaler().is_enabled()


def test_impossible_precisions_are_user_errors():
    with pytest.raises(MedLMError, match="fp16 is not supported on cpu"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_runs_the_forward_pass_in_bf16_on_cpu(monkeypatch):
    pretend_cpu(monkeypatch, True)
    precision = resolve_precision("bf16", "cpu")
    layer = torch.nn.Linear(4, 4)
    with precision.autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_an_absent_device_is_a_user_error():
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(MedLMError, match="--device cuda is not available"):
        resolve_device("cuda")


def test_local_model_loads_in_fp32_with_a_pad_token(tiny_model_dir):
    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert next(model.parameters()).dtype == torch.float32
    assert context_size(model) == 256


def test_missing_model_directory_fails_fast(tmp_path):
    with pytest.raises(MedLMError, match="not found: expected a Hub model id"):
        load_tokenizer_and_model(str(tmp_path / "no-such-model"))


def test_a_directory_that_is_not_a_model_is_a_user_error(tmp_path):
    with pytest.raises(MedLMError, match="could not load model"):
        load_tokenizer_and_model(str(tmp_path))


def test_max_length_defaults_to_and_is_bounded_by_the_context(tiny_model):
    _, model = tiny_model
    assert effective_max_length(None, model) == 256
    assert effective_max_length(64, model) == 64
    with pytest.raises(MedLMError, match="--max-length 300 exceeds.*at most 256"):
        effective_max_length(300, model)


@pytest.mark.parametrize("major, tf32", [(8, True), (7, False)])
def test_fp32_products_on_an_ampere_gpu_run_in_tf32_unless_turned_off(monkeypatch, major, tf32):
    """Issue 38: no TF32 anywhere, so --precision fp32 and fp32 answers ran at full fp32 on an
    A100/H100. It is this process's matmul setting (as litgpt's), recorded in ``numerics``."""
    pretend_gpu(monkeypatch, major)
    matmul, kept = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        precision = resolve_precision("fp32", "cuda")
        assert matmul.allow_tf32  # on any card: a no-op below 8.0
        assert precision.tf32 is tf32
        assert precision.numerics == ("fp32+tf32" if tf32 else "fp32")
        ieee = resolve_precision("fp32", "cuda", tf32=False)
        assert not matmul.allow_tf32 and ieee.numerics == "fp32"
        matmul.allow_tf32 = False
        assert not resolve_precision("fp32", "cpu").tf32 and not matmul.allow_tf32  # left alone
    finally:
        matmul.allow_tf32 = kept


def pretend_mac(monkeypatch, macos: int, autocast: bool = True) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor=0: (macos, 0) >= (major, minor))
    monkeypatch.setattr(torch.amp, "is_autocast_available",
                        lambda device_type: autocast or device_type != "mps")


def test_mps_trains_in_fp32_unless_bf16_is_asked_where_torch_has_it(monkeypatch):
    """--device mps (Apple silicon): auto is fp32 (unmeasured there); bf16 on request where
    torch's MPS autocast takes it (macOS 14+); fp16 needs a GradScaler MedLM runs on CUDA only."""
    pretend_mac(monkeypatch, 14)
    assert resolve_device("auto").type == "mps"
    assert resolve_precision("auto", "mps").name == "fp32"
    bf16 = resolve_precision("bf16", "mps")
    assert bf16.autocast_dtype == torch.bfloat16 and not bf16.needs_grad_scaler
    with pytest.raises(MedLMError, match="fp16 is not supported on mps"):
        resolve_precision("fp16", "mps")
    pretend_mac(monkeypatch, 13)
    with pytest.raises(MedLMError, match="bf16 on mps needs macOS 14"):
        resolve_precision("bf16", "mps")
    pretend_mac(monkeypatch, 15, autocast=False)  # an older PyTorch: no MPS autocast
    with pytest.raises(MedLMError, match="bf16 on mps needs"):
        resolve_precision("bf16", "mps")


def test_deterministic_mode_sets_torch_and_cublas_before_cuda_starts(monkeypatch):
    """Issue 38: "the same losses" was promised on CUDA with nothing to make it so."""
    from medlm.modeling import set_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    sdpa = torch.backends.cuda
    try:
        set_deterministic(True, "cpu")  # a CPU repeats anyway: its flash attention kept
        assert torch.are_deterministic_algorithms_enabled() and sdpa.flash_sdp_enabled()
        set_deterministic(True, "cuda")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # never a crash mid-run
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        # flash and memory-efficient attention's backward ignore a warn-only mode: plain products
        assert sdpa.math_sdp_enabled() and not (sdpa.flash_sdp_enabled() or sdpa.cudnn_sdp_enabled()
                                                or sdpa.mem_efficient_sdp_enabled())
    finally:
        set_deterministic(False, "cuda")
    assert not torch.are_deterministic_algorithms_enabled()
    assert sdpa.flash_sdp_enabled() and sdpa.mem_efficient_sdp_enabled()
