"""One training run as one object (``Run``: setup -> train -> register -> cleanup), and what a
resumed run needs: its saved settings, the data check, the command that resumes it."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import math
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from medlm import checkpoint, distributed, modeling, offline, timing
from medlm._paths import check_writable, is_sweep_directory
from medlm.compare import maybe_crown, validation_loss_table
from medlm.config import AUTO_LORA_RANK, SWEEPABLE, TrainConfig
from medlm.data import DiseaseData, LanguageDataset, load_disease_data, make_loader
from medlm.errors import DiskFull, MedLMError
from medlm.generate import GenerationSettings, check_prompts_fit, drop_unanswerable
from medlm.lora import add_lora, merge_lora, trainable_parameters
from medlm.metrics import METRIC_VERSION
from medlm.prompts import resolve_prompt_format, set_prompt_format
from medlm.registry import register
from medlm.report import EpochReport, run_description, run_name
from medlm.scores import REFERENCE_SCORES, SUMMARY_SCORES, baseline_scores, interval_text
from medlm.split import DiseaseSplit, split_rows
from medlm.store import artifact_directory, server_stopped_answering, shown_tracking_uri
from medlm.tracking import MlflowTracker, library_versions, logged_metrics
from medlm.train import (
    EpochResult,
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
    """The run's held-out diseases: its fold of ``--folds``, or the ``--validation-fraction``."""
    return split_rows(data.frame, config.validation_fraction, config.split_seed, config.folds,
                      config.fold, config.dataset)


