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
