"""One training run, from flags to a registered model: setup (``prepare``: data, split,
device, precision, model, every check a user could fail), train (``train_and_register``: one
MLflow run through ``fit`` with the epoch report among its loggers), register (the best epoch's
weights as a model version, maybe the champion), cleanup (the checkpoint removed); and what a
resumed run needs (its saved settings, the data check, the command that resumes it).

Sweeps are ``medlm.sweep``; what ``experiments/run.py`` calls is ``medlm.launch``. The MLflow
calls are in ``medlm.tracking`` and ``medlm.registry``; the loop (``medlm.train``) imports
nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from medlm import distributed
from medlm._paths import check_writable, is_sweep_directory
from medlm.checkpoint import (
    check_readable,
    check_world_size,
    has_checkpoint,
    remove_finished,
    saved_epochs,
    trained_here,
)
from medlm.compare import maybe_crown, validation_loss_table
from medlm.config import AUTO_LORA_RANK, SWEEPABLE, TrainConfig
from medlm.data import DiseaseData, LanguageDataset, load_disease_data, make_loader
from medlm.errors import DiskFull, MedLMError
from medlm.generate import GenerationSettings, check_prompts_fit, drop_unanswerable
from medlm.lora import add_lora, merge_lora, trainable_parameters
from medlm.metrics import METRIC_VERSION, references_by_disease
from medlm.modeling import (
    Precision,
    count_parameters,
    describe_device,
    effective_max_length,
    load_tokenizer_and_model,
    resolve_device,
    resolve_precision,
    tokenizer_sha256,
)
from medlm.offline import (
    base_licence,
    cache_dir,
    forget_random_weights,
    randomly_initialised,
    resolve_base_name,
)
from medlm.prompts import resolve_prompt_format, set_prompt_format
from medlm.registry import register
from medlm.report import EpochReport, TimeReport, run_description
from medlm.scores import REFERENCE_SCORES, SUMMARY_SCORES, baseline_scores, interval_text
from medlm.split import DiseaseSplit, split_rows
from medlm.store import artifact_directory, server_stopped_answering, shown_tracking_uri
from medlm.timing import Stopwatch
from medlm.timing import describe as describe_time
from medlm.tracking import MlflowTracker, library_versions, logged_metrics
from medlm.train import (
    EpochResult,
    FitResult,
    Logger,
    NonFiniteLossError,
    Report,
    fit,
    noisy_embeddings,
    row_losses,
)

log = logging.getLogger("medlm")

DATA_FILE = "data.json"  # beside a checkpoint: the data and split it was trained on


@dataclass
class Prepared:
    """Everything a run needs that a user could get wrong, loaded and checked up front."""

    data: DiseaseData
    split: DiseaseSplit
    device: torch.device
    precision: Precision
    tokenizer: object  # a transformers tokenizer
    model: torch.nn.Module
    stopwatch: Stopwatch = field(default_factory=Stopwatch)  # since set-up began

    def reload_model(self, model: str) -> None:
        """The untouched base again, for the next run of a sweep or search (a run trains
        ``model`` in place); that run's time counts from here, its start-up included."""
        self.stopwatch = Stopwatch()
        with self.stopwatch.phase("startup"):
            self.model = load_tokenizer_and_model(model)[1]


def split_for(config: TrainConfig, data: DiseaseData) -> DiseaseSplit:
    """The run's held-out diseases: its fold of ``--folds``, or the ``--validation-fraction``
    split."""
    return split_rows(data.frame, config.validation_fraction, config.split_seed, config.folds,
                      config.fold, config.dataset)


def prepare(config: TrainConfig, started: float | None = None) -> Prepared:
    """``started``: when the process began (``time.time()``), so that the run's start-up time
    includes the interpreter and the imports; default now."""
    stopwatch = Stopwatch(started)
    with stopwatch.phase("startup"):
        return _prepare(config, stopwatch)


