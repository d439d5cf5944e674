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


@pytest.mark.parametrize("device,cuda_bf16,cpu_bf16,expected,scaler", [
    ("cuda", True, None, "bf16", False),
    ("cuda", False, None, "fp16", True),  # pre-Ampere GPUs: fp16 autocast + GradScaler
    ("cpu", None, True, "bf16", False),
    ("cpu", None, False, "fp32", False),
    ("mps", None, None, "fp32", False),
])
def test_auto_precision_per_device(device, cuda_bf16, cpu_bf16, expected, scaler):
    precision = resolve_precision("auto", device, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert precision.name == expected
    assert precision.needs_grad_scaler is scaler


def test_fp16_on_cuda_gets_an_enabled_grad_scaler_and_fp32_does_not():
    fp16 = resolve_precision("fp16", "cuda", cuda_bf16=True)
    assert fp16.autocast_dtype == torch.float16 and fp16.needs_grad_scaler
    assert resolve_precision("fp32", "cuda", cuda_bf16=True).autocast_dtype is None
    assert not resolve_precision("bf16", "cpu", cpu_bf16=True).grad_scaler().is_enabled()


def test_impossible_precisions_are_user_errors():
    with pytest.raises(MedLMError, match="fp16 is not supported on cpu"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(MedLMError, match="bf16 is not supported by this GPU"):
        resolve_precision("bf16", "cuda", cuda_bf16=False)


def test_bf16_autocast_runs_the_forward_pass_in_bf16_on_cpu():
    precision = resolve_precision("bf16", "cpu", cpu_bf16=True)
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
