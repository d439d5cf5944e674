"""The MLflow Model Registry: a run's best epoch registered as a version, tagged with its scores
and evaluation key (which ``medlm.compare`` compares)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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

# What must be equal for two runs' scores to compare: the held-out diseases for any score ("seed"
# is the split seed); for the loss, its target, tokens and cut; for symptom F1, the metric and
# answer length. The champion rule compares its --select-by's fields; the key holds them all.
SPLIT_KEY_PARAMS = ("dataset_content_sha256", "max_samples", "seed", "validation_fraction",
                    "split_validation_sha256")
KEY_PARAMS_BY_SELECTION = {
    "validation_loss": (*SPLIT_KEY_PARAMS, "loss_on", "tokenizer_sha256", "max_length_effective",
                        "prompt_format"),
    "symptom_f1": (*SPLIT_KEY_PARAMS, "metric_version", "max_new_tokens"),
}
EVALUATION_KEY_PARAMS = tuple(dict.fromkeys(
    name for names in KEY_PARAMS_BY_SELECTION.values() for name in names))
# left out of the key at this value (or missing), so that keys logged before them digest alike
KEY_PARAMS_LEFT_OUT_AT = {"prompt_format": "plain"}


def pip_requirements() -> list[str]:
    """The libraries the model loads back with, pinned (local tags such as +cpu dropped)."""
    import safetensors
    import torch
    import transformers

    return [f"{module.__name__}=={module.__version__.split('+')[0]}"
            for module in (torch, transformers, safetensors, mlflow)]


def serving_parameters(generation_config) -> dict[str, Any]:
    """The generation settings a served model takes as inference parameters: greedy (the
    answers the run scored), with the run's sampling settings (else MedLM's) for ``do_sample``."""
    defaults = GenerationSettings()
    kinds = {"max_new_tokens": int, "do_sample": bool, "top_k": int, "top_p": float,
             "temperature": float, "repetition_penalty": float}
    params = {name: kind(value if (value := getattr(generation_config, name, None)) is not None
                         else getattr(defaults, name)) for name, kind in kinds.items()}
    return {**params, "do_sample": False}  # {"do_sample": true} samples


def evaluation_key(params: dict[str, Any]) -> dict[str, str]:
    """``EVALUATION_KEY_PARAMS`` of ``params``, ``seed`` the split seed: training seeds compare."""
    params = {**params, "seed": split_seed_of(params)}
    left_out = {name for name, value in KEY_PARAMS_LEFT_OUT_AT.items()
                if params.get(name, value) == value}
    return {name: str(param_value(params.get(name))) for name in EVALUATION_KEY_PARAMS
            if name not in left_out}


def split_seed_of(params: dict[str, Any]) -> Any:
    """``split_seed``, or ``seed`` for a run logged before the two were apart."""
    return params.get("split_seed", params.get("seed"))


def key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def register(tracker: MlflowTracker, model, tokenizer, best: EpochResult, params: dict[str, Any],
             licence: tuple[str, Any] | None = None) -> tuple[str, dict]:
    """Log the run's model and register it, once; tag the version with its scores,
    ``select_by`` and evaluation key. Returns (version, its tags)."""
    select_by, run_id, name = tracker.config.select_by, tracker.run_id, tracker.registered_model
    version = _version_of_this_run(tracker, best.epoch)
    if version is None:
        version = _log_model(tracker, model, tokenizer, best)
    else:  # a resumed run, killed after its model was registered: not a second version
        tracker.log_best(best)
    key = evaluation_key(params)
    tags = {"validation_loss": repr(best.validation_loss), "select_by": select_by,
            "best_epoch": str(best.epoch),
            **{score: repr(value) for score, value in best.scores.items()},
            "evaluation_key": key_digest(key), "evaluation_key_json": json.dumps(key)}
    if licence is not None:  # the base's terms go with what is made from it
        tags["base_licence"] = licence[0]
        if licence[1] is not None and not MlflowClient().list_artifacts(run_id, "base_licence"):
            mlflow.log_artifact(str(licence[1]), artifact_path="base_licence")
    client = MlflowClient()
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    client.update_model_version(name, version, description=(
        f"{params.get('model')} fine-tuned on {params.get('dataset_source')} "
        f"({params.get('rows_train')} training rows); best of {len(tracker.epochs)} epochs by "
        f"{select_by}: epoch {best.epoch}, "
        + scores_text({"validation_loss": best.validation_loss, **best.scores}) + f". Run {run_id}."
        + (f" Base model licence: {licence[0]} (run artifact base_licence/)."
           if licence is not None else "")))
    return version, tags


def _version_of_this_run(tracker: MlflowTracker, best_epoch: int) -> str | None:
    """The version this run registered before it was interrupted, if it holds ``best_epoch``
    (a resume with more --epochs may have found a better one: a new version then)."""
    client = MlflowClient()
    versions = client.search_model_versions(
        f"name = '{tracker.registered_model}' and run_id = '{tracker.run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    recorded = newest.tags.get("best_epoch",
                               client.get_run(tracker.run_id).data.metrics.get("best_epoch"))
    same_epoch = recorded is None or int(float(recorded)) == best_epoch
    return str(newest.version) if same_epoch else None


def _log_model(tracker: MlflowTracker, model, tokenizer, best: EpochResult) -> str:
    """Log (transformers flavor, safetensors) and register the model, and the best epoch's
    figures; the version. Served, a disease name becomes the prompt the model was trained on
    and only the continuation comes back."""
    client, run_id = MlflowClient(), tracker.run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    for logged in client.search_logged_models([experiment_id],
                                              filter_string=f"source_run_id = '{run_id}'"):
        if logged.status == LoggedModelStatus.PENDING:  # half-written by a kill
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
    example = ["Kidney Failure"]
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, task="text-generation",
            prompt_template=serving_template(tokenizer, prompt_format_of(model)),
            signature=infer_signature(example, ["Fatigue, swelling in the legs"],
                                      params=serving_parameters(model.generation_config)),
            input_example=example, pip_requirements=pip_requirements(),
            name="model", save_pretrained=True, registered_model_name=tracker.registered_model,
            step=-1)  # at step 0, every metric logged at step 0 would be linked to the model
        tracker.log_best(best, model_id=info.model_id)
    except Exception as error:  # the run's checkpoint stays until it has its model
        if not disk_full(error):
            raise
        checkpoint = Path(tracker.config.checkpoint_dir) / run_id
        where = _model_destination(tracker.config.experiment)
        raise DiskFull(f"no space left on device in {where} while logging run {run_id}'s model",
                       f"its training is kept in {checkpoint}") from None
    return str(info.registered_model_version)


def _model_destination(experiment: str) -> str:
    """Where a logged model's files go: the experiment's artifact directory (or URI), and the
    temporary directory MLflow saves them to first where that is another filesystem."""
    store = artifact_directory(experiment) or without_password(mlflow.get_artifact_uri())
    temporary = tempfile.gettempdir()
    try:
        same_filesystem = os.stat(store).st_dev == os.stat(temporary).st_dev
    except OSError:  # a remote store
        same_filesystem = False
    return store if same_filesystem else f"{store} or {temporary} (where the model is saved first)"
