"""One MLflow run of a training: its lifecycle, params, datasets, per-epoch and per-step
metrics, tables and plots. The store it goes to is ``medlm.store``; the model it registers,
``medlm.registry``; loading a model back, ``medlm.inference``."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from medlm.config import sweep_value
from medlm.errors import MedLMError
from medlm.scores import CONFIDENCE, REFERENCE_SCORES, REPEAT_SCORES, SUMMARY_SCORES
from medlm.store import first_open, launched_by
from medlm.timing import LABELS, non_training_fraction
from medlm.train import EpochResult, Logger, RunStopped

log = logging.getLogger(__name__)

METRICS = ("training_loss", "validation_loss", "validation_perplexity", "epoch_duration_sec",
           "train_samples_per_sec", "train_tokens_per_sec", "learning_rate",
           "model_flops_utilization")
# the kept model's loss on each validation row: what the champion rule pairs
VALIDATION_LOSSES = "validation_losses.json"
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as a run's description
RESULTS_COLUMNS = ("epoch", "transformer", "batch_size", "gpu", "training_loss",
                   "validation_loss", "epoch_duration_sec")


def library_versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {"python_version": platform.python_version(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "datasets_version": datasets.__version__, "pandas_version": pd.__version__,
            "mlflow_version": mlflow.__version__}


class MlflowTracker(Logger):
    """One MLflow run of a training, and the loop's logger into it (``medlm.train.Logger``).

    ``results.csv`` and ``loss_curve.png`` are rewritten after every epoch, so a run that stops
    early still has them.
    """

    def __init__(self, config, gpu: str = ""):
        """``config``: the run's ``TrainConfig``; ``gpu``: the device's name (results.csv)."""
        self.experiment = config.experiment
        self.system_metrics = config.system_metrics
        self.last_logged_step = 0  # per-step metrics up to here are in the run (resume)
        self.select_by = config.select_by
        self.run_name = config.run_name
        self.registered_model = config.registered_model
        self.results_row = {"transformer": config.model, "batch_size": config.batch_size,
                            "gpu": gpu}
        self.epochs: list[EpochResult] = []
        self.run_id: str | None = None
        # a resumed run's metrics (name -> steps) as the store has them: not logged again
        self.logged: dict[str, set[int]] | None = None
        self._tables: dict[str, set[int]] = {}  # its tables' epochs (_table_epochs)

    @contextlib.contextmanager
    def run(self, params: dict[str, Any], nested: bool = False,
            resume_run_id: str | None = None, parent_run_id: str | None = None,
            description: str | None = None) -> Iterator[str]:
        """Start the run (a child of the active run when ``nested``, or of ``parent_run_id``,
        which another process may hold: a search's trials; the run ``resume_run_id`` again when
        resuming) and log ``params``; it ends FINISHED, KILLED (Ctrl-C, SIGTERM, a search's
        pruning) or FAILED."""
        top_level = not (nested or parent_run_id)  # a sweep's or search's parent names it
        if resume_run_id:  # the run's own experiment (a new process has another active one)
            experiment_id = MlflowClient().get_run(resume_run_id).info.experiment_id
        elif parent_run_id:  # a child lives in its parent's experiment
            experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
        elif nested:
            experiment_id = mlflow.active_run().info.experiment_id
        else:
            experiment_id = training_experiment(self.experiment)
            parent_run_id = project_parent(experiment_id)
        with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id,
                              run_name=None if resume_run_id else self.run_name,
                              nested=nested, parent_run_id=parent_run_id,
                              description=None if resume_run_id else description,
                              log_system_metrics=self.system_metrics) as active:
            self.run_id = active.info.run_id
            if launched_by() and top_level and not resume_run_id:  # each run names the other
                mlflow.set_tag("medlm.launched_by_run", launched_by())
                MlflowClient().set_tag(launched_by(), "medlm.run_id", self.run_id)
            try:
                if not resume_run_id:
                    mlflow.log_params({key: param_value(value)
                                       for key, value in params.items()})
                else:
                    self.last_logged_step = _last_step(self.run_id, STEP_METRICS[0])
                    self.logged = _logged_steps(self.run_id)
                yield self.run_id
                mlflow.flush_async_logging()
            except (KeyboardInterrupt, RunStopped):
                if _end_run_if_possible(RunStatus.KILLED):  # queued step points go first
                    self._say_ended(description, "stopped")
                raise
            except BaseException:
                if _end_run_if_possible(RunStatus.FAILED):  # else the store is down
                    self._say_ended(description, "failed")
                raise

    def _say_ended(self, description: str | None, how: str) -> None:
        """A run that did not finish says so in its description (it said "training")."""
        if description:
            try:
                self.describe(f"{description.removesuffix(': training')}: {how}")
            except Exception:  # noqa: BLE001, S110 - the store is down: the run's end stands
                pass

    def describe(self, text: str) -> None:
        """The run's description, as the UI shows it above the run's page (ended or not)."""
        MlflowClient().set_tag(self.run_id, DESCRIPTION_TAG, text)

    @property
    def tracking_uri(self) -> str:
        return mlflow.get_tracking_uri()

    def on_epoch_end(self, model, result: EpochResult) -> None:
        # the epoch's step points are written before it counts as logged: a resume never
        # trains a completed epoch again, so a point still queued at a kill would be lost
        mlflow.flush_async_logging()
        self.epochs = [epoch for epoch in self.epochs if epoch.epoch != result.epoch] + [result]
        values = asdict(result)
        self._log_metrics({name: values[name] for name in METRICS}, step=result.epoch)
        mlflow.log_text(self.results_frame().to_csv(index=False), "results.csv")
        mlflow.log_figure(self.loss_figure(), "loss_curve.png")

    def on_step(self, step: int, values: dict[str, float]) -> None:
        """Per-step curves (x-axis: optimizer steps since the run began), logged without
        making the loop wait for MLflow; steps a resumed run had logged are not logged again."""
        if step > self.last_logged_step:
            mlflow.log_metrics({f"step/{name}": value for name, value in values.items()},
                               step=step, synchronous=False)
            self.last_logged_step = step

    def log_datasets(self, train: pd.DataFrame, validation: pd.DataFrame, source: str) -> None:
        """The training and validation rows as the run's inputs (the Datasets column and
        lineage in the UI): the Hub dataset or the file they came from, and each one's content
        digest."""
        import pathlib
        import warnings

        import mlflow.data
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        local = os.path.expanduser(source)
        origin = (pathlib.Path(local).resolve().as_uri() if os.path.exists(local)
                  else HuggingFaceDatasetSource(path=source, split="train"))
        name = os.path.splitext(os.path.basename(source.rstrip("/")))[0] or source
        for context, frame in (("training", train), ("validation", validation)):
            with warnings.catch_warnings():  # MLflow registers its file source twice
                warnings.filterwarnings("ignore", "The specified dataset source can be")
                dataset = mlflow.data.from_pandas(frame.reset_index(drop=True), source=origin,
                                                  targets="Symptoms", name=f"{name}-{context}")
            _log_input(dataset, context)

    def log_recipe(self, text: str) -> None:
        """The run's settings as a recipe file (``TrainConfig.to_recipe``): ``recipe.toml``."""
        mlflow.log_text(text, "recipe.toml")

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at ``step``; a resumed run skips those the store has at that step
        (what a kill before the checkpointed epoch's logging ended had logged)."""
        if self.logged is not None:
            values = {name: value for name, value in values.items()
                      if step not in self.logged.get(name, ())}
        if values:
            mlflow.log_metrics(values, step=step)

    def _log_table(self, frame: pd.DataFrame, artifact_file: str) -> None:
        """Append rows to a table artifact; a resumed run, only those of epochs it lacks."""
        if self.logged is not None and "epoch" in frame:
            known = self._table_epochs(artifact_file)
            frame = frame[~frame["epoch"].isin(known)]
            known.update(frame["epoch"])
        if len(frame):
            mlflow.log_table(frame, artifact_file=artifact_file)

    def lacks(self, epoch: int, artifact_file: str) -> bool:
        """Does the run lack ``epoch``'s rows of a table (always, unless it was resumed)?"""
        return self.logged is None or epoch not in self._table_epochs(artifact_file)

    def _table_epochs(self, artifact_file: str) -> set[int]:
        """The epochs a resumed run's table has rows of: read from the store once, then kept
        up to date as rows are logged (not downloaded again for every epoch)."""
        if artifact_file not in self._tables:
            logged = logged_table(self.run_id, artifact_file)
            self._tables[artifact_file] = (set(logged["epoch"]) if logged is not None
                                           and "epoch" in logged else set())
        return self._tables[artifact_file]

    def results_frame(self) -> pd.DataFrame:
        rows = [{**self.results_row, **asdict(result)} for result in self.epochs]
        return pd.DataFrame(rows, columns=list(RESULTS_COLUMNS))

    def loss_figure(self):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), dpi=100)
        axes = figure.subplots()
        epochs = [result.epoch for result in self.epochs]
        axes.plot(epochs, [r.training_loss for r in self.epochs], marker="o", label="training")
        axes.plot(epochs, [r.validation_loss for r in self.epochs], marker="o",
                  label="validation")
        best = next((r for r in reversed(self.epochs) if r.is_best), self.epochs[-1])
        axes.axvline(best.epoch, color="grey", linestyle=":",
                     label=f"best by {self.select_by} (epoch {best.epoch})")
        axes.set_xlabel("epoch")
        axes.set_ylabel("loss per token")
        axes.set_title(f"{self.results_row['transformer']} ({self.run_name or self.run_id})")
        axes.legend()
        figure.tight_layout()
        return figure

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (epoch, prompt, generated, reference) to the run's ``samples.json``."""
        if rows:
            self._log_table(pd.DataFrame(rows), "samples.json")

    def log_symptom_scores(self, epoch: int, table: pd.DataFrame,
                           scores: dict[str, float]) -> None:
        """An epoch's micro-averaged scores as metrics (epoch 0: the untuned base), per-disease
        rows as a table."""
        self._log_metrics(scores, step=epoch)
        self._log_table(table.assign(epoch=epoch), "symptom_scores.json")

    def log_baselines(self, baselines: dict[str, tuple]) -> None:
        """Answers that need no model, scored on the validation diseases: metrics
        ``baseline_<name>_symptom_f1`` etc. and their answers as ``baselines.json``."""
        for name, (table, scores) in baselines.items():
            mlflow.log_metrics(scores.as_metrics(f"baseline_{name}_"))
            mlflow.log_table(table.assign(baseline=name), artifact_file="baselines.json")

    def log_time(self, split: dict[str, float], step: int) -> None:
        """Where an epoch's wall time went (step 0: everything before the first epoch), one
        metric per phase: ``time/training_sec``, ``time/scoring_sec``, ..."""
        self._log_metrics({f"time/{name}_sec": value for name, value in split.items()}, step)

    def log_time_split(self, split: dict[str, float]) -> None:
        """Where the whole run's wall time went: ``time_total/*`` metrics (and
        ``time_total/non_training_fraction``) and the table ``time_split.json``."""

        mlflow.log_metrics({**{f"time_total/{name}_sec": value for name, value in split.items()},
                            "time_total/non_training_fraction": non_training_fraction(split)})
        wall = split["wall"] or 1.0
        mlflow.log_table(pd.DataFrame(
            [{"phase": LABELS.get(name, name), "seconds": round(value, 3),
              "percent": round(100 * value / wall, 1)} for name, value in split.items()]),
            artifact_file="time_split.json")

    def log_untuned(self, scores: dict[str, float]) -> None:
        mlflow.log_metrics({f"untuned_{name}": value for name, value in scores.items()})

    def log_best(self, best: EpochResult, model_id: str | None = None) -> None:
        """The best epoch's figures, once (a run resumed after a kill in model logging has
        them already); with ``model_id`` also linked to that logged model (MLflow 3: the
        Models tab shows them beside it)."""
        if MlflowClient().get_run(self.run_id).data.metrics.get("best_epoch") == best.epoch:
            return
        mlflow.log_metrics({"best_validation_loss": best.validation_loss,
                            "best_epoch": best.epoch,
                            **{f"best_{name}": value for name, value in best.scores.items()}},
                           model_id=model_id)

    def log_row_losses(self, table: pd.DataFrame, epoch: int) -> None:
        """The kept model's loss on each validation row (``champion.validation_loss_table``)
        at its ``epoch``: added to those of other epochs (a run resumed with more epochs keeps
        a version per kept epoch), replacing this epoch's rows if it had them."""
        table = table.assign(epoch=epoch)
        logged = logged_table(self.run_id, VALIDATION_LOSSES)
        if logged is not None:
            table = pd.concat([logged[logged["epoch"] != epoch], table])
        mlflow.log_dict(table.to_dict(orient="split", index=False), VALIDATION_LOSSES)