class Run(Logger):
    """One training run (torchtune's recipe shape), its state on ``self``: ``setup()`` ->
    ``train()`` -> ``register()`` -> ``cleanup()``; ``with run:`` around ``train`` and
    ``register`` ends the MLflow run FINISHED, KILLED or FAILED. ``next()``: the next run."""

    def __init__(self, config: TrainConfig, started: float | None = None):
        self.config = config  # setup() and next() make its "auto" settings definite
        self.stopwatch = timing.Stopwatch(started)  # started: when the process began (time.time())
        self.trained = False  # the model has been trained in place: next() loads the base
        self._scope = contextlib.ExitStack()  # the MLflow run, and this process's claim on it

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *error) -> bool:
        return self._scope.__exit__(*error)

    def setup(self) -> Run:
        """Load and check all a user could get wrong, before any MLflow run."""
        config = self.config
        with self.stopwatch.phase("startup"):
            offline.resolve_base_name(config.model)  # a missing base before the data loads
            if config.system_metrics and importlib.util.find_spec("psutil") is None:
                raise MedLMError("system metrics need psutil, which is not installed: "
                                 "expected pip install psutil (or pip install -e . again), "
                                 "or --no-system-metrics")
            self.data = load_disease_data(config.dataset, config.max_samples)
            self.split = split_for(config, self.data)  # a split error before the model loads
            device = distributed.start(modeling.resolve_device(config.device),
                                       config.collective_timeout_min)  # joins torchrun's group
            self.precision = modeling.resolve_precision(config.precision, device, config.tf32)
            modeling.set_deterministic(config.deterministic, device)
            if config.system_metrics and device.type == "cuda" and (
                    importlib.util.find_spec("pynvml") is None):  # MLflow says so at DEBUG only
                log.warning("WARNING: no GPU system metrics (system/gpu_*): MLflow reads them "
                            "through nvidia-ml-py, which is not installed: pip install -e "
                            "'.[gpu]' (or pip install nvidia-ml-py)")
            self.tokenizer, self.model = modeling.load_tokenizer_and_model(config.model)
            config = self._decide(config)
            if config.sample_prompts:  # every answer must fit the context: checked now
                check_prompts_fit(self.model, self.tokenizer, config.sample_prompts,
                                  config.max_new_tokens, config.prompt_format)
            # answers or not, the held-out diseases experiments.evaluate (and a resume) re-create
            if drop_unanswerable(self.data, self.model, self.tokenizer, config.max_new_tokens,
                                 config.prompt_format):
                self.split = split_for(config, self.data)
        return self

    def _decide(self, config: TrainConfig) -> TrainConfig:
        """The one place a run's "auto" settings (LoRA rank, prompt format) and its name (by
        what it is, where no --run-name, sweep or search names it) become definite, in
        ``self.config``; its recipe file keeps the decided rank and the asked format."""
        config = resolve_lora_rank(config)
        self.recipe = config.to_recipe()
        config = replace(config, prompt_format=resolve_prompt_format(
            config.prompt_format, self.tokenizer, config.model))
        self.config = replace(config, run_name=config.run_name or run_name(config))
        return self.config

    def next(self, config: TrainConfig) -> Run:
        """The next run of a sweep or search (``config``) on this one's data, device and
        tokenizer: the untouched base again, its own split (a fold), its time its own."""
        run = copy.copy(self)
        run.trained, run._scope = False, contextlib.ExitStack()
        run._decide(config)
        self.model = None  # handed over: one run's model in memory, trained by one run only
        if self.trained or run.model is None:  # else the first of a sweep: its time counts
            run.stopwatch = timing.Stopwatch()  # the process's start-up
            with run.stopwatch.phase("startup"):
                run.model = modeling.load_tokenizer_and_model(config.model)[1]
        if config.folds:  # each fold holds out its own diseases
            with run.stopwatch.phase("startup"):
                run.split = split_for(config, self.data)
        return run

    def execute(self, **options) -> dict:
        """``train(**options)``, ``register``, ``cleanup`` (a search's trial); the run's row."""
        with self:
            self.train(**options)
            self.register()
        return self.cleanup()

    def train(self, resume_run_id: str | None = None, parent_run_id: str | None = None,
              nested: bool = False, loggers: Sequence[Logger] = (),
              started: Callable[[str], None] = lambda run_id: None) -> None:
        """Open the MLflow run (``resume_run_id``: that run again, from its last checkpoint;
        ``parent_run_id`` or ``nested``: a child) and train it; ``started`` is told the run id
        at once; ``loggers`` hear each epoch after the run's own (a search's pruner)."""
        config, stopwatch, main_process = self.config, self.stopwatch, distributed.is_main()
        set_prompt_format(self.model, config.prompt_format)  # generation, scoring, serving
        self.trained, self.resumed = True, bool(resume_run_id)
        self._datasets()
        device = modeling.describe_device(self.precision.device)
        processes = distributed.world_size()
        log.info("%s: %d rows (%d dropped) -> %d training / %d validation rows (%d validation "
                 "diseases; %d names grouped with a variant so that none is on both sides); "
                 "%s on %s (%s)%s", config.dataset, len(self.data.frame),
                 self.data.dropped_rows, len(self.train_set), len(self.validation_set),
                 self.held_out_diseases, self.split.grouped_names, config.model, device,
                 self.precision.name, f", {processes} processes" if processes > 1 else "")
        self.tracker = MlflowTracker(config, device)
        self.params = self._params()
        # only the main process talks to MLflow and writes files; the others learn the run id
        mlflow_run = (self.tracker.run(self.params, nested=nested, resume_run_id=resume_run_id,
                                       parent_run_id=parent_run_id,
                                       description=run_description(config))
                      if main_process else contextlib.nullcontext(resume_run_id))
        with stopwatch.phase("logging"):
            self.run_id = distributed.broadcast_object(self._scope.enter_context(mlflow_run))
        log.info("MLflow run %s %r in experiment %r (%s)", self.run_id,
                 self.tracker.run_name or config.run_name, config.experiment, shown_tracking_uri())
        started(self.run_id)
        self.checkpoint = Path(config.checkpoint_dir) / self.run_id
        if main_process:  # this process's until the run ends: a resume elsewhere is refused
            self._scope.enter_context(checkpoint.trained_here(self.checkpoint))
        self.report = EpochReport(self)
        try:
            if main_process:
                self._log_start(resume_run_id)
            set_up = stopwatch.lap()  # start-up to untuned scores; a resumed run's, not logged
            if main_process and not resume_run_id:
                self.tracker.log_time(set_up, 0)
            with noisy_embeddings(self.model, config.neftune_alpha):
                self.result = fit(self.model, (self.train_loader, self.validation_loader),
                                  config, self.precision, self.checkpoint,
                                  Report([self.tracker, self.report, self, *loggers], stopwatch))
        except NonFiniteLossError as error:
            error.run_id = self.run_id  # a sweep records which child diverged
            raise

    def on_epoch_end(self, model, result) -> None:
        """The epoch's wall time by phase (``time/*``), after the run's other loggers."""
        self.tracker.log_time(self.stopwatch.lap(), result.epoch)

    def _datasets(self) -> None:
        """The tokenized rows, their loaders, LoRA, and the answers that need no model."""
        config = self.config
        dataset = functools.partial(
            LanguageDataset, tokenizer=self.tokenizer, loss_on=config.loss_on,
            max_length=modeling.effective_max_length(config.max_length, self.model),
            prompt_format=config.prompt_format)
        with self.stopwatch.phase("tokenization"):
            self.train_set = dataset(self.split.train, shuffle_symptoms_seed=(
                config.seed if config.shuffle_symptoms else None))
            self.validation_set = dataset(self.split.validation)
        if self.train_set.examples and not self.train_set.targets:
            raise MedLMError(f"--max-length {config.max_length} leaves no token to learn in any "
                             "training row (each is cut that short, its prompt at least): "
                             "expected a longer --max-length, or none (the model's context)")
        loader = functools.partial(make_loader, config=config, shard=distributed.rank(),
                                   pin_memory=self.precision.device_type == "cuda",
                                   num_shards=distributed.world_size())
        self.train_loader = loader(self.train_set, train=True)
        self.validation_loader = loader(self.validation_set, train=False)
        self.settings = GenerationSettings(max_new_tokens=config.max_new_tokens, seed=config.seed)
        self.model.generation_config = self.settings.to_generation_config(self.tokenizer)
        self.base_parameters = modeling.count_parameters(self.model)
        if config.lora_rank:  # adapters on the base; the generation settings stay the base's
            with self.stopwatch.phase("startup"):
                self.model = add_lora(self.model, config.lora_rank, config.lora_alpha,
                                      config.lora_dropout, config.seed, config.lora_modules)
        with self.stopwatch.phase("scoring"):
            self.baselines = baseline_scores(self.split.train, self.split.validation)
        self.validation_names = self.split.validation["Name"].drop_duplicates().tolist()
        self.held_out_diseases = len({name.casefold() for name in self.validation_names})

    def _params(self) -> dict:
        """The MLflow params: every setting, and the data, split, tokenizer, device, libraries."""
        data, split, device = self.data, self.split, self.precision.device
        train_set, validation_set = self.train_set, self.validation_set
        return {
            **self.config.to_params(),
            "num_parameters": self.base_parameters,
            "trainable_parameters": trainable_parameters(self.model),
            "dataset_source": data.source,
            "dataset_path": data.path,  # what experiments.evaluate reads from any directory
            "dataset_file_sha256": data.file_sha256, "dataset_content_sha256": data.content_sha256,
            "tokenizer_sha256": modeling.tokenizer_sha256(self.tokenizer),
            "metric_version": METRIC_VERSION,
            "rows_read": data.raw_rows, "rows_dropped": data.dropped_rows,
            "rows_train": len(train_set), "rows_validation": len(validation_set),
            "rows_truncated": train_set.num_truncated + validation_set.num_truncated,
            "split_grouped_names": split.grouped_names, "split_name_groups": len(split.groups),
            "split_validation_sha256": split.validation_sha256,
            "max_length_effective": max(train_set.max_length, validation_set.max_length),
            "device_type": device.type, "device_name": modeling.describe_device(device),
            "precision_effective": self.precision.name, "tf32_effective": self.precision.tf32,
            "world_size": distributed.world_size(),
            **library_versions(),
        }

    def _log_start(self, resume_run_id: str | None) -> None:
        """What a new run writes and logs before its first epoch; what a resumed run reads back."""
        config, tracker, report = self.config, self.tracker, self.report
        if resume_run_id:
            saved = checkpoint.saved_epochs(self.checkpoint)
            tracker.epochs = [EpochResult(**values) for values in saved]
            report.untuned = logged_metrics(resume_run_id, "untuned_")
            log.info("resuming after epoch %d from %s", len(saved), self.checkpoint)
            settings = json.loads((self.checkpoint / "config.json").read_text())
            if settings["epochs"] != config.epochs:  # a new --epochs: a later resume keeps it
                checkpoint.write_durably(self.checkpoint / "config.json", json.dumps(
                    {**settings, "epochs": config.epochs}, indent=2))
            return
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        (self.checkpoint / "config.json").write_text(json.dumps(asdict(config), indent=2))
        (self.checkpoint / DATA_FILE).write_text(
            json.dumps(data_fingerprint(self.data, self.split)))
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
        """The kept epoch scored (where no epoch was as it ended), logged, and registered."""
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
                 " (stopped early)" if self.result.stopped_early else "", self.held_out_diseases)
        self.version, self.verdict = None, "not registered (--no-register)"
        with self.stopwatch.phase("model_logging"):
            offline.forget_random_weights(self.model)  # a later run may put LoRA on it
            if main_process and not config.register:
                self.tracker.log_best(best)
            elif main_process:
                # each validation row's loss, all rows in one process, batched as it validates
                per_process = math.ceil(config.batch_size / distributed.world_size())
                rows = make_loader(self.validation_set, replace(config, batch_size=per_process),
                                   train=False)
                with self.stopwatch.phase("validation"):
                    losses = row_losses(self.model, rows, self.precision)
                self.tracker.log_row_losses(validation_loss_table(losses, self.split.validation),
                                            best.epoch)
                self.version, tags = register(self.tracker, self.model, self.tokenizer, best,
                                              self.params, offline.base_licence(config.model))
                self.verdict = maybe_crown(self.tracker, self.version, tags, config.select_by,
                                           config.promote, fold=bool(config.folds))
        self.time_split = self.stopwatch.split()
        if main_process:  # telemetry: its failure does not fail a run that has its model
            try:
                self.tracker.log_time_split(self.time_split)
            except Exception as error:  # noqa: BLE001
                log.warning("could not log the time split: %s", error)

    def cleanup(self) -> dict:
        """After the MLflow run ended FINISHED: nothing to resume. The run's row of a sweep."""
        config, best = self.config, self.result.best
        if distributed.is_main():
            checkpoint.remove_finished(self.checkpoint)
            self.tracker.describe(run_description(config, best, len(self.result.epochs)))
            log.info("%s", self.verdict if self.version is None else
                     f"registered {config.registered_model} version {self.version}; {self.verdict}")
            log.info("time: %s%s", timing.describe(self.time_split),
                     " (this process only: the run was resumed)" if self.resumed else "")
        # a fold's row has its baselines' and untuned base's held-out F1s (REFERENCE_SCORES)
        references = {f"untuned_{score}": value for score, value in self.report.untuned.items()}
        for name, (_, answers) in self.baselines.items():
            references.update(answers.as_metrics(f"baseline_{name}_"))
        return {"run_id": self.run_id, **{name: getattr(config, name) for name in SWEEPABLE},
                **({"fold": config.fold, **{name: references.get(name, math.nan)
                                            for name in REFERENCE_SCORES}}
                   if config.folds else {}),
                "best_epoch": best.epoch, "validation_loss": best.validation_loss,
                **{name: best.scores.get(name, math.nan) for name in SUMMARY_SCORES},
                "version": self.version}