def _prepare(config: TrainConfig, stopwatch) -> Prepared:
    resolve_base_name(config.model)  # a mistyped or missing base fails before the data loads
    if config.system_metrics:
        import importlib.util

        if importlib.util.find_spec("psutil") is None:  # MLflow would fail inside start_run
            raise MedLMError("system metrics need psutil, which is not installed: expected "
                             "pip install psutil (or pip install -e . again), or "
                             "--no-system-metrics")
    data = load_disease_data(config.dataset, config.max_samples)
    split = split_for(config, data)
    # joins torchrun's group, if any
    device = distributed.start(resolve_device(config.device), config.collective_timeout_min)
    precision = resolve_precision(config.precision, device)
    tokenizer, model = load_tokenizer_and_model(config.model)
    prompt_format = resolve_prompt_format(config.prompt_format, tokenizer, config.model)
    # every answer the run writes must fit the context: checked now, not after an epoch
    if config.sample_prompts:
        check_prompts_fit(model, tokenizer, config.sample_prompts, config.max_new_tokens,
                          prompt_format)
    # whether or not this run writes answers, so that its held-out diseases are those that
    # experiments.evaluate (and a resume) re-create
    if drop_unanswerable(data, model, tokenizer, config.max_new_tokens, prompt_format):
        split = split_for(config, data)  # as every later split of these rows will be
    return Prepared(data, split, device, precision, tokenizer, model, stopwatch)


@dataclass
class _RunParts:
    """What one run trains and scores, made from the prepared inputs and the resolved config."""

    model: torch.nn.Module  # the base, with LoRA adapters where the config asks for them
    train_set: object  # medlm.data.LanguageDataset
    validation_set: object
    train_loader: object  # torch DataLoader
    validation_loader: object
    settings: object  # medlm.generate.GenerationSettings of the samples
    base_parameters: int | None  # with LoRA: the base's count, the model registered
    baselines: dict
    validation_names: list[str]  # the held-out rows' names, each spelling once
    recipe: str = ""  # the run's settings as asked, as a recipe file (TrainConfig.to_recipe)

    @property
    def held_out_diseases(self) -> int:
        """Held-out diseases, told apart case-insensitively."""
        return len({name.casefold() for name in self.validation_names})


def _run_parts(config: TrainConfig, prepared: Prepared) -> _RunParts:
    tokenizer, split, model = prepared.tokenizer, prepared.split, prepared.model
    max_length = effective_max_length(config.max_length, model)
    with prepared.stopwatch.phase("tokenization"):
        train_set = LanguageDataset(split.train, tokenizer, max_length, config.loss_on,
                                    config.seed if config.shuffle_symptoms else None,
                                    config.prompt_format)
        validation_set = LanguageDataset(split.validation, tokenizer, max_length, config.loss_on,
                                         prompt_format=config.prompt_format)
    if train_set.examples and not train_set.targets:
        raise MedLMError(f"--max-length {config.max_length} leaves no token to learn in any "
                         "training row (each is cut that short, its prompt at least): expected "
                         "a longer --max-length, or none (the model's context)")
    loader = functools.partial(make_loader, batch_size=config.batch_size,
                               pad_token_id=tokenizer.pad_token_id,
                               pin_memory=prepared.device.type == "cuda", loss_on=config.loss_on,
                               shard=distributed.rank(), num_shards=distributed.world_size())
    train_loader = loader(train_set, train=True, seed=config.seed,
                          group_by_length=config.group_by_length)
    validation_loader = loader(validation_set, train=False)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, seed=config.seed)
    model.generation_config = settings.to_generation_config(tokenizer)
    base_parameters = None
    if config.lora_rank:  # adapters on the base; the generation settings stay the base's

        base_parameters = count_parameters(model)
        with prepared.stopwatch.phase("startup"):
            model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout,
                             config.seed, config.lora_modules)
    with prepared.stopwatch.phase("scoring"):
        baselines = baseline_scores(split.train, split.validation)
    return _RunParts(model, train_set, validation_set, train_loader, validation_loader, settings,
                     base_parameters, baselines,
                     split.validation["Name"].drop_duplicates().tolist())


