"""Every setting of a training run, declared once as a ``setting(...)`` field of ``TrainConfig``:
its default, check, help and flag. The defaults are the best recipe measured
(experiments/RESULTS.md); a recipe file (experiments/recipes/*.toml, --config FILE) changes some."""

from __future__ import annotations

import json
import math
import tomllib
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medlm.errors import MedLMError, shorten
from medlm.prompts import PROMPT_FORMATS

DEVICES = ("auto", "cuda", "mps", "cpu")
# --lora-rank's default on a pretrained base; a base with random weights (experiments.init_model)
# trains every weight, where frozen random weights would learn nothing
AUTO_LORA_RANK = 16
RECIPES_DIR = Path(__file__).resolve().parent.parent / "experiments" / "recipes"


@dataclass(frozen=True)
class Rule:
    """What a numeric setting accepts, in the words its error uses."""

    ok: Callable[[float], bool]
    expected: str
    whole: bool = False  # a whole number (int), not any number

    def check(self, name: str, value: Any) -> None:
        kind = int if self.whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not self.ok(value):
            raise MedLMError(f"{flag_of(name)} {value!r} is invalid: expected {self.expected}")


AT_LEAST_ONE = Rule(lambda v: v >= 1, "a whole number >= 1", whole=True)
COUNT = Rule(lambda v: v >= 0, "a whole number >= 0", whole=True)
SEED = Rule(lambda v: 0 <= v < 2**32, "a whole number from 0 to 2**32 - 1", whole=True)
POSITIVE = Rule(lambda v: math.isfinite(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
BELOW_ONE = Rule(lambda v: 0 <= v < 1, "a number >= 0 and < 1")
FRACTION = Rule(lambda v: 0 < v < 1, "a number between 0 and 1")
FOLDS = Rule(lambda v: v == 0 or v >= 2, "0 (off) or a whole number >= 2", whole=True)
MINUTES = Rule(lambda v: math.isfinite(v) and v > 0, "a number of minutes > 0")

# the flag groups of ``python -m experiments.run --help``, in order
GROUPS = {"data": "data", "model": "model and hardware",
          "training": "training (defaults: the best recipe measured, experiments/RESULTS.md)",
          "samples": "samples written after every epoch",
          "mlflow": "MLflow (tracking URI: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
          "run": "interruptions and output"}


def setting(default: Any = MISSING, help: str = "", group: str = "training", **spec: Any) -> Any:
    """A ``TrainConfig`` field and its flag, in ``group`` of --help. ``spec``: ``rule`` or
    ``choices`` (its check), ``sweep`` (several values make a sweep), ``flag`` (where it is not
    the field's name), ``shown`` (the default in --help's words), ``metavar``."""
    metadata = {"help": help, "group": group, "rule": None, "choices": None, "sweep": False,
                "flag": None, "shown": None, "metavar": None}
    assert spec.keys() <= metadata.keys(), spec
    metadata.update(spec)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(name: str) -> str:
    """The command-line flag of a setting (``collective_timeout_min`` -> --collective-timeout)."""
    found = next((f for f in fields(TrainConfig) if f.name == name), None)
    return (found and found.metadata.get("flag")) or "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    model: str = setting(
        "distilgpt2", "Hub model id, an offline base (smollm2-135m-instruct: python -m "
        "experiments.download), a save_pretrained directory or a .gguf file", "model")
    dataset: str = setting("QuyenAnhDE/Diseases_Symptoms", "Hub dataset id, or a local "
                           "CSV/TSV/Parquet/JSON file with Name and Symptoms columns", "data")
    max_samples: int | None = setting(None, "use only the first N cleaned rows (quick runs)",
                                      "data", rule=AT_LEAST_ONE, shown="all")
    max_length: int | None = setting(None, "cap on tokens per row; longer rows are truncated",
                                     "data", rule=AT_LEAST_ONE, shown="the model's context size")
    validation_fraction: float = setting(
        0.2, "share of distinct diseases held out for validation", "data", rule=FRACTION)
    split_seed: int = setting(42, "which diseases are held out: runs compare only on the same "
                              "split", "data", rule=SEED)
    folds: int = setting(
        0, "cross-validation: K runs, child runs of one parent, each holding out another K-th "
        "of the disease name groups (every disease held out once; --validation-fraction is "
        "refused beside it); the parent logs each score's mean, standard deviation and "
        "interval over the folds; 0 = one split by --validation-fraction", "data", rule=FOLDS)
    fold: int | None = setting(None, "with --folds K: train only this fold (0 to K-1), say one "
                               "per machine", "data", rule=COUNT, shown="each in turn")

    recipe: str = setting(
        "default", "a named recipe, experiments/recipes/NAME.toml: the settings it changes from "
        "the defaults below (flags given beside it win); seed-notebook: the seed notebook's (full "
        "fine-tuning, constant lr, 10 epochs, no early stopping, no clipping, random batches, "
        "rows cut at 128 tokens); chat-template: SmolLM2 prompted through its chat template")
    # the swept settings, in the order a sweep's table and run names show them: lr .. seed
    lr: float = setting(5e-4, "AdamW learning rate", rule=POSITIVE, sweep=True)
    batch_size: int = setting(8, "rows per batch (under torchrun: of all processes together)",
                              rule=AT_LEAST_ONE, sweep=True)
    epochs: int = setting(3, "passes over the training set", rule=AT_LEAST_ONE, sweep=True)
    weight_decay: float = setting(0.0, "AdamW weight decay (0 = the seed notebook's Adam)",
                                  rule=NON_NEGATIVE, sweep=True)
    seed: int = setting(42, "seeds initialisation, shuffling, dropout, LoRA adapters and "
                        "samples", rule=SEED, sweep=True)
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 = off", rule=NON_NEGATIVE)
    grad_accum: int = setting(1, "batches per optimizer step", rule=AT_LEAST_ONE)
    scheduler: str = setting("cosine", "learning-rate decay after warmup",
                             choices=("constant", "linear", "cosine"))
    warmup_steps: int = setting(10, "optimizer steps of linear warmup", rule=COUNT)
    patience: int = setting(1, "stop after N epochs without a better --select-by value; 0 = off",
                            rule=COUNT)
    select_by: str = setting(
        "validation_loss", "what picks the best epoch (the weights kept), early stopping and "
        "the champion: the lowest validation loss or the highest symptom F1 on the validation "
        "diseases", choices=("validation_loss", "symptom_f1"))
    group_by_length: bool = setting(True, "batches of similar-length rows (far less padding); "
                                    "off: plain shuffled batches")
    loss_on: str = setting(
        "full", "full: the whole \"Name | Symptoms\" text; completion: only the symptoms (the "
        "loss skips the \"Name |\" prompt)", choices=("full", "completion"))
    # chat scored a little higher on SmolLM2 but makes rows 2.3x as long (prompts.py)
    prompt_format: str = setting(
        "plain", "plain: \"Name | Symptoms\" rows; chat: the name and symptoms as the user's "
        "and the assistant's turns of the tokenizer's chat template; auto: chat where the "
        "tokenizer has a template", choices=PROMPT_FORMATS)
    shuffle_symptoms: bool = setting(False, "symptom-order augmentation: each training row's "
                                     "symptoms in a new order every epoch")
    neftune_alpha: float = setting(
        0.0, "NEFTune: noise on the input embeddings while training, of scale alpha / "
        "sqrt(tokens x width) (TRL suggests 5); 0 = off", rule=NON_NEGATIVE)
    label_smoothing: float = setting(
        0.0, "share of each target token's probability spread over the vocabulary in the "
        "training loss (not the validation loss); 0 = off", rule=BELOW_ONE)
    lora_rank: int | None = setting(  # None: decided by ``recipe.resolve_lora_rank``
        None, "train LoRA adapters of this rank on every linear layer of the blocks (peft) "
        "instead of every weight; merged into the base before the model is logged; 0 = full "
        "fine-tuning", rule=COUNT, shown=f"{AUTO_LORA_RANK} on a pretrained base, 0 on one "
        "with random weights (experiments.init_model)")
    lora_alpha: float | None = setting(None, "LoRA scaling (the update is multiplied by alpha "
                                       "/ rank)", rule=POSITIVE, shown="2 x --lora-rank")
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapters' input", rule=BELOW_ONE)
    lora_modules: str = setting(
        "all-linear", "the layers with adapters: every linear layer of the blocks, or the "
        "attention projections peft adapts by default (query and value in SmolLM2 or Gemma 3, "
        "GPT-2's c_attn)", choices=("all-linear", "attention"))

    device: str = setting("auto", "auto: cuda, then mps, then cpu", "model", choices=DEVICES)
    precision: str = setting("auto", "auto: bf16 autocast where the hardware has it (fp16 + "
                             "GradScaler on older GPUs), else fp32", "model",
                             choices=("auto", "fp32", "bf16", "fp16"))
    tf32: bool = setting(True, "CUDA, Ampere and later: fp32 matrix products (--precision fp32, "
                         "fp32 answers) in TF32, ~8x faster with a 10-bit mantissa, as litgpt; "
                         "off: IEEE fp32", "model")
    deterministic: bool = setting(
        False, "deterministic kernels (torch.use_deterministic_algorithms, cuBLAS's fixed "
        "workspace, attention as plain matrix products): on a GPU, the same losses run after run "
        "and at a --resume, at some speed; "
        "off, CUDA may sum in another order each run (a CPU run repeats either way)", "model")
    collective_timeout_min: float = setting(
        15.0, "torchrun: minutes a process waits for the others at a collective before the job "
        "fails (raise it if scoring after an epoch is slower)", "model", rule=MINUTES,
        flag="--collective-timeout")

    sample_prompts: list[str] = setting(
        ["Kidney Failure"], "disease to sample (repeatable); the first --num-validation-samples "
        "validation diseases are added", "samples", flag="--sample-prompt", metavar="DISEASE")
    num_validation_samples: int = setting(2, "validation diseases sampled besides "
                                          "--sample-prompt", "samples", rule=COUNT)
    max_new_tokens: int = setting(40, "tokens generated per sample and per symptom-scored "
                                  "answer", "samples", rule=AT_LEAST_ONE)
    symptom_eval: bool = setting(
        True, "score greedy answers for the validation diseases (symptom_precision/recall/f1, "
        "word_f1, and the untuned base's epoch-0 score)", "samples")
    score_every_epoch: bool = setting(
        False, "score the answers after every epoch, not only the best epoch's at the end "
        "(always so with --select-by symptom_f1)", "samples")

    experiment: str = setting("medlm", "MLflow experiment name", "mlflow")
    run_name: str | None = setting(
        None, "MLflow run name (of a sweep or search: its parent run's; a child run is named "
        "by its grid values or trial number)",
        "mlflow", shown="what the run is: its base, recipe, prompt format, LoRA rank or full, "
        "and lr, e.g. \"smollm2-135m-instruct lora16 lr5e-4\"")
    registered_model: str = setting(
        "medlm", "Model Registry name the best model is registered under", "mlflow")
    register: bool | None = setting(
        None, "log and register the model (off: smoke runs, metrics and samples only)",
        "mlflow", shown="on; off with --folds, whose runs estimate")
    promote: bool = setting(
        False, "make this run's version @champion without comparing it (the champion otherwise "
        "moves only to a version better with confidence on the same evaluation key)", "mlflow")
    checkpoint_dir: str = setting("checkpoints", "where each run keeps its resumable state "
                                  "(<dir>/<run id>/; removed when the run finishes)", "run")
    log_every_steps: int = setting(
        10, "per-step curves in MLflow (step/training_loss, step/learning_rate, step/grad_norm, "
        "step/tokens_per_sec) every N optimizer steps; 0 = per-epoch metrics only", "mlflow",
        rule=COUNT)
    system_metrics: bool = setting(True, "log CPU, memory and GPU usage (system/* metrics)",
                                   "mlflow")
    progress: bool = setting(True, "progress bars (they are off anyway when stderr is not a "
                             "TTY)", "run")

    def __post_init__(self) -> None:
        if self.register is None:  # a cross-validation run estimates; it registers if asked
            self.register = not self.folds
        for declared in fields(self):
            value, spec = getattr(self, declared.name), declared.metadata
            if spec["rule"] is not None and value is not None:
                spec["rule"].check(declared.name, value)
            if spec["choices"] and value not in spec["choices"]:
                raise MedLMError(f"{flag_of(declared.name)} {value!r} is invalid: expected one "
                                 f"of {', '.join(spec['choices'])}")
        if self.lora_rank == 0 and self.sets_lora_options():
            raise MedLMError("--lora-alpha, --lora-dropout and --lora-modules need --lora-rank: "
                             "expected --lora-rank N (N >= 1) with them, or none of them")
        if self.promote and not self.register:
            raise MedLMError("--promote with --no-register (register off; off by default "
                             "with --folds) is invalid: expected --register with it (an "
                             "unregistered run has no version to promote)")
        if self.fold is not None and not self.fold < self.folds:
            raise MedLMError(f"--fold {self.fold} is invalid: expected " + (
                f"0 to {self.folds - 1} (--folds {self.folds})" if self.folds
                else "--folds K beside it (the fold of a K-fold cross-validation)"))
        if self.score_every_epoch and not self.symptom_eval:
            raise MedLMError("--score-every-epoch with --no-symptom-eval (scoring off) is "
                             "invalid: expected --symptom-eval with it")
        if self.select_by == "symptom_f1" and not self.symptom_eval:
            raise MedLMError("--select-by symptom_f1 needs the per-epoch symptom scores: "
                             "expected --symptom-eval (not --no-symptom-eval), or --select-by "
                             "validation_loss")
        check_mlflow_name("experiment", self.experiment)
        check_mlflow_name("registered_model", self.registered_model)

    def sets_lora_options(self) -> bool:
        """Was any adapter setting changed from its default (meaningless without adapters)?"""
        return (self.lora_alpha is not None or bool(self.lora_dropout)
                or self.lora_modules != "all-linear")

    @classmethod
    def from_recipe(cls, recipe: str = "default", **settings: Any) -> TrainConfig:
        return cls(recipe=recipe, **{**read_recipe(recipe), **settings})

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """A config saved by ``asdict``: one older than ``split_seed`` split by ``seed`` and
        scored every epoch; one older than ``prompt_format`` had plain prompts."""
        if "split_seed" not in saved:
            saved = {"split_seed": saved.get("seed", cls.seed), "score_every_epoch": True, **saved}
        return cls(**{"prompt_format": "plain", **saved})

    def to_recipe(self) -> str:
        """The settings that differ from the defaults, as a recipe file that ``--config``
        trains again (without ``NOT_RECIPE``). A JSON value is a TOML value."""
        defaults = asdict(TrainConfig())
        return "\n".join([
            f"# the settings of a run of recipe {self.recipe!r} that differ from MedLM's "
            "defaults", "# python -m experiments.run --config recipe.toml",
            *(f"{name} = {json.dumps(value, ensure_ascii=False)}"
              for name, value in asdict(self).items()
              if name not in NOT_RECIPE and value is not None and value != defaults[name])]) + "\n"

    def to_params(self) -> dict[str, Any]:
        """Flat, string-friendly view for MLflow params."""
        params = asdict(self)
        params["sample_prompts"] = "; ".join(self.sample_prompts)
        if self.lora_rank is None:
            params["lora_rank"] = "auto"  # resolve_lora_rank has not been asked
        if self.lora_rank and self.lora_alpha is None:
            params["lora_alpha"] = 2 * self.lora_rank  # the effective default
        return params


# what a recipe does not hold: which recipe it is, where the run is tracked and checkpointed,
# what this machine runs it on (the flags a resumed run may change), and which fold it held out
NOT_RECIPE = frozenset({"recipe", "device", "precision", "tf32", "deterministic",
                        "collective_timeout_min", "folds", "fold"}
                       | {declared.name for declared in fields(TrainConfig)
                          if declared.metadata["group"] in ("mlflow", "run")})
# the settings that take several values on the command line, one run of a sweep per combination
SWEEPABLE = tuple(declared.name for declared in fields(TrainConfig) if declared.metadata["sweep"])


def sweep_value(value: Any) -> str:
    """A swept value as run names and labels show it: 0.0005 as 0.0005, a seed in full."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_mlflow_name(name: str, value: str) -> None:
    """An experiment or registered-model name MLflow accepts, checked before any run starts; a
    model name also without quotes or backslashes, which MedLM's registry searches cannot quote."""
    from mlflow.exceptions import MlflowException  # deferred: MLflow takes seconds to import
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    model = name == "registered_model"
    try:
        (_validate_model_name if model else _validate_experiment_name)(value)
        problem = next((f"it holds {char!r}" for char in "'\"\\" if model and char in value), None)
    except MlflowException as error:
        problem = error.message.rstrip(".")
    if problem:
        expected = ("a registered-model name without / : ' \" or \\ (e.g. medlm-smollm2)"
                    if model else "a non-empty MLflow experiment name of at most 500 characters")
        raise MedLMError(f"{flag_of(name)} {shorten(value)!r} is invalid ({problem[:120]}): "
                         f"expected {expected}")


def setting_kinds() -> dict[str, type]:
    """Each setting's type, None left out: ``int | None`` -> int, ``list[str]`` -> list."""
    return {name: list if typing.get_origin(hint) is list else next(
                kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))
            for name, hint in typing.get_type_hints(TrainConfig).items()}


