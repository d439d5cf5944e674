"""Every knob of a training run, in one place. The defaults are the best recipe measured
(``--recipe default``, experiments/RESULTS.md); ``RECIPES`` holds the alternatives as overrides of
them, such as the seed notebook's settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from medlm.errors import MedLMError
from medlm.prompts import PROMPT_FORMATS

DEFAULT_DATASET = "QuyenAnhDE/Diseases_Symptoms"
DEFAULT_MODEL = "distilgpt2"
SCHEDULERS = ("constant", "linear", "cosine")
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSS_ON = ("full", "completion")
# which linear layers of the blocks carry LoRA adapters: every one (peft's "all-linear"), or the
# attention projections peft adapts by default (query and value in LLaMA-style models such as
# SmolLM2 and Gemma 3, GPT-2's fused c_attn)
LORA_MODULES = ("all-linear", "attention")
# What picks a run's best epoch, early stopping and the champion; higher is better for F1.
SELECT_BY = ("validation_loss", "symptom_f1")
# --lora-rank's default: adapters of this rank on a pretrained base, every weight trained on one
# with random weights (experiments.init_model), where frozen random weights would learn nothing
AUTO_LORA_RANK = 16

# Settings that a --recipe changes from the defaults below; a flag given beside it wins.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # the seed notebook: Adam (no decay, no clipping), lr 5e-4, batch 8, 10 epochs at a constant
    # rate, every weight trained, random batches of rows cut at 128 tokens, no early stopping
    "seed-notebook": {"lr": 5e-4, "batch_size": 8, "epochs": 10, "scheduler": "constant",
                      "warmup_steps": 0, "patience": 0, "lora_rank": 0, "max_grad_norm": 0.0,
                      "weight_decay": 0.0, "group_by_length": False, "max_length": 128,
                      "loss_on": "full", "prompt_format": "plain"},
}


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    max_samples: int | None = None
    max_length: int | None = None  # None: the model's context size
    validation_fraction: float = 0.2
    split_seed: int = 42  # which diseases are held out: part of what makes runs comparable
    seed: int = 42  # initialisation, shuffling, dropout, adapters, samples

    recipe: str = "default"  # the name of the RECIPES entry the settings below came from
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0  # the seed used plain Adam; AdamW with 0.0 is the same update
    max_grad_norm: float = 1.0  # 0 turns clipping off
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup_steps: int = 10
    patience: int = 1  # epochs without a better --select-by value before stopping; 0 = off
    select_by: str = "validation_loss"
    group_by_length: bool = True  # batches of similar-length rows: far less padding
    loss_on: str = "full"  # "completion": the loss skips the prompt tokens
    # "plain": "Name | Symptoms" rows; "chat": the tokenizer's chat template, which scored a
    # little higher on SmolLM2 but makes rows 2.3x as long (prompts.py); "auto": chat where
    # the tokenizer has a template
    prompt_format: str = "plain"
    shuffle_symptoms: bool = False  # each training row's symptoms in a new order every epoch
    neftune_alpha: float = 0.0  # > 0: NEFTune noise on the input embeddings while training
    label_smoothing: float = 0.0  # of the training loss (the validation loss never has it)
    # > 0: train LoRA adapters of this rank (peft) instead of every weight; None: AUTO_LORA_RANK
    # on a pretrained base, 0 on a randomly initialised one (``resolve_lora_rank``)
    lora_rank: int | None = None
    lora_alpha: float | None = None  # LoRA scaling numerator; None: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_modules: str = "all-linear"  # LORA_MODULES

    device: str = "auto"
    precision: str = "auto"
    # torchrun: how long a process waits at a collective before the job fails (rank 0 scores
    # and samples alone after each epoch while the others wait)
    collective_timeout_min: float = 15.0

    sample_prompts: list[str] = field(default_factory=lambda: ["Kidney Failure"])
    num_validation_samples: int = 2  # the first N validation diseases are sampled too
    max_new_tokens: int = 40
    symptom_eval: bool = True  # greedy-decode validation diseases, score symptoms
    # score every epoch, not only the best one (always, with --select-by symptom_f1)
    score_every_epoch: bool = False

    experiment: str = "medlm"
    run_name: str | None = None
    registered_model: str = "medlm"
    register: bool = True  # False: log metrics and samples only (smoke runs)
    promote: bool = False  # make this run's version @champion without comparing
    checkpoint_dir: str = "checkpoints"  # a run's resumable state: <checkpoint_dir>/<run id>/
    log_every_steps: int = 10  # per-step curves (loss, lr, grad norm, tokens/s); 0 = off
    system_metrics: bool = True  # CPU, memory (and GPU) usage logged beside the run
    progress: bool = True

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "grad_accum", "max_new_tokens")
        for name in positive_ints:
            _require(name, getattr(self, name), lambda v: v >= 1, "a whole number >= 1")
        for name in ("max_samples", "max_length"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, lambda v: v >= 1, "a whole number >= 1")
        for name in ("warmup_steps", "patience", "num_validation_samples", "log_every_steps"):
            _require(name, getattr(self, name), lambda v: v >= 0, "a whole number >= 0")
        if self.lora_rank is not None:
            _require("lora_rank", self.lora_rank, lambda v: v >= 0, "a whole number >= 0")
        for name in ("seed", "split_seed"):
            _require(name, getattr(self, name), lambda v: 0 <= v < 2**32,
                     "a whole number from 0 to 2**32 - 1")
        _require_choice("recipe", self.recipe, tuple(RECIPES))
        _require("lr", self.lr, lambda v: math.isfinite(v) and v > 0, "a number > 0")
        _require("weight_decay", self.weight_decay, lambda v: v >= 0, "a number >= 0")
        _require("neftune_alpha", self.neftune_alpha, lambda v: math.isfinite(v) and v >= 0,
                 "a number >= 0")
        if self.lora_alpha is not None:
            _require("lora_alpha", self.lora_alpha, lambda v: math.isfinite(v) and v > 0,
                     "a number > 0")
        _require("lora_dropout", self.lora_dropout, lambda v: 0 <= v < 1,
                 "a number >= 0 and < 1")
        _require("label_smoothing", self.label_smoothing, lambda v: 0 <= v < 1,
                 "a number >= 0 and < 1")
        _require_choice("lora_modules", self.lora_modules, LORA_MODULES)
        if self.lora_rank == 0 and self.sets_lora_options():
            raise MedLMError("--lora-alpha, --lora-dropout and --lora-modules need --lora-rank: "
                             "expected --lora-rank N (N >= 1) with them, or none of them")
        _require("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, "a number >= 0")
        _require("collective_timeout_min", self.collective_timeout_min,
                 lambda v: math.isfinite(v) and v > 0, "a number of minutes > 0")
        _require(
            "validation_fraction", self.validation_fraction, lambda v: 0 < v < 1,
            "a number between 0 and 1",
        )
        _require_choice("scheduler", self.scheduler, SCHEDULERS)
        _require_choice("loss_on", self.loss_on, LOSS_ON)
        _require_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        _require_choice("select_by", self.select_by, SELECT_BY)
        if self.promote and not self.register:
            raise MedLMError("--promote with --no-register is invalid: expected one of them "
                             "(an unregistered run has no version to promote)")
        if self.score_every_epoch and not self.symptom_eval:
            raise MedLMError("--score-every-epoch with --no-symptom-eval is invalid: expected "
                             "one of them")
        if self.select_by == "symptom_f1" and not self.symptom_eval:
            raise MedLMError("--select-by symptom_f1 needs the per-epoch symptom scores: "
                             "expected no --no-symptom-eval, or --select-by validation_loss")
        _require_choice("device", self.device, DEVICES)
        _require_choice("precision", self.precision, PRECISIONS)

    def sets_lora_options(self) -> bool:
        """Was any adapter setting changed from its default (meaningless without adapters)?"""
        return (self.lora_alpha is not None or bool(self.lora_dropout)
                or self.lora_modules != LORA_MODULES[0])

    @classmethod
    def from_recipe(cls, recipe: str = "default", **settings: Any) -> TrainConfig:
        """The ``recipe``'s settings, with ``settings`` (the flags a user gave) over them."""
        _require_choice("recipe", recipe, tuple(RECIPES))
        return cls(recipe=recipe, **{**RECIPES[recipe], **settings})

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """A config saved by ``asdict``; one saved before ``split_seed`` existed split by
        ``seed`` (its recipe is spelled out flag by flag, whatever ``recipe`` says), and one
        saved before ``prompt_format`` existed was trained on plain prompts."""
        if "split_seed" not in saved:  # it scored every epoch, as MedLM then did
            saved = {"split_seed": saved.get("seed", cls.seed), "score_every_epoch": True,
                     **saved}
        return cls(**{"prompt_format": "plain", **saved})  # the only format before there were two

    def to_params(self) -> dict[str, Any]:
        """Flat, string-friendly view for MLflow params."""
        params = asdict(self)
        params["sample_prompts"] = "; ".join(self.sample_prompts)
        if self.lora_rank is None:
            params["lora_rank"] = "auto"  # resolve_lora_rank has not been asked
        if self.lora_rank and self.lora_alpha is None:
            params["lora_alpha"] = 2 * self.lora_rank  # the effective default
        return params


def _require(name: str, value: Any, ok, expected: str) -> None:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise MedLMError(f"{flag} {value!r} is invalid: expected {expected}")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        flag = "--" + name.replace("_", "-")
        raise MedLMError(f"{flag} {value!r} is invalid: expected one of {', '.join(choices)}")