def _log_input(dataset, context: str) -> None:
    """``mlflow.log_input``, tried twice: two runs that log the same rows at the same moment
    both find the dataset missing and one insert fails (UNIQUE constraint); the second try
    finds it (MLflow reuses a logged dataset and a run's existing input)."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        if "unique" not in str(error).lower():  # UNIQUE constraint, UniqueViolation
            raise
        mlflow.log_input(dataset, context=context)


def logged_table(run_id: str, artifact_file: str) -> pd.DataFrame | None:
    """A table artifact of the run (``mlflow.log_table``'s or ``log_dict``'s split form), read
    from the file itself, or None where the run has none. (``mlflow.load_table`` finds runs by
    a tag that a kill may have cut off after the file was written, and searches only the
    active experiment.)"""
    if artifact_file not in {item.path for item in MlflowClient().list_artifacts(run_id)}:
        return None
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    return pd.DataFrame(table["data"], columns=table["columns"])


def logged_row_losses(run_id: str, epoch: int) -> pd.DataFrame | None:
    """A run's ``VALIDATION_LOSSES`` at ``epoch``; None where it has none."""
    frame = logged_table(run_id, VALIDATION_LOSSES)
    if frame is None:
        return None
    frame = frame[frame["epoch"] == epoch].reset_index(drop=True)
    return frame if not frame.empty else None


