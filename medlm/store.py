"""The MLflow tracking store, checked before any work: MLflow's own choice,
``MLFLOW_TRACKING_URI`` or else ``./mlflow.db`` with artifacts in ``./mlruns`` (plain mlflow ui)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from unittest import mock
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient

from medlm._paths import check_writable, lock_file
from medlm.errors import MedLMError, first_line

STORE_TIMEOUT_S = 5.0  # a tracking server that has not answered by then is taken as down
# MLflow's default, 7 retries with backoff, would wait minutes per call on a server gone away
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # the user's own values win


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _new_sqlite_file(uri: str) -> str | None:
    """The file of a SQLite store that does not exist yet, else None."""
    path = uri.removeprefix("sqlite:///")
    return path if uri.startswith("sqlite:///") and not os.path.exists(path) else None


def server_stopped_answering() -> bool:
    """Is the tracking URI a server that no longer answers (a run's error was its outage)?"""
    if _is_server(mlflow.get_tracking_uri()):
        try:
            check_tracking_store()
        except MedLMError:
            return True
    return False


def check_tracking_store() -> None:
    """The tracking store answers, asked once through MLflow's client (its TLS and credential
    settings apply) within ``STORE_TIMEOUT_S``: else a one-line error naming the URI."""
    uri = mlflow.get_tracking_uri()
    new_file = _new_sqlite_file(uri)
    if new_file is not None:  # made by the first run (first_open): bad input leaves no file
        check_writable(os.path.dirname(os.path.abspath(new_file)),
                       f"the tracking store {uri!r}'s directory")
        return
    server = _is_server(uri)
    if server:
        for name, value in SERVER_RETRIES.items():
            os.environ.setdefault(name, value)
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(STORE_TIMEOUT_S))} if server else {}
    try:
        with mock.patch.dict(os.environ, probe), first_open():  # the probe's bounds, here only
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # MLflow's, SQLAlchemy's or the filesystem's: all the same here
        reason = first_line(error)[:300]
        shown = without_password(uri)
        if server:
            raise MedLMError(
                f"the tracking server {shown!r} (MLFLOW_TRACKING_URI) does not answer ({reason}): "
                "expected a running MLflow server there (mlflow server --host HOST --port "
                "PORT), or MLFLOW_TRACKING_URI unset for ./mlflow.db") from None
        raise MedLMError(
            f"the tracking URI {shown!r} cannot be used ({reason}): expected http(s)://HOST:PORT "
            "of an MLflow server, sqlite:///PATH/mlflow.db in a writable directory, or "
            "MLFLOW_TRACKING_URI unset for ./mlflow.db") from None


@contextlib.contextmanager
def first_open() -> Iterator[None]:
    """A SQLite store's first use by this process (which makes or migrates its tables) under a
    lock on ``<database>.lock``: of two runs migrating at once, one fails."""
    uri = mlflow.get_tracking_uri()
    lock = (lock_file(uri.removeprefix("sqlite:///") + ".lock")
            if uri.startswith("sqlite:///") else None)
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)  # and the lock with it


def without_password(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` shown as ``***``: the only form of a
    URI a printed line, an error or a param may hold."""
    found = re.match(r"^([a-z0-9+.-]+://)([^/?#]*)(.*)$", uri, flags=re.IGNORECASE | re.DOTALL)
    if found is None:
        return uri
    scheme, authority, rest = found.groups()
    database = re.match(r"(postgres|mysql|mariadb|mssql|oracle)", scheme, flags=re.IGNORECASE)
    if database and "@" not in authority and "@" in rest.split("?")[0]:
        # a password holding an unquoted "/", which SQLAlchemy reads as the password's
        cut = rest.rfind("@", 0, len(rest.split("?")[0])) + 1
        authority, rest = authority + rest[:cut], rest[cut:]
    user, at, host = authority.rpartition("@")
    if not at or ":" not in user:
        return uri
    return f"{scheme}{user.split(':', 1)[0]}:***@{host}{rest}"


def shown_tracking_uri() -> str:
    return without_password(mlflow.get_tracking_uri())


def artifact_directory(experiment: str) -> str | None:
    """The local directory ``experiment``'s runs write artifacts to (``./mlruns`` for one not
    made yet); None where the store keeps them (a server, a remote artifact store)."""
    uri = mlflow.get_tracking_uri()
    if _is_server(uri):
        return None
    found = (None if _new_sqlite_file(uri) is not None  # no experiment yet: nothing to ask
             else MlflowClient().get_experiment_by_name(experiment))
    location = found.artifact_location if found is not None else "mlruns"
    parsed = urlparse(location)
    return (parsed.path or location) if parsed.scheme in ("", "file") else None


@functools.cache
def launched_by() -> str | None:
    """The run ``mlflow run`` opened for this command (``MLproject``), if any: taken out of
    ``MLFLOW_RUN_ID`` so that MedLM's runs are new runs (that run holds the -P values as typed)."""
    return os.environ.pop("MLFLOW_RUN_ID", None) or None


def compare_runs_hint(experiment: str) -> str:
    """Where to look at ``experiment``'s runs: the server's UI, or ``mlflow ui``'s, opened on
    the model-training view (MLflow 3 opens on GenAI traces otherwise)."""
    uri = mlflow.get_tracking_uri()
    try:
        found = MlflowClient().get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the server has gone away since the run: its address
        found = None
    page = (f"/#/experiments/{found.experiment_id}?workflowType=machine_learning"
            if found is not None else "")
    if _is_server(uri):  # without a user:password@ a console or log must not show
        parsed = urlparse(uri)
        return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + page
    return f"mlflow ui, then http://127.0.0.1:5000{page}"