def recipe_names() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in RECIPES_DIR.glob("*.toml")))


def read_recipe(recipe: str) -> dict[str, Any]:
    """The settings of a named recipe (in ``RECIPES_DIR``) or a .toml file, checked: each a
    ``TrainConfig`` field of the field's type."""
    named = not recipe.endswith(".toml")
    path = RECIPES_DIR / f"{recipe}.toml" if named else Path(recipe).expanduser().resolve()
    if not path.is_file() and named:
        raise MedLMError(f"--recipe {recipe!r} is invalid: expected one of "
                         f"{', '.join(recipe_names())} (or --config FILE.toml)")
    if not path.is_file():
        raise MedLMError(f"recipe file {recipe!r} does not exist: expected a TOML file of "
                         "settings, such as experiments/recipes/seed-notebook.toml")
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise MedLMError(f"recipe {str(path)!r} is not TOML ({error}): expected lines of "
                         "setting = value") from None
    kinds = setting_kinds()
    for name, value in settings.items():
        if name not in kinds or name == "recipe":
            raise MedLMError(f"recipe {str(path)!r}: {name!r} is not a setting: expected "
                             f"one of {', '.join(kinds)}")
        kind = kinds[name]
        if isinstance(value, bool) != (kind is bool) or not isinstance(
                value, (int, float) if kind is float else kind):
            raise MedLMError(f"recipe {str(path)!r}: {name} = {value!r} is invalid: expected "
                             f"a {kind.__name__}")
        if kind is list and not all(isinstance(item, str) for item in value):
            raise MedLMError(f"recipe {str(path)!r}: {name} = {value!r} is invalid: expected "
                             "a list of strings")
    return settings


# What a plain ``python -m experiments.search`` varies: the levers the default recipe was chosen
# among (experiments/RESULTS.md). Not loss_on: it changes the tokens the validation loss is over,
# so its trials could not be compared (``medlm.search.check_comparable``).
DEFAULT_SPACE = {"lr": "1e-4..3e-3:log", "lora_rank": "8,16,32", "warmup_steps": "0..30",
                 "weight_decay": "0..0.1", "epochs": "2..5"}