def _run_params(config: TrainConfig, prepared: Prepared, parts: _RunParts) -> dict:
    """The run's MLflow params: every setting, and what the data, split, tokenizer, device and
    libraries were."""

    data, split, device = prepared.data, prepared.split, prepared.device
    train_set, validation_set = parts.train_set, parts.validation_set
    return {
        **config.to_params(),
        "num_parameters": parts.base_parameters or count_parameters(parts.model),
        "trainable_parameters": trainable_parameters(parts.model),
        "dataset_source": data.source,
        "dataset_path": data.path,  # what experiments.evaluate reads from any directory
        "dataset_file_sha256": data.file_sha256,
        "dataset_content_sha256": data.content_sha256,
        "tokenizer_sha256": tokenizer_sha256(prepared.tokenizer),
        "metric_version": METRIC_VERSION,
        "rows_read": data.raw_rows,
        "rows_dropped": data.dropped_rows,
        "rows_train": len(train_set),
        "rows_validation": len(validation_set),
        "rows_truncated": train_set.num_truncated + validation_set.num_truncated,
        "split_grouped_names": split.grouped_names,
        "split_validation_sha256": split.validation_sha256,
        "split_name_groups": len(split.groups),
        "max_length_effective": max(train_set.max_length, validation_set.max_length),
        "device_type": device.type,
        "device_name": describe_device(device),
        "precision_effective": prepared.precision.name,
        "world_size": distributed.world_size(),
        **library_versions(),
    }


def _log_start(config: TrainConfig, prepared: Prepared, parts: _RunParts) -> None:
    data, world_size = prepared.data, distributed.world_size()
    log.info("%s: %d rows (%d dropped) -> %d training / %d validation rows (%d validation "
             "diseases; %d names grouped with a variant so that none is on both sides); %s on "
             "%s (%s)%s", config.dataset, len(data.frame), data.dropped_rows,
             len(parts.train_set), len(parts.validation_set),
             parts.held_out_diseases,
             prepared.split.grouped_names, config.model, describe_device(prepared.device),
             prepared.precision.name, f", {world_size} processes" if world_size > 1 else "")


def _epoch_report(config: TrainConfig, prepared: Prepared, parts: _RunParts,
                  tracker) -> EpochReport:
    """The run's report: its samples are ``config.sample_prompts`` and the first
    ``config.num_validation_samples`` held-out diseases."""

    prompts = list(dict.fromkeys(
        config.sample_prompts + parts.validation_names[:config.num_validation_samples]))
    references = {key: symptoms for key, (_, symptoms) in
                  references_by_disease(prepared.data.frame).items()}
    return EpochReport(prepared.tokenizer, prompts, references, parts.settings, tracker,
                       prepared.split, parts.baselines, prepared.stopwatch, prepared.precision,
                       describe_device(prepared.device))


def _begin_run(config: TrainConfig, prepared: Prepared, parts: _RunParts, tracker,
               report: EpochReport, checkpoint: Path, resume_run_id: str | None) -> None:
    """On the main process: a new run's checkpoint directory, datasets, baselines and untuned
    scores; a resumed run's epochs and untuned scores read back."""

    if resume_run_id:
        saved = saved_epochs(checkpoint)
        tracker.epochs = [EpochResult(**values) for values in saved]
        report.untuned = logged_metrics(resume_run_id, "untuned_")
        log.info("resuming after epoch %d from %s", len(saved), checkpoint)
        return
    data, split, stopwatch = prepared.data, prepared.split, prepared.stopwatch
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps(asdict(config), indent=2))
    (checkpoint / DATA_FILE).write_text(json.dumps(data_fingerprint(data, split)))
    with stopwatch.phase("logging"):
        tracker.log_datasets(split.train, split.validation, data.source)
        tracker.log_recipe(parts.recipe)
        tracker.log_baselines(parts.baselines)
    for name, (_, scores) in parts.baselines.items():
        metrics = scores.as_metrics()
        log.info("baseline %s (no model): symptom F1 %s, word F1 %s", name,
                 interval_text(metrics, "symptom_f1"), interval_text(metrics, "word_f1"))
    if config.symptom_eval:
        parts.model.to(prepared.device)
        with stopwatch.phase("scoring"):
            report.score_untuned(parts.model)
        tracker.log_untuned(report.untuned)


