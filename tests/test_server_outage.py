"""A tracking server that goes away in the middle of a run costs nothing already computed: the
run stops with one line saying how to finish, and ``--resume`` brings its epochs and model into
the store once the server is back. A real ``mlflow server`` on 127.0.0.1 (SQLite behind it)."""

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO_ROOT, background_server, free_port, run_module

pytestmark = pytest.mark.slow


def mlflow_server(home, port):
    return background_server(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{home / 'server.db'}", "--artifacts-destination", str(home / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        f"http://127.0.0.1:{port}/health", home)


def test_a_server_that_stops_mid_run_loses_nothing_and_the_resume_logs_the_rest(
        tmp_path, tiny_model_dir, dataset_csv):
    (tmp_path / "server").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": url}
    command = [sys.executable, "-m", "experiments.run", "--model", str(tiny_model_dir),
               "--dataset", str(dataset_csv), "--max-samples", "60", "--epochs", "3",
               "--patience", "0", "--max-new-tokens", "4", "--num-validation-samples", "0",
               "--no-progress"]
    with mlflow_server(tmp_path / "server", port):
        run = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        seen = []
        for line in run.stderr:  # the server goes away once epoch 1 is logged
            seen.append(line)
            if line.startswith("epoch 1:"):
                break
    rest = run.stderr.read()
    assert run.wait(timeout=300) == 2, "".join(seen) + rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in rest, rest
    assert f"the tracking server {url} stopped answering" in errors[0]
    command_shown = errors[0].split("finish the run with ")[1].split()
    assert command_shown[:4] == ["python", "-m", "experiments.run", "--resume"]
    run_id = command_shown[4]
    assert (tmp_path / "checkpoints" / run_id).is_dir()

    with mlflow_server(tmp_path / "server", port):
        resumed = run_module("experiments.run", "--resume", run_id, cwd=tmp_path,
                             env_extra={"MLFLOW_TRACKING_URI": url})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        finished = client.get_run(run_id)
        assert finished.info.status == "FINISHED"
        steps = sorted(p.step for p in client.get_metric_history(run_id, "validation_loss"))
        assert steps == [1, 2, 3]
        (version,) = client.search_model_versions("name = 'medlm'")
        assert version.run_id == run_id


def test_the_tracking_uris_password_is_on_no_line_any_command_prints(
        tmp_path, tiny_model_dir, dataset_csv):
    """``MLFLOW_TRACKING_URI=http://user:SECRET@host``: a run (MLflow's own "View run ... at"
    line included), a search, generate, evaluate, an error naming the store, and the line of
    a server gone mid-run show no password, and the commands still reach the server."""
    (tmp_path / "server").mkdir()
    port = free_port()
    url = f"http://medlm:SECRET@127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": url}
    tiny = ("--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "1", "--num-validation-samples", "0", "--max-new-tokens", "4",
            "--no-system-metrics")
    printed = []
    with mlflow_server(tmp_path / "server", port):
        for module, args, status in [
                ("experiments.run", tiny, 0),
                ("experiments.search", (*tiny, "--param", "lr=5e-4", "--trials", "1",
                                         "--no-symptom-eval"), 0),
                ("experiments.generate", ("Asthma", "--max-new-tokens", "4"), 0),
                ("experiments.evaluate", ("--max-samples", "40", "--max-new-tokens", "4"), 0),
                ("experiments.generate", ("Asthma", "--model-uri", "models:/nothing/1"), 2)]:
            result = run_module(module, *args, cwd=tmp_path, env_extra=env)
            assert result.returncode == status, (module, result.stderr[-3000:])
            printed.append(result.stdout + result.stderr)
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        assert len(client.search_runs([client.get_experiment_by_name("medlm")
                                       .experiment_id])) == 3  # the run, a search and its trial
    assert any("View run" in output for output in printed)  # MLflow's own line, on stdout
    assert f"at http://127.0.0.1:{port}" in printed[-1]  # where the error looked
    gone = run_module("experiments.run", *tiny, cwd=tmp_path, env_extra=env)
    assert gone.returncode == 2 and "does not answer" in gone.stderr
    for output in [*printed, gone.stdout + gone.stderr]:
        assert "SECRET" not in output, output[-3000:]
