"""One MLflow run of a training: lifecycle, params, datasets, metrics, tables and plots. The
store is ``medlm.store``'s; the registered model, ``medlm.registry``'s."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import platform
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from medlm.config import sweep_value
from medlm.errors import MedLMError, first_line
from medlm.scores import CONFIDENCE, REFERENCE_SCORES, REPEAT_SCORES, SUMMARY_SCORES
from medlm.store import first_open, launched_by
from medlm.timing import LABELS, non_training_fraction
from medlm.train import EpochResult, Logger, RunStopped

log = logging.getLogger(__name__)

METRICS = ("training_loss", "validation_loss", "validation_perplexity", "epoch_duration_sec",
           "train_samples_per_sec", "train_tokens_per_sec", "learning_rate",
           "model_flops_utilization")
# also logged as epoch/<name>: MLflow's run page draws a chart section per key prefix, sorted by
# name, and the unprefixed metrics after them all, so "epoch" is the section the page opens on
CHARTED = ("training_loss", "validation_loss", "symptom_f1", "word_f1")
VALIDATION_LOSSES = "validation_losses.json"  # the kept model's loss per validation row
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as a run's description


def library_versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {"python_version": platform.python_version(),
            **{f"{module.__name__}_version": module.__version__
               for module in (torch, transformers, datasets, pd, mlflow)}}


class MlflowTracker(Logger):
    """One MLflow run of a training, and the loop's logger into it. ``results.csv`` and
    ``loss_curve.png`` are rewritten after every epoch, so a run that stops early has them."""

    def __init__(self, config, gpu: str = ""):  # gpu: the device's name, for results.csv
        self.config, self.gpu, self.registered_model = config, gpu, config.registered_model
        self.epochs: list[EpochResult] = []
        self.run_id: str | None = None
        self.run_name: str | None = None  # MLflow's name of the run (a resumed run's own)
        # resumed: the last step/* point and each metric's steps the store has (not logged again)
        self.last_logged_step = 0
        self.logged: dict[str, set[int]] | None = None
        self._tables: dict[str, set[int]] = {}  # each table's epochs in the store (_table_epochs)

    @contextlib.contextmanager
    def run(self, params: dict[str, Any], nested: bool = False,
            resume_run_id: str | None = None, parent_run_id: str | None = None,
            description: str | None = None) -> Iterator[str]:
        """Start the run (a child of the active run when ``nested`` or of ``parent_run_id``;
        ``resume_run_id`` again) and log ``params``; it ends FINISHED, KILLED or FAILED."""
        top_level = not (nested or parent_run_id)
        if resume_run_id or parent_run_id:  # its own or its parent's experiment
            experiment_id = MlflowClient().get_run(
                resume_run_id or parent_run_id).info.experiment_id
        elif nested:
            experiment_id = mlflow.active_run().info.experiment_id
        else:
            experiment_id = training_experiment(self.config.experiment)
            parent_run_id = project_parent(experiment_id)
        with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id,
                              run_name=None if resume_run_id else self.config.run_name,
                              nested=nested, parent_run_id=parent_run_id,
                              description=None if resume_run_id else description,
                              log_system_metrics=self.config.system_metrics) as active:
            self.run_id = run_id = active.info.run_id
            self.run_name = active.info.run_name
            if launched_by() and top_level and not resume_run_id:  # each run names the other
                mlflow.set_tag("medlm.launched_by_run", launched_by())
                MlflowClient().set_tag(launched_by(), "medlm.run_id", run_id)
            try:
                if not resume_run_id:
                    mlflow.log_params({key: param_value(value) for key, value in params.items()})
                else:
                    self.last_logged_step = max(_steps(run_id, "step/training_loss"), default=0)
                    self.logged = {name: _steps(run_id, name)
                                   for name in MlflowClient().get_run(run_id).data.metrics
                                   if not name.startswith(("step/", "system/"))}
                yield run_id
                mlflow.flush_async_logging()
            except (KeyboardInterrupt, RunStopped):
                self._end(RunStatus.KILLED, description, "stopped")
                raise
            except BaseException:
                self._end(RunStatus.FAILED, description, "failed")
                raise

    def _end(self, status: int, description: str | None, how: str) -> None:
        """End the run as ``status`` (queued step points first) and say ``how`` in its
        description, unless the store is down: then the run's own error is the one to tell."""
        try:
            mlflow.flush_async_logging()
            mlflow.end_run(RunStatus.to_string(status))
        except Exception as error:  # noqa: BLE001
            log.warning("could not mark the run %s in MLflow: %s", RunStatus.to_string(status),
                        first_line(error))
            return
        if description:
            with contextlib.suppress(Exception):  # the store went down: the run's end stands
                self.describe(f"{description.removesuffix(': training')}: {how}")

    def describe(self, text: str) -> None:
        MlflowClient().set_tag(self.run_id, DESCRIPTION_TAG, text)

    def on_epoch_end(self, model, result: EpochResult) -> None:
        # step points are flushed before the epoch counts as logged: a resume never redoes it
        mlflow.flush_async_logging()
        self.epochs = [epoch for epoch in self.epochs if epoch.epoch != result.epoch] + [result]
        self._log_metrics({name: getattr(result, name) for name in METRICS}, step=result.epoch)
        mlflow.log_text(self.results_frame().to_csv(index=False), "results.csv")
        mlflow.log_figure(self.loss_figure(), "loss_curve.png")

    def on_step(self, step: int, values: dict[str, float]) -> None:
        """``step/*`` metrics, logged without making the loop wait; none a resumed run has."""
        if step > self.last_logged_step:
            mlflow.log_metrics({f"step/{name}": value for name, value in values.items()},
                               step=step, synchronous=False)
            self.last_logged_step = step

    def log_datasets(self, train: pd.DataFrame, validation: pd.DataFrame, source: str) -> None:
        """The training and validation rows as the run's inputs (the UI's Datasets column)."""
        import mlflow.data  # deferred: only the datasets need these
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        local = pathlib.Path(source).expanduser()
        origin = (local.resolve().as_uri() if local.exists()
                  else HuggingFaceDatasetSource(path=source, split="train"))
        name = pathlib.Path(source).stem or source
        for context, frame in (("training", train), ("validation", validation)):
            with warnings.catch_warnings():  # MLflow registers its file source twice
                warnings.filterwarnings("ignore", "The specified dataset source can be")
                dataset = mlflow.data.from_pandas(frame.reset_index(drop=True), source=origin,
                                                  targets="Symptoms", name=f"{name}-{context}")
            try:
                mlflow.log_input(dataset, context=context)
            except MlflowException as error:  # two runs inserted the same dataset at once:
                if "unique" not in str(error).lower():  # the second try finds it logged
                    raise
                mlflow.log_input(dataset, context=context)

    def log_recipe(self, text: str) -> None:
        mlflow.log_text(text, "recipe.toml")

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at ``step`` (``CHARTED`` twice), but those a resumed run's store has at
        that step."""
        values = {**values, **{f"epoch/{name}": values[name] for name in CHARTED if name in values}}
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
        """The epochs a resumed run's table has rows of: read once, then kept up to date."""
        if artifact_file not in self._tables:
            logged = logged_table(self.run_id, artifact_file)
            self._tables[artifact_file] = (set(logged["epoch"]) if logged is not None
                                           and "epoch" in logged else set())
        return self._tables[artifact_file]

    def results_frame(self) -> pd.DataFrame:
        row = {"transformer": self.config.model, "batch_size": self.config.batch_size,
               "gpu": self.gpu}
        return pd.DataFrame([{**row, **asdict(result)} for result in self.epochs],
                            columns=["epoch", "transformer", "batch_size", "gpu",
                                     "training_loss", "validation_loss", "epoch_duration_sec"])

    def loss_figure(self):
        figure = _figure(figsize=(6, 4))
        axes = figure.subplots()
        for label, losses in (("training", [r.training_loss for r in self.epochs]),
                              ("validation", [r.validation_loss for r in self.epochs])):
            axes.plot([r.epoch for r in self.epochs], losses, marker="o", label=label)
        best = next((r for r in reversed(self.epochs) if r.is_best), self.epochs[-1])
        axes.axvline(best.epoch, color="grey", linestyle=":",
                     label=f"best by {self.config.select_by} (epoch {best.epoch})")
        axes.set(xlabel="epoch", ylabel="loss per token",
                 title=self.run_name or self.config.run_name or self.run_id)
        axes.legend()
        figure.tight_layout()
        return figure

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        self._log_table(pd.DataFrame(rows), "samples.json")

    def log_symptom_scores(self, epoch: int, table: pd.DataFrame, scores: dict[str, float]) -> None:
        """An epoch's scores (epoch 0: the untuned base) and per-disease rows."""
        self._log_metrics(scores, step=epoch)
        self._log_table(table.assign(epoch=epoch), "symptom_scores.json")

    def log_baselines(self, baselines: dict[str, tuple]) -> None:
        """The answers that need no model: ``baseline_<name>_*`` metrics, ``baselines.json``."""
        for name, (table, scores) in baselines.items():
            mlflow.log_metrics(scores.as_metrics(f"baseline_{name}_"))
            mlflow.log_table(table.assign(baseline=name), artifact_file="baselines.json")

    def log_time(self, split: dict[str, float], step: int) -> None:
        """An epoch's wall time by phase (step 0: before the first epoch): ``time/*_sec``."""
        self._log_metrics({f"time/{name}_sec": value for name, value in split.items()}, step)

    def log_time_split(self, split: dict[str, float]) -> None:
        """The whole run's wall time by phase: ``time_total/*`` metrics, ``time_split.json``."""
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
        """The best epoch's figures, once (a resumed run may have them), linked to ``model_id``."""
        if MlflowClient().get_run(self.run_id).data.metrics.get("best_epoch") == best.epoch:
            return
        mlflow.log_metrics({"best_validation_loss": best.validation_loss, "best_epoch": best.epoch,
                            **{f"best_{name}": value for name, value in best.scores.items()}},
                           model_id=model_id)

    def log_row_losses(self, table: pd.DataFrame, epoch: int) -> None:
        """The kept model's loss per validation row at ``epoch``, beside other epochs' (a run
        resumed with more epochs keeps a version per kept epoch); this epoch's rows replaced."""
        table = table.assign(epoch=epoch)
        logged = logged_table(self.run_id, VALIDATION_LOSSES)
        if logged is not None:
            table = pd.concat([logged[logged["epoch"] != epoch], table])
        mlflow.log_dict(table.to_dict(orient="split", index=False), VALIDATION_LOSSES)