def logged_metrics(run_id: str, prefix: str) -> dict[str, float]:
    """A run's latest metrics whose names start with ``prefix``, prefix removed."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {name.removeprefix(prefix): value for name, value in metrics.items()
            if name.startswith(prefix)}


def log_sweep_summary(table: pd.DataFrame, axes: tuple[str, ...],
                      by_seed: pd.DataFrame | None = None, by_fold: pd.DataFrame | None = None,
                      best: pd.Series | None = None) -> None:
    """On the active (parent) run: the sweep's table (``sweep.csv``); each recipe over its
    training seeds (``sweep_seeds.csv``, where some had several); the ``best`` child's scores
    and settings; or, for a cross-validation (``by_fold``, ranked), each recipe over its folds
    (``sweep_folds.csv``, ``cv_scores.png``) and the best recipe's ``cv_<score>``, ``_std``,
    ``_ci_low`` and ``_ci_high`` where it finished every fold."""
    mlflow.log_text(table.to_csv(index=False), "sweep.csv")
    if by_seed is not None:
        mlflow.log_text(by_seed.to_csv(index=False), "sweep_seeds.csv")
    if by_fold is not None:
        mlflow.log_text(by_fold.to_csv(index=False), "sweep_folds.csv")
        mlflow.log_figure(_cv_figure(by_fold, axes), "cv_scores.png")
        top = by_fold.iloc[0]
        if top["complete"]:
            mlflow.log_metrics({f"cv_{name}": float(top[name]) for name in by_fold.columns
                                if name.startswith((*REPEAT_SCORES, *REFERENCE_SCORES))})
            mlflow.set_tags({f"best_{name}": str(top[name]) for name in axes if name in top})
    if best is not None:
        mlflow.log_metrics({"best_validation_loss": float(best["validation_loss"]),
                            **{f"best_{name}": float(best[name]) for name in SUMMARY_SCORES}})
        mlflow.set_tags({"best_child_run_id": best["run_id"],
                         **{f"best_{name}": str(best[name]) for name in axes}})


def _cv_figure(by_fold: pd.DataFrame, axes: tuple[str, ...]):
    """Each recipe's mean over the folds with its interval as error bars: symptom F1 and
    validation loss side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    varied = [name for name in axes if name in by_fold and by_fold[name].nunique() > 1]
    labels = [" ".join(f"{name}={sweep_value(row[name])}" for name in varied) or "recipe"
              for _, row in by_fold.iterrows()]
    figure = Figure(figsize=(4 + 1.2 * len(labels), 4), dpi=100, layout="constrained")
    for plot, score in zip(figure.subplots(1, 2), ("symptom_f1", "validation_loss"),
                           strict=True):
        means = by_fold[score].astype(float)
        errors = [means - by_fold[f"{score}_ci_low"], by_fold[f"{score}_ci_high"] - means]
        plot.errorbar(range(len(labels)), means, yerr=errors, fmt="o", capsize=4)
        plot.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        plot.set_title(f"{score} over {len(by_fold.iloc[0]['folds'].split())} folds "
                       f"(mean, {CONFIDENCE:.0%} CI)")
    return figure


