"""Everything MLflow: run lifecycle, params, per-epoch metrics, tables, plots, model, registry.

The tracking URI is MLflow's own resolution: ``MLFLOW_TRACKING_URI`` when set, else the local
SQLite ``mlflow.db`` with artifacts under ``./mlruns``, which plain ``mlflow ui`` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from medlm.errors import MedLMError
from medlm.train import EpochResult

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
METRICS = ("training_loss", "validation_loss", "validation_perplexity", "epoch_duration_sec",
           "train_samples_per_sec", "train_tokens_per_sec", "learning_rate")
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


def pip_requirements() -> list[str]:
    """Pinned requirements logged with the model, so it loads back with the same libraries."""
    import safetensors
    import torch
    import transformers

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"  # drop local tags such as +cpu / +cu121

    return [pin("torch", torch.__version__), pin("transformers", transformers.__version__),
            pin("safetensors", safetensors.__version__), pin("mlflow", mlflow.__version__)]


class MlflowTracker:
    """One MLflow run of a training: a training-loop callback plus model logging.

    ``results.csv`` and ``loss_curve.png`` are rewritten after every epoch, so a run that stops
    early still has them.
    """

    def __init__(self, experiment: str, run_name: str | None, registered_model: str,
                 transformer: str, gpu: str, batch_size: int,
                 select_by: str = "validation_loss", system_metrics: bool = False):
        self.experiment = experiment
        self.system_metrics = system_metrics
        self.last_logged_step = 0  # per-step metrics up to here are in the run (resume)
        self.select_by = select_by
        self.run_name = run_name
        self.registered_model = registered_model
        self.results_row = {"transformer": transformer, "batch_size": batch_size, "gpu": gpu}
        self.epochs: list[EpochResult] = []
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(self, params: dict[str, Any], nested: bool = False,
            resume_run_id: str | None = None) -> Iterator[str]:
        """Start the run (a child of the active run when ``nested``; the run ``resume_run_id``
        again when resuming) and log ``params``; it ends FINISHED, KILLED (Ctrl-C, SIGTERM) or
        FAILED."""
        if resume_run_id:  # the run's own experiment (a new process has another active one)
            experiment_id = MlflowClient().get_run(resume_run_id).info.experiment_id
        elif nested:  # a child lives in its parent's experiment
            experiment_id = mlflow.active_run().info.experiment_id
        else:
            experiment = mlflow.set_experiment(self.experiment)
            experiment_id = experiment.experiment_id
            if "mlflow.experimentKind" not in experiment.tags:  # a kind someone chose stays
                # MLflow 3's UI shows its model-training views for this kind of experiment
                MlflowClient().set_experiment_tag(experiment_id, "mlflow.experimentKind",
                                                  "custom_model_development")
        with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id,
                              run_name=None if resume_run_id else self.run_name,
                              nested=nested, log_system_metrics=self.system_metrics) as active:
            self.run_id = active.info.run_id
            try:
                if not resume_run_id:
                    mlflow.log_params({key: _param_value(value)
                                       for key, value in params.items()})
                else:
                    self.last_logged_step = _last_step(self.run_id, STEP_METRICS[0])
                yield self.run_id
                mlflow.flush_async_logging()
            except KeyboardInterrupt:
                _end_run_if_possible(RunStatus.KILLED)  # queued step points go first
                raise
            except BaseException:
                _end_run_if_possible(RunStatus.FAILED)
                raise

    @property
    def tracking_uri(self) -> str:
        return mlflow.get_tracking_uri()

    def on_epoch_end(self, model, result: EpochResult) -> None:
        # the epoch's step points are written before it counts as logged: a resume never
        # trains a completed epoch again, so a point still queued at a kill would be lost
        mlflow.flush_async_logging()
        self.epochs.append(result)
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
            mlflow.log_input(dataset, context=context)

    def on_epoch_replay(self, model, result: EpochResult) -> None:
        """The epoch's logging again, after a kill that cut it short: what is already in the
        run (metrics at this step, table rows of this epoch) is not logged twice."""
        client = MlflowClient()
        names = client.get_run(self.run_id).data.metrics
        self._replay = (result.epoch, {
            name for name in names
            if any(metric.step == result.epoch
                   for metric in client.get_metric_history(self.run_id, name))})
        self.on_epoch_end(model, result)

    _replay: tuple[int, set[str]] | None = None  # (epoch, metrics already logged at it)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        if self._replay and self._replay[0] == step:
            values = {name: value for name, value in values.items()
                      if name not in self._replay[1]}
        if values:
            mlflow.log_metrics(values, step=step)

    def _log_table(self, frame: pd.DataFrame, artifact_file: str) -> None:
        """Append rows to a table artifact; while replaying an epoch, only if that epoch's rows
        are not there yet."""
        if self._replay and "epoch" in frame and (frame["epoch"] == self._replay[0]).any():
            # the file itself: mlflow.load_table finds runs by a tag that a kill may have cut
            # off after the file was written, and searches only the active experiment
            present = {item.path for item in MlflowClient().list_artifacts(self.run_id)}
            logged = pd.DataFrame()
            if artifact_file in present:
                table = mlflow.artifacts.load_dict(f"runs:/{self.run_id}/{artifact_file}")
                logged = pd.DataFrame(table["data"], columns=table["columns"])
            if "epoch" in logged and (logged["epoch"] == self._replay[0]).any():
                return
        mlflow.log_table(frame, artifact_file=artifact_file)

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
        from medlm.timing import LABELS, non_training_fraction

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

    def log_and_register_model(self, model, tokenizer, best: EpochResult, params: dict[str, Any],
                               select_by: str, promote: bool = False,
                               licence: tuple[str, Any] | None = None) -> tuple[str, str]:
        """Log the model (transformers flavor, safetensors), register it and maybe crown it.

        The version is tagged with its scores and its evaluation key (``evaluation_key``).
        Returns (version, message): ``champion`` moves to it when no version holds the alias
        yet, when ``promote``, or when it beats the champion's ``select_by`` value on the same
        key (whatever rule picked the champion's own best epoch).
        """
        version = self._version_of_this_run(best.epoch)
        if version is None:
            version = self._log_model(model, tokenizer, best)
        else:  # a resumed run, killed after its model was registered: not a second version
            self.log_best(best)
        scores = {"validation_loss": best.validation_loss, **best.scores}
        key = evaluation_key(params)
        tags = {"validation_loss": repr(best.validation_loss), "select_by": select_by,
                "best_epoch": str(best.epoch),
                **{name: repr(value) for name, value in best.scores.items()},
                "evaluation_key": key_digest(key), "evaluation_key_json": json.dumps(key)}
        if licence is not None:  # the base's terms go with what is made from it
            tags["base_licence"] = licence[0]
            if licence[1] is not None and not MlflowClient().list_artifacts(
                    self.run_id, "base_licence"):
                mlflow.log_artifact(str(licence[1]), artifact_path="base_licence")
        client = MlflowClient()
        for name, value in tags.items():
            client.set_model_version_tag(self.registered_model, version, name, value)
        client.update_model_version(self.registered_model, version, description=(
            f"{params.get('model')} fine-tuned on {params.get('dataset_source')} "
            f"({params.get('rows_train')} training rows); best of {len(self.epochs)} epochs by "
            f"{select_by}: epoch {best.epoch}, "
            + ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
            + f". Run {self.run_id}."
            + (f" Base model licence: {licence[0]} (run artifact base_licence/)."
               if licence is not None else "")))
        return version, self._maybe_crown(client, version, tags, select_by, promote)

    def _version_of_this_run(self, best_epoch: int) -> str | None:
        """The version this run registered before it was interrupted, if it holds the weights
        of ``best_epoch`` (a resume with more --epochs may have found a better one: a new
        version then)."""
        client = MlflowClient()
        versions = client.search_model_versions(
            f"name = '{self.registered_model}' and run_id = '{self.run_id}'")
        if not versions:
            return None
        newest = max(versions, key=lambda v: int(v.version))
        recorded = newest.tags.get("best_epoch",
                                   client.get_run(self.run_id).data.metrics.get("best_epoch"))
        if recorded is not None and int(float(recorded)) != best_epoch:
            return None
        return str(newest.version)

    def _log_model(self, model, tokenizer, best: EpochResult) -> str:
        """Log the model, register it, log the best epoch's figures; the version."""
        from mlflow.models import infer_signature

        from medlm.prompts import prompt_format_of, serving_template

        # Served (pyfunc, `mlflow models serve`), a disease name becomes the prompt the model
        # was trained to continue ("Name |", or its chat template's), and only the
        # continuation comes back; the
        # generation settings are inference parameters with the run's values as defaults.
        example = ["Kidney Failure"]
        signature = infer_signature(example, ["Fatigue, swelling in the legs"],
                                    params=serving_parameters(model.generation_config))
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            save_pretrained=True,
            prompt_template=serving_template(tokenizer, prompt_format_of(model)),
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=self.registered_model,
            # log_model links every run metric logged at its step to the model (step/* and
            # system/* points too, and at the default 0 the untuned scores): at -1 none is;
            # the best epoch's figures are linked below, by name
            step=-1,
        )  # MLflow then checks the input example serves (the transformers flavor insists)
        self.log_best(best, model_id=info.model_id)
        return str(info.registered_model_version)

    def _maybe_crown(self, client: MlflowClient, version: str, tags: dict[str, str],
                     select_by: str, promote: bool) -> str:
        name = self.registered_model
        try:
            current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        except MlflowException:
            current = None
        label = f"{name} version {version}"
        value = float(tags[select_by]) if select_by in tags else None
        shown = f"{select_by} {value:.4f}" if value is not None else f"no {select_by}"
        reason = None
        if current is not None and current.version == version:  # crowned before a kill
            return f"{label} is the champion ({shown})"
        if current is None:
            crowned = f"{label} is the first champion ({shown})"
        elif promote:
            crowned = f"{label} is the champion by --promote ({shown}), replacing version " \
                      f"{current.version} without comparing"
        else:
            crowned, reason = None, _not_comparable(current.tags, tags, select_by)
            if reason is None:
                current_value = float(current.tags[select_by])
                better = (value < current_value if select_by == "validation_loss"
                          else value > current_value)
                if better:
                    crowned = (f"{label} is the new champion: {shown} beats version "
                               f"{current.version}'s {current_value:.4f} (same evaluation key)")
                else:
                    reason = (f"{label}'s {shown} is not better than version "
                              f"{current.version}'s {current_value:.4f}")
        if crowned:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            mlflow.set_tag("champion", "true")
            return crowned
        mlflow.set_tag("champion", "false")
        return f"champion stays at version {current.version}: {reason}"


