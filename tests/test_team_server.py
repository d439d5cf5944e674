"""A team's set-up: a real ``mlflow server`` on PostgreSQL, reached only over HTTP.

Needs a PostgreSQL role that may create databases, given as ``MEDLM_TEST_POSTGRES_URI``
(``bash .ci/postgres`` installs and starts one and prints it; ``.ci/run`` does so). Without it
the test is skipped, unless ``MEDLM_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes that a
failure.
"""

import os
import secrets
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import background_server, free_port, run_module

pytestmark = pytest.mark.slow


def unavailable(reason: str):
    if os.environ.get("MEDLM_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (MEDLM_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_server():
    """The PostgreSQL server: an admin connection, and the URI of a database on it by name."""
    server = os.environ.get("MEDLM_TEST_POSTGRES_URI")
    if not server:
        unavailable("PostgreSQL not available: set MEDLM_TEST_POSTGRES_URI to a role that may "
                    "create databases (as root, `export MEDLM_TEST_POSTGRES_URI=$(bash "
                    ".ci/postgres)` installs and starts one)")
    try:
        import psycopg
    except ImportError:
        unavailable("the PostgreSQL driver is missing: pip install -e '.[server]'")
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as error:
        unavailable(f"cannot reach PostgreSQL at MEDLM_TEST_POSTGRES_URI: {error}".strip())
    base, _, _ = server.rpartition("/")
    yield admin, base
    admin.close()


def fresh_database(postgres_server):
    admin, base = postgres_server
    name = f"medlm_test_{secrets.token_hex(4)}"
    admin.execute(f"CREATE DATABASE {name}")
    yield f"{base}/{name}"
    admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def postgres_uri(postgres_server):
    """A fresh, empty database for this module's MLflow server, dropped afterwards."""
    yield from fresh_database(postgres_server)


@pytest.fixture
def optuna_uri(postgres_server):
    """Another database, for an Optuna study (it has tables of its own)."""
    yield from fresh_database(postgres_server)


@pytest.fixture(scope="module")
def tracking_server(postgres_uri, tmp_path_factory):
    """``mlflow server`` as a team would run it: runs and registry in PostgreSQL, artifacts
    proxied by the server into --artifacts-destination."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_server(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_uri,
             "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], f"{url}/health", home):
        yield url, home / "artifacts"


def test_train_register_and_generate_through_a_postgresql_backed_server(
        tracking_server, postgres_uri, tiny_model_dir, dataset_csv, tmp_path):
    import psycopg

    url, artifacts = tracking_server
    env = {"MLFLOW_TRACKING_URI": url}
    trained = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                         str(dataset_csv), "--max-samples", "60", "--epochs", "2",
                         "--lr", "3e-3", "--run-name", "team", cwd=tmp_path, env_extra=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"compare runs: {url}" in trained.stderr
    # Nothing went to the local default store.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "team"
    history = client.get_metric_history(run.info.run_id, "validation_loss")
    assert sorted(point.step for point in history) == [1, 2]
    with psycopg.connect(postgres_uri) as database:  # the server really keeps them there
        assert database.execute("SELECT name FROM runs").fetchall() == [("team",)]
        assert database.execute("SELECT name, version FROM model_versions").fetchall() == [
            ("medlm", 1)]
    assert list(artifacts.rglob("model.safetensors"))  # artifacts proxied by the server

    generated = run_module("experiments.generate", "Kidney Failure", "--model-uri",
                           "models:/medlm@champion", cwd=tmp_path, env_extra=env)
    assert generated.returncode == 0, generated.stderr[-3000:]
    line = generated.stdout.strip().splitlines()[-1]
    assert line.startswith("Kidney Failure |") and len(line) > len("Kidney Failure |")
    assert not (tmp_path / "mlflow.db").exists()


def test_two_processes_share_one_search_and_nest_every_trial_under_one_parent(
        tracking_server, optuna_uri, tiny_model_dir, dataset_csv, tmp_path):
    """The same command started twice at once, as on two machines: one study in PostgreSQL,
    no trial drawn twice, every trial a child of the one parent run."""
    import optuna

    url, _ = tracking_server
    command = [sys.executable, "-m", "experiments.search", "--model", str(tiny_model_dir),
               "--dataset", str(dataset_csv), "--max-samples", "40", "--epochs", "1",
               "--no-symptom-eval", "--num-validation-samples", "0", "--no-system-metrics",
               "--no-progress", "--param", "lr=1e-4..1e-2:log", "--param",
               "weight_decay=0..0.1", "--trials", "6", "--study", "team",
               "--storage", optuna_uri]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": url}
    processes = [subprocess.Popen(command, cwd=tmp_path, env=environment, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]

    study = optuna.load_study(study_name="team", storage=optuna_uri.replace(
        "postgresql://", "postgresql+psycopg://"))
    trials = study.get_trials()
    assert 6 <= len(trials) <= 7  # two processes may each begin the sixth
    assert {trial.state.name for trial in trials} <= {"COMPLETE", "PRUNED"}
    assert len({tuple(sorted(trial.params.items())) for trial in trials}) == len(trials)
    assert len({trial.user_attrs["host"] for trial in trials}) == 2  # both did trials

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    # (the module's other test trained a run of its own on this server)
    (parent,) = [run for run in runs if run.data.tags.get("medlm.search_study") == "team"]
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId")
                == parent.info.run_id]
    assert sorted(run.info.run_id for run in children) == sorted(
        trial.user_attrs["run_id"] for trial in trials)
    assert parent.data.tags["best_run_id"] == study.best_trial.user_attrs["run_id"]
