"""A trained model from wherever a user names it (a registry or run URI, checked up front so a
miss lists what exists; a directory; a file; an offline base), ready for ``generate()``."""

import contextlib
import io
import os
import re
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.model_utils import FLAVOR_CONFIG_CODE
from sqlalchemy.exc import SQLAlchemyError

from medlm.errors import MedLMError, first_line
from medlm.modeling import Precision, load_tokenizer_and_model, resolve_precision
from medlm.offline import OFFLINE_BASES, resolve_base_name
from medlm.prompts import ensure_pad_token
from medlm.store import shown_tracking_uri

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")  # MLflow 3: models:/m-<id>, a logged model


def load_model_for_inference(model_uri: str, registered_model: str = "medlm"):
    """(tokenizer, model) from ``models:/NAME@ALIAS``, ``/VERSION`` or ``/latest``, a bare
    version, ``models:/m-MODEL_ID``, ``runs:/RUN_ID/model``, an MLflow model directory, a
    ``save_pretrained`` directory, a .gguf file or an offline base name."""
    resolved = resolve_model_uri(model_uri, registered_model)[0]
    if os.path.isfile(resolved) or (os.path.isdir(resolved) and
                                    not os.path.isfile(os.path.join(resolved, MLMODEL_FILE_NAME))):
        return load_tokenizer_and_model(resolved)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            local = mlflow.artifacts.download_artifacts(artifact_uri=resolved)
            _check_logged_files(model_uri, local)
            components = mlflow.transformers.load_model(local, return_type="components")
    except (MlflowException, OSError) as error:
        raise MedLMError(f"could not load model URI {model_uri!r} ({first_line(error)[:200]}): "
                         "expected a logged transformers model") from None
    except SQLAlchemyError as error:
        raise _unreadable_store(error) from None
    return ensure_pad_token(components["tokenizer"], components["model"])


def source_run(model_uri: str, registered_model: str = "medlm"):
    """The MLflow run a ``models:/`` or ``runs:/`` URI was logged by; None for local paths."""
    resolved, run_id = resolve_model_uri(model_uri, registered_model)
    if resolved.startswith("runs:/"):
        run_id = resolved.removeprefix("runs:/").split("/")[0]
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise MedLMError(f"model URI {model_uri!r}: no run {run_id!r} at "
                         f"{shown_tracking_uri()}: expected a run id that exists") from None


def answer_precision(requested: str | None, run_params: dict[str, str] | None,
                     device) -> tuple[Precision, str | None]:
    """The precision answers are decoded in, so they are the ones the run scored, and a note when
    it is not the run's: the run's (bf16 where it trained in bf16, else fp32; its ``tf32``), but
    this machine's ``auto`` for a bf16 it lacks natively (emulated: very slow)."""
    params = run_params or {}
    logged = params.get("precision_effective")
    run_answers = None if logged is None else ("bf16" if logged == "bf16" else "fp32")
    precision = resolve_precision(requested or ("fp32" if run_answers == "fp32" else "auto"),
                                  device, tf32=params.get("tf32", str(not params)) == "True")
    decoded = "bf16" if precision.name == "bf16" else "fp32"
    if run_answers is None or decoded == run_answers:
        return precision, None
    note = f"note: answers decoded in {decoded}, the run decoded its own in {run_answers}"
    return precision, note + ("" if requested or torch.device(device).type != "cpu" else
                              f" (not native here; --precision {run_answers} forces it)")


def resolve_model_uri(model_uri: str, registered_model: str = "medlm") -> tuple[str, str | None]:
    """(a local directory or GGUF file, an offline base's file, or an MLflow URI: a bare version
    of ``registered_model``, ``latest`` made the newest version's number; the run a registry
    version or logged model is of), checked up front."""
    local = os.path.expanduser(model_uri)
    if os.path.isdir(local) or (os.path.isfile(local) and local.lower().endswith(".gguf")):
        return local, None
    if base := resolve_base_name(model_uri):
        return str(base), None
    if model_uri.isdigit():
        model_uri = f"models:/{registered_model}/{model_uri}"
    if not (match := _MODELS_URI.match(model_uri)):
        if not re.match(r"^[a-z][a-z0-9+.-]*:/", model_uri):
            raise MedLMError(f"model URI {model_uri!r} is not a directory or URI: expected "
                             "models:/NAME@ALIAS, /VERSION or /latest, models:/m-MODEL_ID, "
                             f"runs:/RUN_ID/model, an offline base ({', '.join(OFFLINE_BASES)}), "
                             "a local directory or a .gguf file")
        return model_uri, None
    name, alias, version = match["name"], match["alias"], match["version"]
    if not (alias or version) and _LOGGED_MODEL_ID.match(name):
        try:
            return model_uri, MlflowClient().get_logged_model(name).source_run_id
        except MlflowException:
            raise MedLMError(f"model URI {model_uri!r}: no logged model {name!r} at "
                             f"{shown_tracking_uri()}: expected the id shown in the run's "
                             "Models tab") from None
    found = _check_registry(model_uri, name, alias, version)
    if version == "latest":  # the newest version, as MLflow means it
        model_uri = f"models:/{name}/{found.version}"
    return model_uri, found.run_id if found else None