# What makes two runs' scores comparable ("seed" is the split seed, see evaluation_key): the same
# held-out diseases for any score; for the validation loss, the same loss (its target, tokens and
# cut); for symptom F1, the same metric and answer length. The champion rule compares the
# fields of its --select-by value; the key (its digest, shown in the UI) holds them all.
SPLIT_KEY_PARAMS = ("dataset_content_sha256", "max_samples", "seed", "validation_fraction",
                    "split_validation_sha256")
KEY_PARAMS_BY_SELECTION = {
    "validation_loss": (*SPLIT_KEY_PARAMS, "loss_on", "tokenizer_sha256", "max_length_effective",
                        "prompt_format"),
    "symptom_f1": (*SPLIT_KEY_PARAMS, "metric_version", "max_new_tokens"),
}
EVALUATION_KEY_PARAMS = tuple(dict.fromkeys(
    name for names in KEY_PARAMS_BY_SELECTION.values() for name in names))
# key params added after keys were first logged: at this value (or missing) they are left out of
# the key, so a key logged before them reads, and digests, as it did
KEY_PARAMS_LEFT_OUT_AT = {"prompt_format": "plain"}


def serving_parameters(generation_config) -> dict[str, Any]:
    """The generation settings a served model takes as inference parameters: greedy by default
    (the answers the run scored), with the run's sampling settings as the defaults for a caller
    who asks for ``do_sample`` (MedLM's own where the model has none)."""
    from medlm.generate import GenerationSettings

    defaults = GenerationSettings()
    names = {"max_new_tokens": int, "do_sample": bool, "top_k": int, "top_p": float,
             "temperature": float, "repetition_penalty": float}
    params = {name: kind(value if (value := getattr(generation_config, name, None)) is not None
                         else getattr(defaults, name))
              for name, kind in names.items()}
    params["do_sample"] = False  # served answers are reproducible; {"do_sample": true} samples
    return params


