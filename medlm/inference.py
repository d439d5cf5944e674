"""Inference: a trained model loaded from wherever a user names it (a registry or run URI,
checked up front so a miss lists what exists; a directory; a file; an offline base), ready to
write symptoms (``medlm.generate.generate``)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.model_utils import FLAVOR_CONFIG_CODE
from sqlalchemy.exc import SQLAlchemyError

from medlm.errors import MedLMError, first_line
from medlm.modeling import load_tokenizer_and_model
from medlm.offline import known_bases, resolve_base_name
from medlm.prompts import ensure_pad_token
from medlm.store import shown_tracking_uri


def load_model_for_inference(model_uri: str, registered_model: str = "medlm"):
    """(tokenizer, model) from the registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/NAME/latest``, a bare version), a logged model (``models:/m-MODEL_ID``), a run
    (``runs:/RUN_ID/model``), an MLflow model directory, a ``save_pretrained`` directory, a
    .gguf file or an offline base name."""

    resolved = resolve_model_uri(model_uri, registered_model)
    if os.path.isfile(resolved) or (os.path.isdir(resolved) and
                                    not os.path.isfile(os.path.join(resolved, "MLmodel"))):
        return load_tokenizer_and_model(resolved)
    tokenizer, model = load_logged_model(resolved, asked=model_uri)
    return ensure_pad_token(tokenizer, model)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")


def resolve_model_uri(model_uri: str, registered_model: str = "medlm") -> str:
    """Accept ``models:/name@alias``, ``models:/name/3``, a bare version ``3``, ``runs:/...``,
    an offline base name, a local directory or GGUF file; check registry URIs up front so a miss
    lists what exists."""

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
                         f"{shown_tracking_uri()}: expected the id shown in the run's "
                         "Models tab") from None


def _check_registry(model_uri: str, name: str, alias: str | None, version: str | None) -> None:
    try:
        client = MlflowClient()  # opens the store: a damaged SQLite file fails here
    except SQLAlchemyError as error:
        raise _unreadable_store(error) from None
    where = shown_tracking_uri()
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
                         f"{shown_tracking_uri()}: expected a run id that exists") from None


def load_logged_model(model_uri: str, asked: str | None = None):
    """(tokenizer, model) of a logged transformers model (``models:/``, ``runs:/`` or an MLflow
    model directory), as components; ``asked``: the URI as the user wrote it, for errors.

    Its files are checked before MLflow loads them (``_check_logged_files``): MLflow's loader
    turns ``trust_remote_code`` on by itself for a class transformers does not have, and reads
    missing weights as a traceback."""
    shown = asked or model_uri
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
            _check_logged_files(shown, local)
            components = mlflow.transformers.load_model(local, return_type="components")
    except (MlflowException, OSError) as error:
        raise MedLMError(f"could not load model URI {shown!r} ({first_line(error)[:200]}): "
                         "expected a logged transformers model") from None
    except SQLAlchemyError as error:
        raise _unreadable_store(error) from None
    return components["tokenizer"], components["model"]


def _check_logged_files(model_uri: str, local: str) -> None:
    """The logged model in ``local`` (``model_uri``'s files) has every file it was logged with,
    its weights in safetensors, and no class or code that transformers does not have (which
    MLflow's loader would run: MedLM never runs a model's own code)."""
    import transformers  # heavy: only once a logged model is about to load anyway

    described = Path(local) / MLMODEL_FILE_NAME
    if not described.is_file():
        raise MedLMError(f"model URI {model_uri!r}: files missing in {local}: MLmodel (its "
                         "artifacts were deleted?): expected the files the model was logged "
                         "with; log it again (python -m experiments.run)")
    flavor = Model.load(str(described)).flavors.get("transformers")
    if flavor is None:
        raise MedLMError(f"model URI {model_uri!r} is not a transformers model: expected one "
                         "logged with mlflow.transformers (python -m experiments.run does)")
    classes = [flavor.get("pipeline_model_type"),
               *(flavor.get(f"{name}_type") for name in flavor.get("components", []))]
    needs = [f"class {name}" for name in classes if not hasattr(transformers, str(name))]
    if flavor.get(FLAVOR_CONFIG_CODE):
        needs.append(f"code paths {flavor[FLAVOR_CONFIG_CODE]}")
    if needs:
        raise MedLMError(f"model URI {model_uri!r} needs code that comes with it "
                         f"({', '.join(needs)}: not in transformers), and MedLM never runs a "
                         "model's own code: expected a model of an architecture built into "
                         "transformers, as python -m experiments.run logs it")
    if "model_binary" not in flavor:  # weights on the Hub, at a pinned revision
        return
    weights = Path(local) / flavor["model_binary"]
    expected = [weights / "config.json", *(Path(local) / "components" / name
                                          for name in flavor.get("components", []))]
    missing = [path for path in expected if not path.exists()]
    if not list(weights.glob("*.safetensors")):
        missing.append(weights / "model.safetensors")
    if missing:
        names = ", ".join(str(path.relative_to(local)) for path in missing)
        raise MedLMError(f"model URI {model_uri!r}: files missing in {local}: {names} (deleted "
                         "from the artifact store?): expected the files the model was logged "
                         "with, weights in safetensors; log it again (python -m experiments.run)")


def _unreadable_store(error: Exception) -> MedLMError:
    """A tracking store that cannot be read (a damaged ``mlflow.db``), in one line."""
    return MedLMError(f"the tracking store {shown_tracking_uri()} cannot "
                      f"be read ({first_line(error)[:200]}): expected an MLflow tracking "
                      "database; a damaged mlflow.db is left as it is: restore it from a "
                      "backup, or move it aside to start an empty one")