def resume_command(run_id: str, checkpoint_dir: str, world_size: int) -> str:
    """The command that continues run (or sweep) ``run_id``."""
    launcher = ("python" if world_size == 1 else
                f"torchrun <the same options: {world_size} processes in all>")
    where = ("" if checkpoint_dir == TrainConfig().checkpoint_dir
             else f" --checkpoint-dir {shlex.quote(checkpoint_dir)}")
    return f"{launcher} -m experiments.run --resume {run_id}{where}"


def resume_config(run_id: str, checkpoint_dir: str) -> TrainConfig:
    """The interrupted run's own settings, saved beside its checkpoint; checked before the
    MLflow run reopens (a wrong process count does not mark it FAILED) and before anything
    loads (a damaged checkpoint file is named in a second)."""
    saved = Path(checkpoint_dir) / run_id / "config.json"
    if not (saved.is_file() and checkpoint.has_checkpoint(saved.parent)):
        runs = sorted([path.parent.name for path in Path(checkpoint_dir).glob("*/config.json")
                       if checkpoint.has_checkpoint(path.parent)]
                      + [f"{path.parent.name} (a sweep)" for path in Path(checkpoint_dir)
                         .glob(f"*/{DATA_FILE}") if is_sweep_directory(path.parent)])
        raise MedLMError(f"--resume {run_id!r}: no checkpoint in {saved.parent} (resumable runs "
                         f"here: {', '.join(runs) or 'none'}): expected the id of a run "
                         "interrupted after at least one epoch")
    checkpoint.check_world_size(saved.parent, distributed.environment_world_size())
    return TrainConfig.from_saved(json.loads(saved.read_text()))