def evaluation_key(params: dict[str, Any]) -> dict[str, str]:
    """The params that must be equal for two runs' validation figures to be compared. Its
    ``seed`` is the split seed: the training seed is not in it (two training seeds of one
    recipe compare), and a run logged before ``split_seed`` existed, whose ``seed`` split the
    data, keeps the key it had."""
    params = {**params, "seed": split_seed_of(params)}
    return {name: str(_param_value(params.get(name))) for name in EVALUATION_KEY_PARAMS
            if not _left_out(name, params)}


def _left_out(name: str, params: dict[str, Any]) -> bool:
    return (name in KEY_PARAMS_LEFT_OUT_AT
            and params.get(name, KEY_PARAMS_LEFT_OUT_AT[name]) == KEY_PARAMS_LEFT_OUT_AT[name])


def split_seed_of(params: dict[str, Any]) -> Any:
    """A run's split seed from its params: ``split_seed``, or ``seed`` for a run logged before
    the two were apart."""
    return params.get("split_seed", params.get("seed"))


def key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _not_comparable(champion_tags: dict[str, str], tags: dict[str, str],
                    select_by: str) -> str | None:
    """Why the champion and a new version cannot be compared on ``select_by``; None if they can."""
    hint = " (--promote makes it the champion anyway)"
    if "evaluation_key_json" not in champion_tags:
        return ("not compared: the champion has no evaluation key (registered before MedLM "
                "recorded one)" + hint)
    # a version registered before select_by was tagged was selected by the validation loss
    champion_rule = champion_tags.get("select_by", "validation_loss")
    if champion_rule != select_by:
        return (f"not compared: the champion was selected by {champion_rule}, this version by "
                f"{select_by}" + hint)
    theirs = json.loads(champion_tags["evaluation_key_json"])
    ours = json.loads(tags["evaluation_key_json"])
    differences = "; ".join(
        f"{'split_seed' if name == 'seed' else name} "
        f"{_short(theirs.get(name, KEY_PARAMS_LEFT_OUT_AT.get(name)))} vs "
        f"{_short(ours.get(name, KEY_PARAMS_LEFT_OUT_AT.get(name)))}"
        for name in KEY_PARAMS_BY_SELECTION[select_by] if theirs.get(name) != ours.get(name))
    if differences:
        return f"not compared: a different evaluation ({differences})" + hint
    if select_by not in champion_tags or select_by not in tags:
        return f"not compared: {select_by} is missing on one of the two versions" + hint
    return None