def _score_kept_epoch(config: TrainConfig, stopwatch, model, best, report: EpochReport,
                      resumed: bool) -> None:
    """Where no epoch was scored as it ended: the kept one, now; a ``resumed`` run may have
    logged them before a kill (the same greedy answers): logged once."""

    if config.symptom_eval and not best.scores:
        with stopwatch.phase("scoring"):
            if distributed.is_main():
                report.score_best(model, best)
            best.scores = distributed.broadcast_object(best.scores)


def _log_model(config: TrainConfig, prepared: Prepared, parts: _RunParts, model, best,
               tracker, params: dict) -> tuple[str | None, str]:
    """The kept epoch's model logged, and registered unless told not to: returns (version or
    None, the champion rule's verdict)."""

    main_process = distributed.is_main()
    version, verdict = None, "not registered (--no-register)"
    with prepared.stopwatch.phase("model_logging"):
        forget_random_weights(model)  # trained now: a later run may put LoRA on it
        if main_process and not config.register:
            tracker.log_best(best)
        elif main_process:
            tracker.log_row_losses(_row_losses(config, prepared, parts, model), best.epoch)
            version, tags = register(tracker, model, prepared.tokenizer, best, params,
                                     config.select_by, licence=base_licence(config.model))
            verdict = maybe_crown(tracker, version, tags, config.select_by, config.promote,
                                  fold=bool(config.folds))
    return version, verdict


def _row_losses(config: TrainConfig, prepared: Prepared, parts: _RunParts, model):
    """The kept model's loss on each validation row, in one process (all the rows, whatever
    share of them its validation loader holds under torchrun)."""
    per_process = math.ceil(config.batch_size / distributed.world_size())  # as it validates
    rows = make_loader(parts.validation_set, per_process, prepared.tokenizer.pad_token_id,
                       train=False, loss_on=config.loss_on)
    with prepared.stopwatch.phase("validation"):
        losses = row_losses(model, rows, prepared.precision)
    return validation_loss_table(losses, prepared.split.validation)


