"""Every setting of a training run, declared once: its default, its check, its help and its
place on the command line (``experiments.run`` builds its flags from these fields). The defaults
are the best recipe measured (experiments/RESULTS.md); a recipe file
(``experiments/recipes/*.toml``, or any ``--config FILE``) changes some of them, such as the seed
notebook's settings.

A new setting is one ``setting(...)`` field of ``TrainConfig``: the flag, its help, its check
(on the command line and in code alike) and the flags table follow from it.
"""

from __future__ import annotations

import functools
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
# The named recipes: experiments/recipes/NAME.toml, settings that differ from the defaults.
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


def setting(default: Any = MISSING, help: str = "", *, group: str, rule: Rule | None = None,
            choices: tuple[str, ...] | None = None, sweep: bool = False, flag: str | None = None,
            shown: str | None = None, metavar: str | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A ``TrainConfig`` field and its flag: ``help`` and ``group`` for --help, ``rule`` or
    ``choices`` its check, ``sweep`` whether several values make a sweep, ``flag`` where the
    flag is not the field's name, ``shown`` the default as --help words it, ``metavar`` the
    value's name there."""
    metadata = {"help": help, "group": group, "rule": rule, "choices": choices, "sweep": sweep,
                "flag": flag, "shown": shown, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(name: str) -> str:
    """The command-line flag of a setting (``collective_timeout_min`` -> --collective-timeout)."""
    found = next((f for f in fields(TrainConfig) if f.name == name), None)
    return (found and found.metadata.get("flag")) or "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    model: str = setting(
        DEFAULT_MODEL, "Hub model id, an offline base (smollm2-135m-instruct: python -m "
        "experiments.download), a save_pretrained directory or a .gguf file", group="model")
    dataset: str = setting(
        DEFAULT_DATASET, "Hub dataset id, or a local CSV/TSV/Parquet/JSON file with Name and "
        "Symptoms columns", group="data")
    max_samples: int | None = setting(
        None, "use only the first N cleaned rows (quick runs)", group="data",
        rule=AT_LEAST_ONE, shown="all")
    max_length: int | None = setting(
        None, "cap on tokens per row; longer rows are truncated", group="data",
        rule=AT_LEAST_ONE, shown="the model's context size")
    validation_fraction: float = setting(
        0.2, "share of distinct diseases held out for validation", group="data", rule=FRACTION)
    split_seed: int = setting(
        42, "which diseases are held out: runs compare only on the same split", group="data",
        rule=SEED)
    folds: int = setting(
        0, "cross-validation: K runs, child runs of one parent, each holding out another K-th "
        "of the disease name groups (every disease held out once; --validation-fraction "
        "is refused beside it); the parent logs each score's mean, standard deviation and "
        "interval over the folds; 0 = one split by --validation-fraction", group="data",
        rule=FOLDS)
    fold: int | None = setting(
        None, "with --folds K: train only this fold (0 to K-1), say one per machine",
        group="data", rule=COUNT, shown="each in turn")

    recipe: str = setting(
        "default", "a named recipe, experiments/recipes/NAME.toml: the settings it changes from "
        "the defaults below (flags given beside it win); seed-notebook: the seed notebook's "
        "(full fine-tuning, constant lr, 10 epochs, no early stopping, no clipping, random "
        "batches, rows cut at 128 tokens); chat-template: SmolLM2 prompted through its chat "
        "template", group="training")
    # the swept settings, in the order a sweep's table and run names show them: lr .. seed
    lr: float = setting(5e-4, "AdamW learning rate", group="training", rule=POSITIVE, sweep=True)
    batch_size: int = setting(
        8, "rows per batch (under torchrun: of all processes together)", group="training",
        rule=AT_LEAST_ONE, sweep=True)
    epochs: int = setting(3, "passes over the training set", group="training",
                          rule=AT_LEAST_ONE, sweep=True)
    weight_decay: float = setting(  # the seed used plain Adam; AdamW with 0.0 is the same update
        0.0, "AdamW weight decay (0 = the seed notebook's Adam)", group="training",
        rule=NON_NEGATIVE, sweep=True)
    seed: int = setting(
        42, "seeds initialisation, shuffling, dropout, LoRA adapters and samples",
        group="training", rule=SEED, sweep=True)
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 = off", group="training",
                                   rule=NON_NEGATIVE)
    grad_accum: int = setting(1, "batches per optimizer step", group="training",
                              rule=AT_LEAST_ONE)
    scheduler: str = setting("cosine", "learning-rate decay after warmup", group="training",
                             choices=SCHEDULERS)
    warmup_steps: int = setting(10, "optimizer steps of linear warmup", group="training",
                                rule=COUNT)
    patience: int = setting(
        1, "stop after N epochs without a better --select-by value; 0 = off", group="training",
        rule=COUNT)
    select_by: str = setting(
        "validation_loss", "what picks the best epoch (the weights kept), early stopping and "
        "the champion: the lowest validation loss or the highest symptom F1 on the validation "
        "diseases", group="training", choices=SELECT_BY)
    group_by_length: bool = setting(
        True, "batches of similar-length rows (far less padding); off: plain shuffled batches",
        group="training")
    loss_on: str = setting(
        "full", "full: the whole \"Name | Symptoms\" text; completion: only the symptoms (the "
        "loss skips the \"Name |\" prompt)", group="training", choices=LOSS_ON)
    # chat scored a little higher on SmolLM2 but makes rows 2.3x as long (prompts.py)
    prompt_format: str = setting(
        "plain", "plain: \"Name | Symptoms\" rows; chat: the name and symptoms as the user's "
        "and the assistant's turns of the tokenizer's chat template; auto: chat where the "
        "tokenizer has a template", group="training", choices=PROMPT_FORMATS)
    shuffle_symptoms: bool = setting(
        False, "symptom-order augmentation: each training row's symptoms in a new order every "
        "epoch", group="training")
    neftune_alpha: float = setting(
        0.0, "NEFTune: noise on the input embeddings while training, of scale alpha / "
        "sqrt(tokens x width) (TRL suggests 5); 0 = off", group="training", rule=NON_NEGATIVE)
    label_smoothing: float = setting(
        0.0, "share of each target token's probability spread over the vocabulary in the "
        "training loss (not the validation loss); 0 = off", group="training", rule=BELOW_ONE)
    # None: AUTO_LORA_RANK on a pretrained base, 0 on a randomly initialised one
    # (``resolve_lora_rank``)
    lora_rank: int | None = setting(
        None, "train LoRA adapters of this rank on every linear layer of the blocks (peft) "
        "instead of every weight; merged into the base before the model is logged; 0 = full "
        "fine-tuning", group="training", rule=COUNT,
        shown=f"{AUTO_LORA_RANK} on a pretrained base, 0 on one with random weights "
              "(experiments.init_model)")
    lora_alpha: float | None = setting(
        None, "LoRA scaling (the update is multiplied by alpha / rank)", group="training",
        rule=POSITIVE, shown="2 x --lora-rank")
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapters' input", group="training",
                                  rule=BELOW_ONE)
    lora_modules: str = setting(
        "all-linear", "the layers with adapters: every linear layer of the blocks, or the "
        "attention projections peft adapts by default (query and value in SmolLM2 or Gemma 3, "
        "GPT-2's c_attn)", group="training", choices=LORA_MODULES)

    device: str = setting("auto", "auto: cuda, then mps, then cpu", group="model",
                          choices=DEVICES)
    precision: str = setting(
        "auto", "auto: bf16 autocast where the hardware has it (fp16 + GradScaler on older "
        "GPUs), else fp32", group="model", choices=PRECISIONS)
    # rank 0 scores and samples alone after each epoch while the others wait
    collective_timeout_min: float = setting(
        15.0, "torchrun: minutes a process waits for the others at a collective before the job "
        "fails (raise it if scoring after an epoch is slower)", group="model", rule=MINUTES,
        flag="--collective-timeout")

    sample_prompts: list[str] = setting(
        help="disease to sample (repeatable); the first --num-validation-samples validation "
        "diseases are added", group="samples", flag="--sample-prompt", metavar="DISEASE",
        factory=lambda: ["Kidney Failure"])
    num_validation_samples: int = setting(
        2, "validation diseases sampled besides --sample-prompt", group="samples", rule=COUNT)
    max_new_tokens: int = setting(
        40, "tokens generated per sample and per symptom-scored answer", group="samples",
        rule=AT_LEAST_ONE)
    symptom_eval: bool = setting(
        True, "score greedy answers for the validation diseases (symptom_precision/recall/f1, "
        "word_f1, and the untuned base's epoch-0 score)", group="samples")
    score_every_epoch: bool = setting(
        False, "score the answers after every epoch, not only the best epoch's at the end "
        "(always so with --select-by symptom_f1)", group="samples")

    experiment: str = setting("medlm", "MLflow experiment name", group="mlflow")
    run_name: str | None = setting(None, "MLflow run name", group="mlflow", shown="MLflow's")
    registered_model: str = setting(
        "medlm", "Model Registry name the best model is registered under", group="mlflow")
    register: bool | None = setting(
        None, "log and register the model (off: smoke runs, metrics and samples only)",
        group="mlflow", shown="on; off with --folds, whose runs estimate")
    promote: bool = setting(
        False, "make this run's version @champion without comparing it (the champion otherwise "
        "moves only to a version better with confidence on the same evaluation key)",
        group="mlflow")
    checkpoint_dir: str = setting(
        "checkpoints", "where each run keeps its resumable state (<dir>/<run id>/; removed "
        "when the run finishes)", group="run")
    log_every_steps: int = setting(
        10, "per-step curves in MLflow (step/training_loss, step/learning_rate, "
        "step/grad_norm, step/tokens_per_sec) every N optimizer steps; 0 = per-epoch metrics "
        "only", group="mlflow", rule=COUNT)
    system_metrics: bool = setting(True, "log CPU, memory and GPU usage (system/* metrics)",
                                   group="mlflow")
    progress: bool = setting(
        True, "progress bars (they are off anyway when stderr is not a TTY)", group="run")

    def __post_init__(self) -> None:
        if self.register is None:  # a cross-validation run estimates; it registers if asked
            self.register = not self.folds
        for declared in fields(self):
            value, rule = getattr(self, declared.name), declared.metadata.get("rule")
            if rule is not None and value is not None:
                rule.check(declared.name, value)
            if declared.metadata.get("choices"):
                _require_choice(declared.name, value, declared.metadata["choices"])
        self._check_combinations()
        check_mlflow_name("experiment", self.experiment)
        check_mlflow_name("registered_model", self.registered_model)

    def _check_combinations(self) -> None:
        """The settings that are each valid but not together."""
        if self.lora_rank == 0 and self.sets_lora_options():
            raise MedLMError("--lora-alpha, --lora-dropout and --lora-modules need --lora-rank: "
                             "expected --lora-rank N (N >= 1) with them, or none of them")
        if self.promote and not self.register:
            raise MedLMError("--promote with --no-register (register off; off by default "
                             "with --folds) is invalid: expected --register with it (an "
                             "unregistered run has no version to promote)")
        if self.fold is not None and not self.fold < self.folds:
            raise MedLMError(f"--fold {self.fold} is invalid: expected "
                             + (f"0 to {self.folds - 1} (--folds {self.folds})" if self.folds
                                else "--folds K beside it (the fold of a K-fold "
                                "cross-validation)"))
        if self.score_every_epoch and not self.symptom_eval:
            raise MedLMError("--score-every-epoch with --no-symptom-eval (scoring off) is "
                             "invalid: expected --symptom-eval with it")
        if self.select_by == "symptom_f1" and not self.symptom_eval:
            raise MedLMError("--select-by symptom_f1 needs the per-epoch symptom scores: "
                             "expected --symptom-eval (not --no-symptom-eval), or --select-by "
                             "validation_loss")

    def sets_lora_options(self) -> bool:
        """Was any adapter setting changed from its default (meaningless without adapters)?"""
        return (self.lora_alpha is not None or bool(self.lora_dropout)
                or self.lora_modules != LORA_MODULES[0])

    @classmethod
    def from_recipe(cls, recipe: str = "default", **settings: Any) -> TrainConfig:
        """The settings of ``recipe`` (a name in ``RECIPES_DIR`` or a .toml file), with
        ``settings`` (the flags a user gave) over them."""
        return cls(recipe=recipe, **{**read_recipe(recipe), **settings})

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """A config saved by ``asdict``; one saved before ``split_seed`` existed split by
        ``seed`` (its recipe is spelled out flag by flag, whatever ``recipe`` says), and one
        saved before ``prompt_format`` existed was trained on plain prompts."""
        if "split_seed" not in saved:  # it scored every epoch, as MedLM then did
            saved = {"split_seed": saved.get("seed", cls.seed), "score_every_epoch": True,
                     **saved}
        return cls(**{"prompt_format": "plain", **saved})  # the only format before there were two

    def to_recipe(self) -> str:
        """The settings that differ from the defaults, as a recipe file: ``--config`` with it
        trains them again. Where and how a run is tracked, checkpointed and run on this
        machine (``NOT_RECIPE``) is no part of it, nor ``recipe``, which says where the
        settings came from."""
        lines = [f"# the settings of a run of recipe {self.recipe!r} that differ from MedLM's "
                 "defaults", "# python -m experiments.run --config recipe.toml"]
        defaults = TrainConfig()
        for declared in fields(self):
            value = getattr(self, declared.name)
            if declared.name not in NOT_RECIPE and value is not None and value != getattr(
                    defaults, declared.name):
                lines.append(f"{declared.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

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
# what this machine runs it on (the flags a resumed run may change), and which fold of a
# cross-validation it held out (its recipe.toml trains the recipe, not the fold)
NOT_RECIPE = frozenset({"recipe", "device", "precision", "collective_timeout_min", "folds",
                        "fold"}
                       | {declared.name for declared in fields(TrainConfig)
                          if declared.metadata["group"] in ("mlflow", "run")})

# the settings that take several values on the command line, one run of a sweep per combination
SWEEPABLE = tuple(declared.name for declared in fields(TrainConfig)
                  if declared.metadata["sweep"])


def sweep_value(value: Any) -> str:
    """A swept value as a child's name and a plot's label show it: 0.0005 as 0.0005, a seed
    as all its digits (numpy's numbers, from a table, alike)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):  # a TOML basic string is a JSON string, non-ASCII left as it is
        return json.dumps(value, ensure_ascii=False)
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def check_mlflow_name(name: str, value: str) -> None:
    """An experiment or registered-model name that MLflow accepts, checked before any run
    starts (a refused model name would otherwise be found at registration, after training,
    and ``--resume`` keeps it). A model name may not hold quotes or backslashes either: the
    registry searches MedLM writes (``name = '...'``) could not quote it."""
    from mlflow.exceptions import MlflowException  # deferred: MLflow takes seconds to import
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    model = name == "registered_model"
    try:
        (_validate_model_name if model else _validate_experiment_name)(value)
        problem = next((f"it holds {char!r}" for char in "'\"\\" if model and char in value),
                       None)
    except MlflowException as error:
        problem = error.message.rstrip(".")
    if problem:
        expected = ("a registered-model name without / : ' \" or \\ (e.g. medlm-smollm2)"
                    if model else "a non-empty MLflow experiment name of at most 500 characters")
        raise MedLMError(f"{flag_of(name)} {shorten(value)!r} is invalid ({problem[:120]}): "
                         f"expected {expected}")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MedLMError(f"{flag_of(name)} {value!r} is invalid: expected one of "
                         f"{', '.join(choices)}")


def setting_kinds() -> dict[str, type]:
    """Each setting's type, None left out: ``int | None`` -> int, ``list[str]`` -> list."""
    kinds = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        if typing.get_origin(hint) is list:
            kinds[name] = list
        else:
            kinds[name] = next(kind for kind in typing.get_args(hint) or (hint,)
                               if kind is not type(None))
    return kinds


def recipe_names() -> tuple[str, ...]:
    """The named recipes: the files of ``RECIPES_DIR``."""
    return tuple(sorted(path.stem for path in RECIPES_DIR.glob("*.toml")))


def recipe_file(recipe: str) -> Path:
    """The file of a named recipe, or ``recipe`` itself when it is a .toml path."""
    if recipe.endswith(".toml"):
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise MedLMError(f"recipe file {recipe!r} does not exist: expected a TOML file of "
                             "settings, such as experiments/recipes/seed-notebook.toml")
        return path
    path = RECIPES_DIR / f"{recipe}.toml"
    if not path.is_file():
        raise MedLMError(f"--recipe {recipe!r} is invalid: expected one of "
                         f"{', '.join(recipe_names())} (or --config FILE.toml)")
    return path


def read_recipe(recipe: str) -> dict[str, Any]:
    """A recipe's settings, checked: each a ``TrainConfig`` field of the field's type."""
    path = recipe_file(recipe).resolve()
    status = path.stat()
    return {name: list(value) if isinstance(value, list) else value
            for name, value in _read_recipe(path, status.st_mtime_ns, status.st_size)}


@functools.cache  # --help reads every named recipe; an edited file is read again
def _read_recipe(path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, Any], ...]:
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
    return tuple(settings.items())


# What a plain ``python -m experiments.search`` varies: the levers the default recipe was
# chosen among (experiments/RESULTS.md), each range holding the default's own value. Not
# loss_on: it changes the tokens the validation loss is over (the default --select-by), so
# trials of both could not be compared by it (``medlm.search.check_comparable``).
DEFAULT_SPACE = {"lr": "1e-4..3e-3:log", "lora_rank": "8,16,32", "warmup_steps": "0..30",
                 "weight_decay": "0..0.1", "epochs": "2..5"}