def _short(value: str | None) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "all"
    return value[:12] if len(value) == 64 else value


def logged_metrics(run_id: str, prefix: str) -> dict[str, float]:
    """A run's latest metrics whose names start with ``prefix``, prefix removed."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {name.removeprefix(prefix): value for name, value in metrics.items()
            if name.startswith(prefix)}


def log_sweep_summary(table: pd.DataFrame, best: pd.Series, sweepable: tuple[str, ...]) -> None:
    """The sweep's table (``sweep.csv``), its best child's scores and settings, on the active
    (parent) run."""
    mlflow.log_text(table.to_csv(index=False), "sweep.csv")
    mlflow.log_metrics({"best_validation_loss": float(best["validation_loss"]),
                        "best_symptom_f1": float(best["symptom_f1"])})
    mlflow.set_tags({"best_child_run_id": best["run_id"],
                     **{f"best_{name}": str(best[name]) for name in sweepable}})


STEP_METRICS = ("step/training_loss", "step/learning_rate", "step/grad_norm",
                "step/tokens_per_sec")


def _last_step(run_id: str, metric: str) -> int:
    return max((point.step for point in MlflowClient().get_metric_history(run_id, metric)),
               default=0)


def _end_run_if_possible(status: int) -> None:
    """End the active run as ``status``, unless the store has gone away: then the error that
    ended the run is the one to report, not this one's."""
    try:
        mlflow.flush_async_logging()
        mlflow.end_run(RunStatus.to_string(status))
    except Exception as error:  # noqa: BLE001 - the store is down: nothing more to tell it
        log.warning("could not mark the run %s in MLflow: %s", RunStatus.to_string(status),
                    str(error).splitlines()[0] if str(error) else type(error).__name__)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _new_sqlite_file(uri: str) -> str | None:
    """The file of a SQLite store that does not exist yet (the run creates it), else None."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    return path if path is not None and not os.path.exists(path) else None


def server_stopped_answering() -> bool:
    """Is the tracking URI a server that no longer answers (a run's error was its outage)?"""
    if not _is_server(mlflow.get_tracking_uri()):
        return False
    try:
        check_tracking_store()
    except MedLMError:
        return True
    return False


STORE_TIMEOUT_S = 5.0  # a tracking server that has not answered by then is taken as down
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # the user's own values win


def check_tracking_store() -> None:
    """The tracking store answers, before any work (MLflow's own retries would make a dead
    server cost minutes, then a traceback): else a one-line error naming the URI (without a
    password). A server is asked through MLflow's own client, so its TLS and credential
    settings apply, once and within ``STORE_TIMEOUT_S``."""
    from unittest import mock

    uri = mlflow.get_tracking_uri()
    new_file = _new_sqlite_file(uri)
    if new_file is not None:
        from medlm._paths import check_writable  # a new store: created by the run, not here

        check_writable(os.path.dirname(os.path.abspath(new_file)),
                       f"the tracking store {uri!r}'s directory")
        return
    server = _is_server(uri)
    if server:
        # MLflow retries a failed request 7 times with exponential backoff (minutes of waiting
        # per call when the server goes away mid-run): a few tries are enough, the run resumes
        for name, value in SERVER_RETRIES.items():
            os.environ.setdefault(name, value)
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(STORE_TIMEOUT_S))} if server else {}
    try:
        with mock.patch.dict(os.environ, probe):  # the probe's bounds, for this call only
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # MLflow's, SQLAlchemy's or the filesystem's: all the same here
        text = str(error).strip()
        reason = text.splitlines()[0][:300] if text else type(error).__name__
        shown = _without_password(uri)
        if server:
            raise MedLMError(
                f"the tracking server {shown!r} (MLFLOW_TRACKING_URI) does not answer ({reason}): "
                "expected a running MLflow server there (mlflow server --host HOST --port "
                "PORT), or MLFLOW_TRACKING_URI unset for ./mlflow.db") from None
        raise MedLMError(
            f"the tracking URI {shown!r} cannot be used ({reason}): expected http(s)://HOST:PORT "
            "of an MLflow server, sqlite:///PATH/mlflow.db in a writable directory, or "
            "MLFLOW_TRACKING_URI unset for ./mlflow.db") from None


