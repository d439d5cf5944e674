"""LoRA adapters through ``peft``, merged into the base weights before the model is logged, so a
LoRA run registers, loads and serves like any other."""

import contextlib
import logging
from collections.abc import Iterator

import torch

from medlm.errors import MedLMError
from medlm.modeling import count_parameters

log = logging.getLogger(__name__)


def add_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0,
             seed: int = 0, modules: str = "all-linear"):
    """``model`` with rank-``rank`` adapters on ``modules`` ("all-linear": every linear layer of
    the blocks, not the head; "attention": peft's default targets), the rest frozen. The
    adapters start from ``seed``, the global generator left alone: a sweep's child starts as
    the same run on its own would."""
    from peft import LoraConfig, get_peft_model  # heavy: only for a LoRA run
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
        target_modules="all-linear" if modules == "all-linear" else None, task_type="CAUSAL_LM",
        # GPT-2 keeps its projections as Conv1D, whose weights are stored transposed
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, config)
    except ValueError as error:
        if modules != "all-linear":  # peft knows no default attention targets for it
            raise MedLMError(f"--lora-modules {modules}: peft has no attention projections "
                             f"on record for this {type(model).__name__} ({error}): expected "
                             "--lora-modules all-linear") from None
        raise MedLMError(f"--lora-rank {rank}: peft found no layer to adapt in this "
                         f"{type(model).__name__} ({error}): expected a transformers causal LM "
                         "with linear projections") from None
    trainable, total = trainable_parameters(wrapped), count_parameters(wrapped)
    log.info("LoRA rank %d (alpha %g): %d of %d parameters trained (%.2f%%)", rank,
             config.lora_alpha, trainable, total, 100 * trainable / total)
    return wrapped


def is_lora(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merge_lora(model):
    """The base model with the adapters folded into its weights (a plain transformers model)."""
    return model.merge_and_unload() if is_lora(model) else model


@contextlib.contextmanager
def merged(model) -> Iterator:
    """A LoRA model with its adapters merged into the base weights in place, to decode with
    (through the adapters each step costs ~100 ms more on SmolLM2; a merged copy, the model's
    memory again), else ``model``. On exit the adapters are apart again and the adapted base
    weights exactly as before, from a host copy of those alone: peft's unmerge leaves float
    rounding in them, so the frozen base would drift epoch by epoch, and a resume (the adapters
    alone restored, on the base as loaded) would not train on the weights the run had."""
    if not is_lora(model):
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    kept = [(parameter, parameter.detach().to("cpu", copy=True))
            for module in model.modules() if isinstance(module, BaseTunerLayer)
            for parameter in module.get_base_layer().parameters(recurse=False)]
    try:
        model.merge_adapter()  # (a failure part way still restores every weight below)
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for parameter, weight in kept:
                parameter.copy_(weight)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