def train_and_register(config: TrainConfig, prepared: Prepared, nested: bool = False,
                       resume_run_id: str | None = None,
                       started: Callable[[str], None] = lambda run_id: None,
                       parent_run_id: str | None = None, loggers: Sequence[Logger] = ()) -> dict:
    """One training run in MLflow, from prepared inputs to a registered model version; with
    ``resume_run_id``, that run continues from its last checkpoint. ``started`` is told the
    run id as soon as there is one (a sweep records which child is in progress);
    ``parent_run_id``: the run is its child (a search's trial); ``loggers`` are told each
    epoch after the run's own (a search's pruner, which may stop the run: ``RunStopped``)."""
    stopwatch, main_process = prepared.stopwatch, distributed.is_main()
    recipe = config.to_recipe()  # as asked: "auto" settings stay auto in the recipe
    config = replace(resolve_lora_rank(config), prompt_format=resolve_prompt_format(
        config.prompt_format, prepared.tokenizer, config.model))
    set_prompt_format(prepared.model, config.prompt_format)  # generation, scoring, serving
    parts = replace(_run_parts(config, prepared), recipe=recipe)
    _log_start(config, prepared, parts)
    tracker = MlflowTracker(config.experiment, config.run_name, config.registered_model,
                            transformer=config.model, gpu=describe_device(prepared.device),
                            batch_size=config.batch_size, select_by=config.select_by,
                            system_metrics=config.system_metrics)
    params = _run_params(config, prepared, parts)
    # Only the main process talks to MLflow and writes files; the others learn the run id.
    run = (tracker.run(params, nested=nested, resume_run_id=resume_run_id,
                       parent_run_id=parent_run_id, description=run_description(config))
           if main_process else contextlib.nullcontext(resume_run_id))
    with contextlib.ExitStack() as run_scope:
        with stopwatch.phase("logging"):
            run_id = distributed.broadcast_object(run_scope.enter_context(run))
        log.info("MLflow run %s in experiment %r (%s)", run_id, config.experiment,
                 shown_tracking_uri())
        started(run_id)
        checkpoint = Path(config.checkpoint_dir) / run_id
        if main_process:  # this process's until the run ends: a resume elsewhere is refused
            run_scope.enter_context(trained_here(checkpoint))
        report = _epoch_report(config, prepared, parts, tracker)
        result = _train(config, prepared, parts, tracker, report, checkpoint, resume_run_id,
                        loggers)
        best = result.best
        with stopwatch.phase("model_logging"):
            model = merge_lora(parts.model)  # LoRA folded into the base: a plain model
        _score_kept_epoch(config, stopwatch, model, best, report, bool(resume_run_id))
        log.info("best epoch %d by %s: validation loss %.4f%s%s (%d held-out diseases)",
                 best.epoch, config.select_by, best.validation_loss,
                 f", {report.compared(best.scores)}" if best.scores else "",
                 " (stopped early)" if result.stopped_early else "",
                 parts.held_out_diseases)
        version, verdict = _log_model(config, prepared, parts, model, best, tracker, params)
        split_seconds = _log_time_split(tracker, stopwatch) if main_process else {}
    if main_process:  # the run has ended FINISHED: nothing to resume any more
        remove_finished(checkpoint)
        tracker.describe(run_description(config, best, len(result.epochs)))
        log.info("%s", verdict if version is None else
                 f"registered {config.registered_model} version {version}; {verdict}")
        log.info("time: %s%s", describe_time(split_seconds),
                 " (this process only: the run was resumed)" if resume_run_id else "")
    return {"run_id": run_id, **{name: getattr(config, name) for name in SWEEPABLE},
            **({"fold": config.fold, **_reference_scores(parts, report)} if config.folds else {}),
            "best_epoch": best.epoch, "validation_loss": best.validation_loss,
            **{name: best.scores.get(name, float("nan")) for name in SUMMARY_SCORES},
            "version": version}


def _reference_scores(parts: _RunParts, report: EpochReport) -> dict[str, float]:
    """A fold's ``REFERENCE_SCORES``: its baselines' and untuned base's held-out F1s."""
    scores = {f"baseline_{name}_{score}": answers.as_metrics()[score]
              for name, (_, answers) in parts.baselines.items()
              for score in ("symptom_f1", "word_f1")}
    scores.update({f"untuned_{score}": report.untuned.get(score, float("nan"))
                   for score in ("symptom_f1", "word_f1")})
    return {name: scores.get(name, float("nan")) for name in REFERENCE_SCORES}


def _train(config: TrainConfig, prepared: Prepared, parts: _RunParts, tracker: MlflowTracker,
           report: EpochReport, checkpoint: Path, resume_run_id: str | None,
           loggers: Sequence[Logger] = ()) -> FitResult:
    """The run's set-up logging (a new run's datasets, baselines and untuned scores; a resumed
    run's epochs read back), then ``fit``, which tells ``loggers`` each epoch after the run's
    own; a Ctrl-C says how to resume."""
    stopwatch, main_process = prepared.stopwatch, distributed.is_main()
    timer = TimeReport(stopwatch, tracker)
    # every epoch is scored where the selection needs it (or it is asked for); else the kept
    # epoch alone, after training
    score_epochs = config.symptom_eval and (config.score_every_epoch
                                            or config.select_by == "symptom_f1")
    try:
        if main_process:
            _begin_run(config, prepared, parts, tracker, report, checkpoint, resume_run_id)
        if main_process and not resume_run_id:
            timer.log_lap(0)  # set-up: start-up, tokenization, baselines, untuned scores
        else:
            stopwatch.lap()  # a resumed run's epochs from here on
        report.every_epoch = score_epochs
        with noisy_embeddings(parts.model, config.neftune_alpha):
            return fit(parts.model, (parts.train_loader, parts.validation_loader), config,
                       prepared.precision, checkpoint,
                       Report([tracker, report, timer, *loggers], stopwatch))
    except NonFiniteLossError as error:
        error.run_id = checkpoint.name  # a sweep records which child diverged
        raise