def _steps(run_id: str, metric: str) -> set[int]:
    return {point.step for point in MlflowClient().get_metric_history(run_id, metric)}


def _figure(**settings):
    import matplotlib  # deferred: only a run's plots need it

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(dpi=100, **settings)


def logged_table(run_id: str, artifact_file: str) -> pd.DataFrame | None:
    """A table artifact of the run (``log_table``'s or ``log_dict``'s split form), or None.
    Read from the file: ``mlflow.load_table`` relies on a tag a kill may have cut off."""
    if artifact_file not in {item.path for item in MlflowClient().list_artifacts(run_id)}:
        return None
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")
    return pd.DataFrame(table["data"], columns=table["columns"])


def logged_row_losses(run_id: str, epoch: int) -> pd.DataFrame | None:
    """A run's ``VALIDATION_LOSSES`` at ``epoch``; None where it has none."""
    frame = logged_table(run_id, VALIDATION_LOSSES)
    rows = None if frame is None else frame[frame["epoch"] == epoch].reset_index(drop=True)
    return None if rows is None or rows.empty else rows


def logged_metrics(run_id: str, prefix: str) -> dict[str, float]:
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {name.removeprefix(prefix): value for name, value in metrics.items()
            if name.startswith(prefix)}


def log_sweep_summary(table: pd.DataFrame, axes: tuple[str, ...],
                      by_seed: pd.DataFrame | None = None, by_fold: pd.DataFrame | None = None,
                      best: pd.Series | None = None) -> None:
    """On the sweep's parent run: its tables, the ``best`` child's scores and settings; for a
    cross-validation (``by_fold``, ranked), the best recipe's ``cv_*`` once every fold ended."""
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
    """Each recipe's mean over the folds with its interval: symptom F1 and validation loss."""
    varied = [name for name in axes if name in by_fold and by_fold[name].nunique() > 1]
    labels = [" ".join(f"{name}={sweep_value(row[name])}" for name in varied) or "recipe"
              for _, row in by_fold.iterrows()]
    figure = _figure(figsize=(4 + 1.2 * len(labels), 4), layout="constrained")
    for plot, score in zip(figure.subplots(1, 2), ("symptom_f1", "validation_loss"), strict=True):
        means = by_fold[score].astype(float)
        errors = [means - by_fold[f"{score}_ci_low"], by_fold[f"{score}_ci_high"] - means]
        plot.errorbar(range(len(labels)), means, yerr=errors, fmt="o", capsize=4)
        plot.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        plot.set_title(f"{score} over {len(by_fold.iloc[0]['folds'].split())} folds "
                       f"(mean, {CONFIDENCE:.0%} CI)")
    return figure