def _without_password(uri: str) -> str:
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", uri)


def artifact_directory(experiment: str) -> str | None:
    """The local directory a run of ``experiment`` writes its artifacts to: the experiment's
    location, or for one not created yet MLflow's default ``./mlruns``; None where the store
    keeps them (a tracking server, a remote artifact store)."""
    from urllib.parse import urlparse

    uri = mlflow.get_tracking_uri()
    if _is_server(uri):
        return None
    found = (None if _new_sqlite_file(uri) is not None  # no experiment yet: nothing to ask
             else MlflowClient().get_experiment_by_name(experiment))
    location = found.artifact_location if found is not None else "mlruns"
    parsed = urlparse(location)
    return (parsed.path or location) if parsed.scheme in ("", "file") else None


def compare_runs_hint() -> str:
    """Where to look at the runs: the team server's own UI, or ``mlflow ui`` for a local store."""
    uri = mlflow.get_tracking_uri()
    return uri if _is_server(uri) else "mlflow ui"


def run_outcome(run_id: str) -> tuple[str, dict[str, Any] | None]:
    """A run's status, and for a finished run its best epoch, scores and registered version:
    what a sweep's table needs of a child that ended while the sweep was down."""
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
        "symptom_f1": metrics.get("best_symptom_f1", float("nan")),
        "word_f1": metrics.get("best_word_f1", float("nan")),
        "version": str(versions[0]) if versions else None}


