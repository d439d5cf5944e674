"""The MLflow Model Registry: a run's best epoch logged and registered as a version, tagged with
its scores and evaluation key (which ``medlm.compare`` compares)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.models import infer_signature

from medlm.checkpoint import disk_full
from medlm.errors import DiskFull
from medlm.generate import GenerationSettings
from medlm.prompts import prompt_format_of, serving_template
from medlm.scores import scores_text
from medlm.store import artifact_directory, without_password
from medlm.tracking import MlflowTracker, param_value
from medlm.train import EpochResult

CHAMPION_ALIAS = "champion"


def pip_requirements() -> list[str]:
    """Pinned requirements logged with the model, so it loads back with the same libraries."""
    import safetensors
    import torch
    import transformers

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"  # drop local tags such as +cpu / +cu121

    return [pin("torch", torch.__version__), pin("transformers", transformers.__version__),
            pin("safetensors", safetensors.__version__), pin("mlflow", mlflow.__version__)]


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
    return {name: str(param_value(params.get(name))) for name in EVALUATION_KEY_PARAMS
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


def register(tracker: MlflowTracker, model, tokenizer, best: EpochResult, params: dict[str, Any],
             licence: tuple[str, Any] | None = None) -> tuple[str, dict]:
    """Log the run's model (transformers flavor, safetensors) and register it (once, if the
    run was resumed after it was registered). The version is tagged with its scores, the
    tracker's ``select_by`` and its evaluation key (``evaluation_key``); returns (version, its
    tags), which ``compare.maybe_crown`` decides on."""
    select_by = tracker.select_by
    version = _version_of_this_run(tracker, best.epoch)
    if version is None:
        _fail_unfinished_models(tracker.run_id)
        with _disk_full_while_logging(tracker, params):
            version = _log_model(tracker, model, tokenizer, best)
    else:  # a resumed run, killed after its model was registered: not a second version
        tracker.log_best(best)
    scores = {"validation_loss": best.validation_loss, **best.scores}
    key = evaluation_key(params)
    tags = {"validation_loss": repr(best.validation_loss), "select_by": select_by,
            "best_epoch": str(best.epoch),
            **{name: repr(value) for name, value in best.scores.items()},
            "evaluation_key": key_digest(key), "evaluation_key_json": json.dumps(key)}
    if licence is not None:  # the base's terms go with what is made from it
        tags["base_licence"] = licence[0]
        if licence[1] is not None and not MlflowClient().list_artifacts(
                tracker.run_id, "base_licence"):
            mlflow.log_artifact(str(licence[1]), artifact_path="base_licence")
    client = MlflowClient()
    for name, value in tags.items():
        client.set_model_version_tag(tracker.registered_model, version, name, value)
    client.update_model_version(tracker.registered_model, version, description=(
        f"{params.get('model')} fine-tuned on {params.get('dataset_source')} "
        f"({params.get('rows_train')} training rows); best of {len(tracker.epochs)} epochs by "
        f"{select_by}: epoch {best.epoch}, "
        + scores_text(scores) + f". Run {tracker.run_id}."
        + (f" Base model licence: {licence[0]} (run artifact base_licence/)."
           if licence is not None else "")))
    return version, tags


@contextlib.contextmanager
def _disk_full_while_logging(tracker: MlflowTracker, params: dict[str, Any]) -> Iterator[None]:
    """Model logging that runs out of space costs nothing trained (the run's checkpoint is
    removed only once the run has its model): ``DiskFull`` says where the space ran out and
    what is kept."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        checkpoint = Path(str(params.get("checkpoint_dir", "checkpoints"))) / tracker.run_id
        raise DiskFull(f"no space left on device in {_model_destination(tracker.experiment)} "
                       f"while logging run {tracker.run_id}'s model",
                       f"its training is kept in {checkpoint}") from None


def _model_destination(experiment: str) -> str:
    """Where a logged model's files go: the experiment's artifact directory (or the artifact
    store's URI), and the temporary directory MLflow saves them to first where that is on
    another filesystem."""
    store = artifact_directory(experiment) or without_password(mlflow.get_artifact_uri())
    temporary = tempfile.gettempdir()
    try:
        same_filesystem = os.stat(store).st_dev == os.stat(temporary).st_dev
    except OSError:  # a remote store
        same_filesystem = False
    return store if same_filesystem else f"{store} or {temporary} (where the model is saved first)"


def _fail_unfinished_models(run_id: str) -> None:
    """Mark FAILED the logged models of the run that a kill left PENDING (half-written): the
    resumed run logs its model anew, and the Models tab shows one model ready."""
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models([experiment_id],
                                              filter_string=f"source_run_id = '{run_id}'"):
        if logged.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)


def _version_of_this_run(tracker: MlflowTracker, best_epoch: int) -> str | None:
    """The version this run registered before it was interrupted, if it holds the weights
    of ``best_epoch`` (a resume with more --epochs may have found a better one: a new
    version then)."""
    client = MlflowClient()
    versions = client.search_model_versions(
        f"name = '{tracker.registered_model}' and run_id = '{tracker.run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    recorded = newest.tags.get("best_epoch",
                               client.get_run(tracker.run_id).data.metrics.get("best_epoch"))
    if recorded is not None and int(float(recorded)) != best_epoch:
        return None
    return str(newest.version)


def _log_model(tracker: MlflowTracker, model, tokenizer, best: EpochResult) -> str:
    """Log the model, register it, log the best epoch's figures; the version."""
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
        registered_model_name=tracker.registered_model,
        # log_model links every run metric logged at its step to the model (step/* and
        # system/* points too, and at the default 0 the untuned scores): at -1 none is;
        # the best epoch's figures are linked below, by name
        step=-1,
    )  # MLflow then checks the input example serves (the transformers flavor insists)
    tracker.log_best(best, model_id=info.model_id)
    return str(info.registered_model_version)