def _check_registry(model_uri: str, name: str, alias: str | None, version: str | None):
    """The version ``alias`` or ``version`` (or "latest") names, None if neither; else an error
    listing those there are."""
    try:
        client = MlflowClient()  # opens the store: a damaged SQLite file fails here
    except SQLAlchemyError as error:
        raise _unreadable_store(error) from None
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(model.name for model in client.search_registered_models()) or "none"
        raise MedLMError(f"model URI {model_uri!r}: no registered model {name!r} at "
                         f"{shown_tracking_uri()} (registered models: {known}); train one with "
                         "python -m experiments.run") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":  # ValueError when there is none
            return max(client.search_model_versions(f"name = '{name}'"),
                       key=lambda each: int(each.version))
        return client.get_model_version(name, version) if version else None
    except (MlflowException, ValueError):
        numbers = sorted((str(each.version) for each in
                          client.search_model_versions(f"name = '{name}'")), key=int)
        aliases = ", ".join(f"@{alias_name} -> {number}"
                            for alias_name, number in sorted(registered.aliases.items()))
        missing = f"alias @{alias}" if alias else f"version {version}"
        raise MedLMError(f"model URI {model_uri!r}: registered model {name!r} has no {missing} "
                         f"at {shown_tracking_uri()} (versions: {', '.join(numbers) or 'none'}; "
                         f"aliases: {aliases or 'none'})") from None


def _check_logged_files(model_uri: str, local: str) -> None:
    """The logged model in ``local`` has its files, weights in safetensors, and no class or code
    transformers lacks (MLflow's loader would turn ``trust_remote_code`` on by itself)."""
    import transformers  # heavy: only once a logged model is about to load anyway
    root = Path(local)
    if not (root / MLMODEL_FILE_NAME).is_file():
        missing = [root / MLMODEL_FILE_NAME]
    else:
        flavor = Model.load(str(root / MLMODEL_FILE_NAME)).flavors.get("transformers")
        if flavor is None:  # MLflow's loader refuses it
            return
        components = flavor.get("components", [])
        classes = [flavor.get("pipeline_model_type"),
                   *(flavor.get(f"{name}_type") for name in components)]
        needs = [f"class {name}" for name in classes if not hasattr(transformers, str(name))]
        if flavor.get(FLAVOR_CONFIG_CODE):
            needs.append(f"code paths {flavor[FLAVOR_CONFIG_CODE]}")
        if needs:
            raise MedLMError(f"model URI {model_uri!r} needs code that comes with it "
                             f"({', '.join(needs)}: not in transformers), and MedLM never runs "
                             "a model's own code: expected an architecture built into "
                             "transformers, as python -m experiments.run logs it")
        if "model_binary" not in flavor:  # weights on the Hub, at a pinned revision
            return
        weights = root / flavor["model_binary"]
        missing = [path for path in (weights / "config.json",
                                     *(root / "components" / name for name in components))
                   if not path.exists()]
        if not list(weights.glob("*.safetensors")):
            missing.append(weights / "model.safetensors")
    if missing:
        names = ", ".join(str(path.relative_to(root)) for path in missing)
        raise MedLMError(f"model URI {model_uri!r}: files missing in {local}: {names} (deleted "
                         "from the artifact store?): expected the files the model was logged "
                         "with, weights in safetensors; log it again (python -m experiments.run)")


def _unreadable_store(error: Exception) -> MedLMError:
    return MedLMError(f"the tracking store {shown_tracking_uri()} cannot be read "
                      f"({first_line(error)[:200]}): expected an MLflow tracking database; a "
                      "damaged mlflow.db is left as it is: restore it from a backup, or move it "
                      "aside to start an empty one")