STEP_METRICS = ("step/training_loss", "step/learning_rate", "step/grad_norm",
                "step/tokens_per_sec")


def training_experiment(name: str) -> str:
    """The id of the experiment ``name`` (created if new), marked as a model-training
    experiment: MLflow 3's UI opens its training views for it, not the GenAI ones."""
    with first_open():  # a new store's tables made by one process at a time
        found = MlflowClient().get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise MedLMError(
                f"--experiment {name!r} was deleted (mlflow ui's delete keeps it in the trash, "
                f"id {found.experiment_id}): expected it restored (mlflow experiments restore "
                f"--experiment-id {found.experiment_id}), removed for good (mlflow gc), or "
                "another --experiment")
        experiment = mlflow.set_experiment(name)
    if "mlflow.experimentKind" not in experiment.tags:  # a kind someone chose stays
        MlflowClient().set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind",
                                          "custom_model_development")
    return experiment.experiment_id


def project_parent(experiment_id: str) -> str | None:
    """The run ``mlflow run`` opened, as the parent of a top-level run in the same experiment
    (in another, the two runs name each other in tags)."""
    launcher = launched_by()
    if launcher and MlflowClient().get_run(launcher).info.experiment_id == experiment_id:
        return launcher
    return None


def _logged_steps(run_id: str) -> dict[str, set[int]]:
    """Each epoch-level metric of the run and the steps it has points at."""
    client = MlflowClient()
    return {name: {point.step for point in client.get_metric_history(run_id, name)}
            for name in client.get_run(run_id).data.metrics
            if not name.startswith(("step/", "system/"))}


