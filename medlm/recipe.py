"""One training run, from a config to a registered model, as one object (``Run``: setup ->
train -> register -> cleanup), and what a resumed run needs (its saved settings, the data check,
the command that resumes it).

Sweeps and searches of runs are ``medlm.sweep`` and ``medlm.search``. The MLflow calls are in
``medlm.tracking`` and ``medlm.registry``; the loop (``medlm.train``) imports nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

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
from medlm.metrics import METRIC_VERSION
from medlm.modeling import (
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


def split_for(config: TrainConfig, data: DiseaseData) -> DiseaseSplit:
    """The run's held-out diseases: its fold of ``--folds``, or the ``--validation-fraction``
    split."""
    return split_rows(data.frame, config.validation_fraction, config.split_seed, config.folds,
                      config.fold, config.dataset)


class Run:
    """One training run as one object (torchtune's recipe shape), its state on ``self``:

    - ``setup()``: everything a user could get wrong, checked and loaded before any MLflow run
      (data, split, device, precision, tokenizer, model);
    - ``train()``: one MLflow run through ``fit``, with the epoch report among its loggers;
    - ``register()``: the kept epoch scored, logged and registered, maybe the champion;
    - ``cleanup()``: the checkpoint removed, the run described, its time split shown.

    ``execute()`` runs the last three, the MLflow run open around ``train`` and ``register`` (it
    ends FINISHED, KILLED or FAILED): call them through it, not one by one. A sweep's child, a
    fold and a search's trial are each a ``next()`` of the run before: the same data, device
    and tokenizer, the base loaded again."""

    def __init__(self, config: TrainConfig, started: float | None = None):
        self.config = config  # as asked; train() makes its "auto" settings definite
        self.stopwatch = Stopwatch(started)  # started: when the process began (time.time())
        self.trained = False  # the model has been trained in place: next() loads the base
        self._scope = contextlib.ExitStack()  # the MLflow run, and this process's claim on it

    def setup(self) -> Run:
        config = self.config
        with self.stopwatch.phase("startup"):
            resolve_base_name(config.model)  # a mistyped or missing base before the data loads
            if config.system_metrics:
                import importlib.util

                if importlib.util.find_spec("psutil") is None:  # MLflow fails in start_run
                    raise MedLMError("system metrics need psutil, which is not installed: "
                                     "expected pip install psutil (or pip install -e . again), "
                                     "or --no-system-metrics")
            self.data = load_disease_data(config.dataset, config.max_samples)
            self.split = split_for(config, self.data)  # a split error before the model loads
            # joins torchrun's group, if any
            device = distributed.start(resolve_device(config.device),
                                       config.collective_timeout_min)
            self.precision = resolve_precision(config.precision, device)
            self.tokenizer, self.model = load_tokenizer_and_model(config.model)
            prompt_format = resolve_prompt_format(config.prompt_format, self.tokenizer,
                                                  config.model)
            # every answer the run writes must fit the context: checked now, not after an epoch
            if config.sample_prompts:
                check_prompts_fit(self.model, self.tokenizer, config.sample_prompts,
                                  config.max_new_tokens, prompt_format)
            # whether or not this run writes answers, so that its held-out diseases are those
            # that experiments.evaluate (and a resume) re-create
            if drop_unanswerable(self.data, self.model, self.tokenizer, config.max_new_tokens,
                                 prompt_format):
                self.split = split_for(config, self.data)  # as every later split will be
        return self

    def next(self, config: TrainConfig) -> Run:
        """The next run of a sweep or search (``config``), on this one's data, device and
        tokenizer: the untouched base again where this one trained it, its own split (a fold),
        its time from its own start."""
        run = copy.copy(self)
        run.config, run.trained, run._scope = config, False, contextlib.ExitStack()
        self.model = None  # handed over: one run's model in memory, trained by one run only
        if self.trained or run.model is None:  # else the first of a sweep: its time counts
            run.stopwatch = Stopwatch()  # the process's start-up
            with run.stopwatch.phase("startup"):
                run.model = load_tokenizer_and_model(config.model)[1]
        if config.folds:  # each fold holds out its own diseases
            with run.stopwatch.phase("startup"):
                run.split = split_for(config, self.data)
        return run

    def execute(self, resume_run_id: str | None = None, parent_run_id: str | None = None,
                nested: bool = False, loggers: Sequence[Logger] = (),
                started: Callable[[str], None] = lambda run_id: None) -> dict:
        """``train``, ``register`` and ``cleanup``; returns the run's row of a sweep's table."""
        with self._scope:
            self.train(resume_run_id, parent_run_id, nested, loggers, started)
            self.register()
        return self.cleanup()

    def train(self, resume_run_id: str | None = None, parent_run_id: str | None = None,
              nested: bool = False, loggers: Sequence[Logger] = (),
              started: Callable[[str], None] = lambda run_id: None) -> FitResult:
        """Open the MLflow run (``resume_run_id``: that run again, from its last checkpoint;
        ``parent_run_id`` or ``nested``: a child run) and train it; ``started`` is told the run
        id as soon as there is one; ``loggers`` are told each epoch after the run's own (a
        search's pruner, which may stop the run: ``RunStopped``)."""
        stopwatch, main_process = self.stopwatch, distributed.is_main()
        self.recipe = self.config.to_recipe()  # as asked: "auto" settings stay auto in it
        config = self.config = replace(
            resolve_lora_rank(self.config), prompt_format=resolve_prompt_format(
                self.config.prompt_format, self.tokenizer, self.config.model))
        set_prompt_format(self.model, config.prompt_format)  # generation, scoring, serving
        self.trained, self.resumed = True, bool(resume_run_id)
        self._datasets()
        world_size = distributed.world_size()
        log.info("%s: %d rows (%d dropped) -> %d training / %d validation rows (%d validation "
                 "diseases; %d names grouped with a variant so that none is on both sides); "
                 "%s on %s (%s)%s", config.dataset, len(self.data.frame),
                 self.data.dropped_rows, len(self.train_set), len(self.validation_set),
                 self.held_out_diseases, self.split.grouped_names, config.model,
                 describe_device(self.precision.device), self.precision.name,
                 f", {world_size} processes" if world_size > 1 else "")
        self.tracker = MlflowTracker(config, describe_device(self.precision.device))
        self.params = self._params()
        # Only the main process talks to MLflow and writes files; the others learn the run id.
        mlflow_run = (self.tracker.run(self.params, nested=nested, resume_run_id=resume_run_id,
                                       parent_run_id=parent_run_id,
                                       description=run_description(config))
                      if main_process else contextlib.nullcontext(resume_run_id))
        with stopwatch.phase("logging"):
            self.run_id = distributed.broadcast_object(self._scope.enter_context(mlflow_run))
        log.info("MLflow run %s in experiment %r (%s)", self.run_id, config.experiment,
                 shown_tracking_uri())
        started(self.run_id)
        self.checkpoint = Path(config.checkpoint_dir) / self.run_id
        if main_process:  # this process's until the run ends: a resume elsewhere is refused
            self._scope.enter_context(trained_here(self.checkpoint))
        self.report = EpochReport(self)
        timer = TimeReport(stopwatch, self.tracker)
        try:
            if main_process:
                self._log_start(resume_run_id)
            if main_process and not resume_run_id:
                timer.log_lap(0)  # set-up: start-up, tokenization, baselines, untuned scores
            else:
                stopwatch.lap()  # a resumed run's epochs from here on
            # every epoch is scored where the selection needs it (or it is asked for); else
            # the kept epoch alone, after training
            self.report.every_epoch = config.symptom_eval and (
                config.score_every_epoch or config.select_by == "symptom_f1")
            with noisy_embeddings(self.model, config.neftune_alpha):
                self.result = fit(self.model, (self.train_loader, self.validation_loader),
                                  config, self.precision, self.checkpoint,
                                  Report([self.tracker, self.report, timer, *loggers],
                                         stopwatch))
        except NonFiniteLossError as error:
            error.run_id = self.run_id  # a sweep records which child diverged
            raise
        return self.result

    def _datasets(self) -> None:
        """The tokenized rows, their loaders, and what needs no model (the baselines)."""
        config, tokenizer = self.config, self.tokenizer
        max_length = effective_max_length(config.max_length, self.model)
        with self.stopwatch.phase("tokenization"):
            self.train_set = LanguageDataset(self.split.train, tokenizer, max_length,
                                             config.loss_on,
                                             config.seed if config.shuffle_symptoms else None,
                                             config.prompt_format)
            self.validation_set = LanguageDataset(self.split.validation, tokenizer, max_length,
                                                  config.loss_on,
                                                  prompt_format=config.prompt_format)
        if self.train_set.examples and not self.train_set.targets:
            raise MedLMError(f"--max-length {config.max_length} leaves no token to learn in any "
                             "training row (each is cut that short, its prompt at least): "
                             "expected a longer --max-length, or none (the model's context)")
        loader = functools.partial(make_loader, batch_size=config.batch_size,
                                   pad_token_id=tokenizer.pad_token_id,
                                   pin_memory=self.precision.device_type == "cuda",
                                   loss_on=config.loss_on, shard=distributed.rank(),
                                   num_shards=distributed.world_size())
        self.train_loader = loader(self.train_set, train=True, seed=config.seed,
                                   group_by_length=config.group_by_length)
        self.validation_loader = loader(self.validation_set, train=False)
        self.settings = GenerationSettings(max_new_tokens=config.max_new_tokens, seed=config.seed)
        self.model.generation_config = self.settings.to_generation_config(tokenizer)
        self.base_parameters = None
        if config.lora_rank:  # adapters on the base; the generation settings stay the base's
            self.base_parameters = count_parameters(self.model)
            with self.stopwatch.phase("startup"):
                self.model = add_lora(self.model, config.lora_rank, config.lora_alpha,
                                      config.lora_dropout, config.seed, config.lora_modules)
        with self.stopwatch.phase("scoring"):
            self.baselines = baseline_scores(self.split.train, self.split.validation)
        # the held-out rows' names, each spelling once
        self.validation_names = self.split.validation["Name"].drop_duplicates().tolist()

    @property
    def held_out_diseases(self) -> int:
        """Held-out diseases, told apart case-insensitively."""
        return len({name.casefold() for name in self.validation_names})

    def _params(self) -> dict:
        """The run's MLflow params: every setting, and what the data, split, tokenizer, device
        and libraries were."""
        data, split, device = self.data, self.split, self.precision.device
        return {
            **self.config.to_params(),
            "num_parameters": self.base_parameters or count_parameters(self.model),
            "trainable_parameters": trainable_parameters(self.model),
            "dataset_source": data.source,
            "dataset_path": data.path,  # what experiments.evaluate reads from any directory
            "dataset_file_sha256": data.file_sha256,
            "dataset_content_sha256": data.content_sha256,
            "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
            "metric_version": METRIC_VERSION,
            "rows_read": data.raw_rows,
            "rows_dropped": data.dropped_rows,
            "rows_train": len(self.train_set),
            "rows_validation": len(self.validation_set),
            "rows_truncated": self.train_set.num_truncated + self.validation_set.num_truncated,
            "split_grouped_names": split.grouped_names,
            "split_validation_sha256": split.validation_sha256,
            "split_name_groups": len(split.groups),
            "max_length_effective": max(self.train_set.max_length,
                                        self.validation_set.max_length),
            "device_type": device.type,
            "device_name": describe_device(device),
            "precision_effective": self.precision.name,
            "world_size": distributed.world_size(),
            **library_versions(),
        }

    def _log_start(self, resume_run_id: str | None) -> None:
        """On the main process: a new run's checkpoint directory, datasets, baselines and
        untuned scores; a resumed run's epochs and untuned scores read back."""
        config, tracker, report = self.config, self.tracker, self.report
        if resume_run_id:
            saved = saved_epochs(self.checkpoint)
            tracker.epochs = [EpochResult(**values) for values in saved]
            report.untuned = logged_metrics(resume_run_id, "untuned_")
            log.info("resuming after epoch %d from %s", len(saved), self.checkpoint)
            return
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        (self.checkpoint / "config.json").write_text(json.dumps(asdict(config), indent=2))
        (self.checkpoint / DATA_FILE).write_text(json.dumps(data_fingerprint(self.data,
                                                                             self.split)))
        with self.stopwatch.phase("logging"):
            tracker.log_datasets(self.split.train, self.split.validation, self.data.source)
            tracker.log_recipe(self.recipe)
            tracker.log_baselines(self.baselines)
        for name, (_, scores) in self.baselines.items():
            metrics = scores.as_metrics()
            log.info("baseline %s (no model): symptom F1 %s, word F1 %s", name,
                     interval_text(metrics, "symptom_f1"), interval_text(metrics, "word_f1"))
        if config.symptom_eval:
            self.model.to(self.precision.device)
            with self.stopwatch.phase("scoring"):
                report.score_untuned(self.model)
            tracker.log_untuned(report.untuned)

    def register(self) -> None:
        """The kept epoch scored (where no epoch was as it ended), logged, and registered
        unless told not to; the champion rule's verdict kept for ``cleanup``."""
        config, best, main_process = self.config, self.result.best, distributed.is_main()
        with self.stopwatch.phase("model_logging"):
            self.model = merge_lora(self.model)  # LoRA folded into the base: a plain model
        if config.symptom_eval and not best.scores:
            with self.stopwatch.phase("scoring"):
                if main_process:
                    self.report.score_best(self.model, best)
                best.scores = distributed.broadcast_object(best.scores)
        log.info("best epoch %d by %s: validation loss %.4f%s%s (%d held-out diseases)",
                 best.epoch, config.select_by, best.validation_loss,
                 f", {self.report.compared(best.scores)}" if best.scores else "",
                 " (stopped early)" if self.result.stopped_early else "",
                 self.held_out_diseases)
        self.version, self.verdict = None, "not registered (--no-register)"
        with self.stopwatch.phase("model_logging"):
            forget_random_weights(self.model)  # trained now: a later run may put LoRA on it
            if main_process and not config.register:
                self.tracker.log_best(best)
            elif main_process:
                self.tracker.log_row_losses(self._row_losses(), best.epoch)
                self.version, tags = register(self.tracker, self.model, self.tokenizer, best,
                                              self.params, licence=base_licence(config.model))
                self.verdict = maybe_crown(self.tracker, self.version, tags, config.select_by,
                                           config.promote, fold=bool(config.folds))
        self.time_split = {}
        if main_process:  # telemetry: its failure does not fail a run that has its model
            self.time_split = self.stopwatch.split()
            try:
                self.tracker.log_time_split(self.time_split)
            except Exception as error:  # noqa: BLE001
                log.warning("could not log the time split: %s", error)

    def _row_losses(self):
        """The kept model's loss on each validation row, in one process (all the rows,
        whatever share of them its validation loader holds under torchrun)."""
        per_process = math.ceil(self.config.batch_size / distributed.world_size())  # as it
        rows = make_loader(self.validation_set, per_process,  # validates
                           self.tokenizer.pad_token_id, train=False, loss_on=self.config.loss_on)
        with self.stopwatch.phase("validation"):
            losses = row_losses(self.model, rows, self.precision)
        return validation_loss_table(losses, self.split.validation)

    def cleanup(self) -> dict:
        """After the MLflow run ended FINISHED: nothing to resume any more. Returns the run's
        row of a sweep's table."""
        config, best = self.config, self.result.best
        if distributed.is_main():
            remove_finished(self.checkpoint)
            self.tracker.describe(run_description(config, best, len(self.result.epochs)))
            log.info("%s", self.verdict if self.version is None else
                     f"registered {config.registered_model} version {self.version}; "
                     f"{self.verdict}")
            log.info("time: %s%s", describe_time(self.time_split),
                     " (this process only: the run was resumed)" if self.resumed else "")
        return {"run_id": self.run_id, **{name: getattr(config, name) for name in SWEEPABLE},
                **({"fold": config.fold, **self._reference_scores()} if config.folds else {}),
                "best_epoch": best.epoch, "validation_loss": best.validation_loss,
                **{name: best.scores.get(name, float("nan")) for name in SUMMARY_SCORES},
                "version": self.version}

    def _reference_scores(self) -> dict[str, float]:
        """A fold's ``REFERENCE_SCORES``: its baselines' and untuned base's held-out F1s."""
        scores = {f"baseline_{name}_{score}": answers.as_metrics()[score]
                  for name, (_, answers) in self.baselines.items()
                  for score in ("symptom_f1", "word_f1")}
        scores.update({f"untuned_{score}": self.report.untuned.get(score, float("nan"))
                       for score in ("symptom_f1", "word_f1")})
        return {name: scores.get(name, float("nan")) for name in REFERENCE_SCORES}


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
