"""The tracking store shared by runs started at the same moment: none of them is lost."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT
from mlflow import MlflowClient

# One run's start, as experiments.run does it: the store checked (and made), the experiment,
# the run, its datasets: what two runs started together in one directory do at once.
START_A_RUN = """
import sys, time
import pandas as pd
import mlflow
from medlm.store import check_tracking_store
from medlm.config import TrainConfig
from medlm.tracking import MlflowTracker, training_experiment
go = float(sys.argv[1])
time.sleep(max(0.0, go - time.time()))
check_tracking_store()
tracker = MlflowTracker(TrainConfig(model="tiny", system_metrics=False), "cpu")
rows = pd.DataFrame({"Name": ["Flu", "Cold"], "Symptoms": ["fever", "cough"]})
with tracker.run({"lr": sys.argv[2]}):
    time.sleep(max(0.0, go + 6 - time.time()))  # the datasets logged together as well
    tracker.log_datasets(rows.head(1), rows.tail(1), sys.argv[3])
"""


def _start_together(directory, dataset, processes: int):
    go = time.time() + 12  # after every interpreter has imported MLflow
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("MLFLOW_TRACKING_URI", None)  # ./mlflow.db, as for a new user
    started = [subprocess.Popen(
        [sys.executable, "-c", START_A_RUN, str(go), str(index), str(dataset)],
        cwd=directory, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL) for index in range(processes)]
    return [(process.wait(timeout=180), process.stdout.read()) for process in started]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["new", "existing"])
def test_runs_started_together_in_one_directory_are_all_recorded(tmp_path, dataset_csv,
                                                                  tracking_store, store):
    if store == "new":
        (tmp_path / "mlflow.db").unlink()  # a new user's directory: no database yet
    outcomes = _start_together(tmp_path, dataset_csv, processes=3)
    for status, output in outcomes:
        assert status == 0, output[-2000:]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(
            "medlm").experiment_id])
    assert sorted(run.data.params["lr"] for run in runs) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(len(run.inputs.dataset_inputs) == 2 for run in runs)


@pytest.mark.slow
def test_two_runs_then_a_sweep_beside_a_run_in_one_new_directory_all_finish(
        tmp_path, tiny_model_dir, dataset_csv):
    """Two terminals, one directory, as a researcher starts two learning rates: both runs
    finish and both are in mlflow ui; then a sweep beside a run on the store they made."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    tiny = ["-m", "experiments.run", "--model", str(tiny_model_dir), "--dataset",
            str(dataset_csv), "--max-samples", "40", "--epochs", "1",
            "--num-validation-samples", "0", "--no-symptom-eval"]

    def together(*commands):
        started = [subprocess.Popen([sys.executable, *tiny, *command], cwd=tmp_path,
                                    env=environment, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
                   for command in commands]
        for process in started:
            assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]

    together(["--lr", "1e-3"], ["--lr", "2e-3"])
    together(["--lr", "3e-3", "4e-3"], ["--lr", "5e-3"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert all(run.info.status == "FINISHED" for run in runs)
    trained = sorted(run.data.params["lr"] for run in runs if "lr" in run.data.params)
    assert trained == ["0.001", "0.002", "0.003", "0.004", "0.005"]
    assert len(runs) == 6  # and the sweep's parent
    versions = client.search_model_versions("name = 'medlm'")
    assert sorted(int(version.version) for version in versions) == [1, 2, 3, 4, 5]


def test_the_uris_credentials_are_sent_as_before_and_printed_nowhere(monkeypatch):
    """user:password@ in MLFLOW_TRACKING_URI: moved to MLflow's own credential variables (its
    "View run ... at URL" line then holds no password); the URI's pair wins over stale ones
    there, as its userinfo did when requests sent it."""
    import os

    from experiments._cli import credentials_out_of_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:p%40ss%2Fw@mlflow.lab:5000/base")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "stale")
    credentials_out_of_tracking_uri()
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.lab:5000/base"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "me", "p@ss/w")


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://medlm:secret@db:5432/optuna", "postgresql://medlm:***@db:5432/optuna"),
    ("postgresql://medlm:se/cr@et@db/optuna", "postgresql://medlm:***@db/optuna"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://u:p@ss@host:5000/x", "http://u:***@host:5000/x"),
    ("http://host:5000/ajax/user@example.com/x", "http://host:5000/ajax/user@example.com/x"),
    ("mlflow-artifacts://host:5000/artifacts/1/r@1/a",
     "mlflow-artifacts://host:5000/artifacts/1/r@1/a"),
    ("http://u:p@host/exp@1", "http://u:***@host/exp@1"),
    ("medlm-search.journal", "medlm-search.journal")])
def test_a_password_is_hidden_whatever_it_holds(uri, shown):
    from medlm.store import without_password

    assert without_password(uri) == shown


def test_a_store_on_a_filesystem_without_locks_or_a_read_only_directory_still_opens(
        tmp_path, tracking_store, monkeypatch):
    """The lock that lets two runs make a new store's tables is a courtesy: where the
    filesystem has none (some network ones: ENOLCK) or the directory may only be read, the
    store opens as it did before."""
    import errno
    import fcntl

    import mlflow

    from medlm import store

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    mlflow.set_tracking_uri(None)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    store.check_tracking_store()
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    (tmp_path / "mlflow.db.lock").unlink()
    real_open = os.open

    def read_only(path, *args, **kwargs):  # root may write anywhere: the refusal, patched
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with store.first_open():
        MlflowClient(tracking_store).search_experiments()
    assert not (tmp_path / "mlflow.db.lock").exists()