def _last_step(run_id: str, metric: str) -> int:
    return max((point.step for point in MlflowClient().get_metric_history(run_id, metric)),
               default=0)


def _end_run_if_possible(status: int) -> bool:
    """End the active run as ``status`` (True), unless the store has gone away (False): then
    the error that ended the run is the one to report, not this one's."""
    try:
        mlflow.flush_async_logging()
        mlflow.end_run(RunStatus.to_string(status))
    except Exception as error:  # noqa: BLE001 - the store is down: nothing more to tell it
        log.warning("could not mark the run %s in MLflow: %s", RunStatus.to_string(status),
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True


def run_outcome(run_id: str) -> tuple[str, dict[str, Any] | None]:
    """A run's status, and for a finished run its best epoch, scores (a fold's reference
    scores too) and registered version: what a sweep's table needs of a child that ended while
    the sweep was down."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return run.info.status, None
    metrics = run.data.metrics
    versions = sorted((int(version.version) for version in
                       client.search_model_versions(f"run_id = '{run_id}'")), reverse=True)
    return run.info.status, {
        "best_epoch": int(metrics["best_epoch"]),
        "validation_loss": metrics["best_validation_loss"],
        **{name: metrics.get(f"best_{name}", float("nan")) for name in SUMMARY_SCORES},
        **({name: metrics.get(name, float("nan")) for name in REFERENCE_SCORES}
           if run.data.params.get("folds", "0") not in ("0", "") else {}),
        "version": str(versions[0]) if versions else None}


def end_abandoned_run(run_id: str) -> None:
    """Mark KILLED a run a SIGKILL left RUNNING, which nothing will resume."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def param_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "; ".join(map(str, value))
    return "" if value is None else value