def training_experiment(name: str) -> str:
    """The id of the experiment ``name`` (created if new), marked as a model-training
    experiment so that MLflow 3's UI opens its training views."""
    with first_open():
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
    """The run ``mlflow run`` opened, as the parent of a top-level run in its experiment."""
    launcher = launched_by()
    if launcher and MlflowClient().get_run(launcher).info.experiment_id == experiment_id:
        return launcher
    return None


def run_outcome(run_id: str) -> tuple[str, dict[str, Any] | None]:
    """A run's status and, once finished, its best epoch, scores (a fold's reference scores
    too) and registered version: a sweep's row for a child that ended while it was down."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return run.info.status, None
    metrics = run.data.metrics
    newest = max((int(version.version) for version in
                  client.search_model_versions(f"run_id = '{run_id}'")), default=None)
    return run.info.status, {
        "best_epoch": int(metrics["best_epoch"]),
        "validation_loss": metrics["best_validation_loss"],
        **{name: metrics.get(f"best_{name}", float("nan")) for name in SUMMARY_SCORES},
        **({name: metrics.get(name, float("nan")) for name in REFERENCE_SCORES}
           if run.data.params.get("folds", "0") not in ("0", "") else {}),
        "version": None if newest is None else str(newest)}


def end_abandoned_run(run_id: str) -> None:
    """Mark KILLED a run a SIGKILL left RUNNING, which nothing will resume."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def param_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "; ".join(map(str, value))
    return "" if value is None else value