def _log_time_split(tracker: MlflowTracker, stopwatch: Stopwatch) -> dict[str, float]:
    """Where the run's time went, logged; telemetry, so its failure does not fail a run that
    has its model."""
    split_seconds = stopwatch.split()
    try:
        tracker.log_time_split(split_seconds)
    except Exception as error:  # noqa: BLE001
        log.warning("could not log the time split: %s", error)
    return split_seconds


def resume_command(run_id: str, checkpoint_dir: str, world_size: int) -> str:
    """The command that continues run (or sweep) ``run_id``."""
    launcher = ("python" if world_size == 1 else
                f"torchrun <the same options: {world_size} processes in all>")
    where = ("" if checkpoint_dir == TrainConfig().checkpoint_dir
             else f" --checkpoint-dir {shlex.quote(checkpoint_dir)}")
    return f"{launcher} -m experiments.run --resume {run_id}{where}"


def resume_config(run_id: str, checkpoint_dir: str) -> TrainConfig:
    """The interrupted run's own settings, as saved beside its checkpoint; checked before the
    MLflow run is reopened, so a wrong process count does not mark it FAILED, and before the
    data and model load, so a damaged checkpoint file is named in a second."""

    saved = Path(checkpoint_dir) / run_id / "config.json"
    if not (saved.is_file() and has_checkpoint(saved.parent)):
        runs = sorted([path.parent.name for path in Path(checkpoint_dir).glob("*/config.json")
                       if has_checkpoint(path.parent)]
                      + [f"{path.parent.name} (a sweep)" for path in Path(checkpoint_dir)
                         .glob(f"*/{DATA_FILE}") if is_sweep_directory(path.parent)])
        raise MedLMError(f"--resume {run_id!r}: no checkpoint in {saved.parent} (resumable runs "
                         f"here: {', '.join(runs) or 'none'}): expected the id of a run "
                         "interrupted after at least one epoch")
    check_world_size(saved.parent, distributed.environment_world_size())
    check_readable(saved.parent)
    return TrainConfig.from_saved(json.loads(saved.read_text()))


def on_this_machine(config: TrainConfig, machine: dict[str, str], run_id: str) -> TrainConfig:
    """A resumed run's config with this machine's ``--device``, ``--precision`` and progress
    bars (``machine``), said in one line where the first two differ from the run's own."""
    changed = {name: value for name, value in machine.items()
               if name in ("device", "precision") and getattr(config, name) != value}
    if changed:
        log.info("resuming %s with %s (it ran with %s)", run_id,
                 ", ".join(f"--{name} {value}" for name, value in changed.items()),
                 ", ".join(f"--{name} {getattr(config, name)}" for name in changed))
    return replace(config, **machine)


def data_fingerprint(data, split) -> dict[str, str]:
    """What a checkpoint was trained on: the cleaned dataset's content and the validation names."""
    return {"dataset_content_sha256": data.content_sha256,
            "split_validation_sha256": split.validation_sha256}


def check_resume_data(checkpoint: Path, data, split) -> None:
    """A run resumes only on the rows and the split it was trained and validated on (a changed
    dataset file, or a checkpoint of an older MedLM with another split rule, would silently mix
    two experiments in one run)."""
    saved = checkpoint / DATA_FILE
    try:
        recorded = json.loads(saved.read_text())
    except (OSError, ValueError):
        recorded = {}
    expected = data_fingerprint(data, split)
    changed = [key for key, value in expected.items() if recorded.get(key) != value]
    if changed:
        what = ("the dataset's content changed" if "dataset_content_sha256" in changed
                else "another split of the data")
        found = ", ".join(f"{key} {str(recorded.get(key, 'missing'))[:12]} vs "
                          f"{expected[key][:12]}" for key in changed)
        raise MedLMError(f"--resume {checkpoint.name!r}: the checkpoint was trained on other data "
                         f"({what}: {found}): expected the same dataset and split; "
                         "start a new run instead")