def end_abandoned_run(run_id: str) -> None:
    """Mark KILLED a run a SIGKILL left RUNNING, which nothing will resume."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def _param_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "; ".join(map(str, value))
    return "" if value is None else value


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")


def resolve_model_uri(model_uri: str, registered_model: str = "medlm") -> str:
    """Accept ``models:/name@alias``, ``models:/name/3``, a bare version ``3``, ``runs:/...``,
    an offline base name, a local directory or GGUF file; check registry URIs up front so a miss
    lists what exists."""
    from medlm.offline import known_bases, resolve_base_name

    local = os.path.expanduser(model_uri)
    if os.path.isdir(local) or (os.path.isfile(local) and local.lower().endswith(".gguf")):
        return local
    base = resolve_base_name(model_uri)
    if base:
        return str(base)
    if model_uri.isdigit():
        model_uri = f"models:/{registered_model}/{model_uri}"
    match = _MODELS_URI.match(model_uri)
    if match and not (match["alias"] or match["version"]) and _LOGGED_MODEL_ID.match(
            match["name"]):  # MLflow 3: models:/m-<model id>, a logged model
        _check_logged_model(model_uri, match["name"])
    elif match and match["version"] == "latest":  # the newest version, as MLflow means it
        _check_registry(model_uri, match["name"], None, None)
        versions = MlflowClient().search_model_versions(
            f"name = '{match['name']}'", max_results=1, order_by=["version_number DESC"])
        if not versions:
            raise MedLMError(f"model URI {model_uri!r}: registered model {match['name']!r} has "
                             "no versions: expected one, trained with python -m experiments.run")
        newest = max(int(version.version) for version in versions)
        model_uri = f"models:/{match['name']}/{newest}"
    elif match:
        _check_registry(model_uri, match["name"], match["alias"], match["version"])
    elif not re.match(r"^[a-z][a-z0-9+.-]*:/", model_uri):
        raise MedLMError(f"model URI {model_uri!r} is not a directory or URI: expected "
                         "models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, "
                         "models:/m-MODEL_ID, runs:/RUN_ID/model, an offline "
                         f"base ({known_bases()}), a local directory or a .gguf file")
    return model_uri


_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")


def _check_logged_model(model_uri: str, model_id: str) -> None:
    try:
        MlflowClient().get_logged_model(model_id)
    except MlflowException:
        raise MedLMError(f"model URI {model_uri!r}: no logged model {model_id!r} at "
                         f"{mlflow.get_tracking_uri()}: expected the id shown in the run's "
                         "Models tab") from None


def _check_registry(model_uri: str, name: str, alias: str | None, version: str | None) -> None:
    client = MlflowClient()
    where = mlflow.get_tracking_uri()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = [model.name for model in client.search_registered_models()]
        known = ", ".join(names) if names else "none"
        raise MedLMError(f"model URI {model_uri!r}: no registered model {name!r} at {where} "
                         f"(registered models: {known}); train one with python -m "
                         "experiments.run") from None
    versions = client.search_model_versions(f"name = '{name}'")
    numbers = sorted((str(model_version.version) for model_version in versions), key=int)
    aliases = ", ".join(f"@{alias_name} -> {number}"
                        for alias_name, number in sorted(registered.aliases.items()))
    known = f"versions: {', '.join(numbers) or 'none'}; aliases: {aliases or 'none'}"
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version:
            client.get_model_version(name, version)
    except MlflowException:
        missing = f"alias @{alias}" if alias else f"version {version}"
        raise MedLMError(f"model URI {model_uri!r}: registered model {name!r} has no {missing} "
                         f"at {where} ({known})") from None


def source_run(model_uri: str, registered_model: str = "medlm"):
    """The MLflow run a ``models:/`` or ``runs:/`` URI (or bare version) was logged by; None for
    local directories and files."""
    resolved = resolve_model_uri(model_uri, registered_model)
    client = MlflowClient()
    match = _MODELS_URI.match(resolved)
    run_id = None
    if match and _LOGGED_MODEL_ID.match(match["name"]) and not match["version"]:
        run_id = client.get_logged_model(match["name"]).source_run_id
    elif match:
        version = (client.get_model_version_by_alias(match["name"], match["alias"])
                   if match["alias"] else
                   client.get_model_version(match["name"], match["version"])
                   if match["version"] else None)
        run_id = version.run_id if version is not None else None
    elif resolved.startswith("runs:/"):
        run_id = resolved.removeprefix("runs:/").split("/")[0]
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise MedLMError(f"model URI {model_uri!r}: no run {run_id!r} at "
                         f"{mlflow.get_tracking_uri()}: expected a run id that exists") from None


def load_logged_model(model_uri: str, asked: str | None = None):
    """(tokenizer, model) of a logged transformers model (``models:/``, ``runs:/`` or an MLflow
    model directory), as components; ``asked``: the URI as the user wrote it, for errors."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            components = mlflow.transformers.load_model(model_uri, return_type="components")
    except MlflowException as error:
        first_line = str(error).strip().splitlines()[0][:200]
        raise MedLMError(f"could not load model URI {asked or model_uri!r} ({first_line}): "
                         "expected a logged transformers model") from None
    return components["tokenizer"], components["model"]