def data_fingerprint(data, split) -> dict[str, str]:
    """What a checkpoint was trained on: the cleaned dataset's content and the validation names."""
    return {"dataset_content_sha256": data.content_sha256,
            "split_validation_sha256": split.validation_sha256}


def check_resume_data(directory: Path, data, split) -> None:
    """A run resumes only on the rows and split it was trained on, never two experiments in one."""
    try:
        recorded = json.loads((directory / DATA_FILE).read_text())
    except (OSError, ValueError):
        recorded = {}
    expected = data_fingerprint(data, split)
    if changed := [key for key, value in expected.items() if recorded.get(key) != value]:
        what = ("the dataset's content changed" if "dataset_content_sha256" in changed
                else "another split of the data")
        found = ", ".join(f"{key} {str(recorded.get(key, 'missing'))[:12]} vs "
                          f"{expected[key][:12]}" for key in changed)
        raise MedLMError(f"--resume {directory.name!r}: the checkpoint was trained on other data "
                         f"({what}: {found}): expected the same dataset and split; "
                         "start a new run instead")


def resolve_lora_rank(config: TrainConfig) -> TrainConfig:
    """``lora_rank=None`` made definite: ``AUTO_LORA_RANK`` on a pretrained base; every weight
    on one with random weights (``experiments.init_model``), where adapters learn nothing."""
    if config.lora_rank is not None:
        return config
    if offline.randomly_initialised(config.model):
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
        check_writable(offline.cache_dir(), "$MEDLM_CACHE (bases and untuned answers)")
    except (MedLMError, RuntimeError) as error:  # RuntimeError: no home directory
        log.warning("WARNING: %s; the run goes on, without keeping what it could reuse", error)
    if (artifacts := artifact_directory(config.experiment)) is not None:
        check_writable(artifacts, f"experiment {config.experiment!r}'s artifact location")


@contextlib.contextmanager
def resumable_failures(checkpoint_dir: str, run_ids: list[str]) -> Iterator[None]:
    """A tracking server that stops answering mid-run, or a full disk, costs nothing computed:
    one line says how to finish (``--resume``, which logs what the server missed). ``run_ids``:
    the run's (a sweep's: its parent's) id once there is one."""

    def resume() -> str | None:  # None where nothing of the run was checkpointed
        directory = Path(checkpoint_dir) / run_ids[0] if run_ids else None
        if directory and (is_sweep_directory(directory) or checkpoint.has_checkpoint(directory)):
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