def resolve_lora_rank(config: TrainConfig) -> TrainConfig:
    """``lora_rank=None`` made definite: LoRA adapters (``AUTO_LORA_RANK``) on a pretrained
    base; every weight on a base with random weights (``experiments.init_model`` marks its
    config), since adapters on frozen random weights would learn nothing."""

    if config.lora_rank is not None:
        return config
    if randomly_initialised(config.model):
        if config.sets_lora_options():
            raise MedLMError(f"--lora-alpha, --lora-dropout and --lora-modules need LoRA, and "
                             f"{config.model} has random weights, which the default trains all "
                             "of: expected --lora-rank N with them, or none of them")
        log.info("training every weight: %s has random weights (experiments.init_model), and "
                 "LoRA adapters on frozen random weights would learn nothing", config.model)
        return replace(config, lora_rank=0)
    log.info("training LoRA adapters of rank %d on the pretrained base %s (--lora-rank 0: "
             "every weight)", AUTO_LORA_RANK, config.model)
    return replace(config, lora_rank=AUTO_LORA_RANK)


def check_output_paths(config: TrainConfig) -> None:
    """Every place the run will write checked before any work, like a flag."""

    check_writable(config.checkpoint_dir, "--checkpoint-dir")
    try:  # a read-only cache is fine (a shared, pre-filled one): nothing new is kept, said once
        check_writable(cache_dir(), "$MEDLM_CACHE (bases and untuned answers)")
    except (MedLMError, RuntimeError) as error:  # RuntimeError: no home directory
        log.warning("WARNING: %s; the run goes on, without keeping what it could reuse", error)
    artifacts = artifact_directory(config.experiment)
    if artifacts is not None:
        check_writable(artifacts, f"experiment {config.experiment!r}'s artifact location")


@contextlib.contextmanager
def resumable_failures(checkpoint_dir: str, run_ids: list[str]) -> Iterator[None]:
    """A tracking server that stops answering mid-run, or a disk that fills up, costs nothing
    computed: the error is one line saying so and how to finish (the checkpoint stays;
    ``--resume`` logs what the server missed once it is back). ``run_ids``: the run's (a
    sweep's: its parent's) id once there is one."""

    def resume() -> str | None:
        """The command that finishes the run; None where nothing of it was checkpointed."""
        sweep = bool(run_ids) and is_sweep_directory(Path(checkpoint_dir) / run_ids[0])
        if run_ids and (sweep or has_checkpoint(Path(checkpoint_dir) / run_ids[0])):
            return resume_command(run_ids[0], checkpoint_dir, distributed.world_size())
        return None

    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, at any moment (a sweep says its own)
        if run_ids and not is_sweep_directory(Path(checkpoint_dir) / run_ids[0]):
            if command := resume():
                log.warning("stopped; the last completed epoch is checkpointed in %s. Resume "
                            "with: %s", Path(checkpoint_dir) / run_ids[0], command)
            else:
                log.warning("stopped before the first epoch ended: nothing to resume")
        raise
    except DiskFull as error:
        command = resume()
        raise MedLMError(f"{error}, then " + (f"finish the run with {command}" if command
                                              else "start the run again")) from None
    except MedLMError:
        raise
    except Exception as error:
        if not server_stopped_answering():
            raise
        where = f"the tracking server {shown_tracking_uri()} stopped answering"
        if (command := resume()) is None:
            raise MedLMError(f"{where} ({type(error).__name__}) before a first epoch was "
                             "checkpointed: expected the server back: then start the run "
                             "again") from None
        raise MedLMError(f"{where} during run {run_ids[0]} ({type(error).__name__}): the "
                         f"completed epochs are checkpointed under {checkpoint_dir}; expected "
                         f"the server back: then finish the run with {command}") from None
