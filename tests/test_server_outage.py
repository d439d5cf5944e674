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


def test_a_server_gone_mid_run_loses_nothing_and_no_command_prints_the_password(
        tmp_path, tiny_model_dir, dataset_csv):
    """``MLFLOW_TRACKING_URI=http://user:SECRET@host``: the server stops once epoch 1 is logged;
    the run stops with one line naming the resume, a run started meanwhile says the server does
    not answer, and the resume logs the rest once it is back. Then a search, generate, evaluate
    and an error naming the store; no line any of them prints (MLflow's own "View run ... at"
    included) shows the password, and the commands still reach the server."""
    (tmp_path / "server").mkdir()
    port = free_port()
    url, shown_url = f"http://medlm:SECRET@127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": url}
    command = [sys.executable, "-m", "experiments.run", "--model", str(tiny_model_dir),
               "--dataset", str(dataset_csv), "--max-samples", "60", "--epochs", "3",
               "--patience", "0", "--max-new-tokens", "4", "--num-validation-samples", "0",
               "--no-progress"]
    with mlflow_server(tmp_path / "server", port):
        run = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                               stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        seen = []
        for line in run.stderr:  # the server goes away once epoch 1 is logged
            seen.append(line)
            if line.startswith("epoch 1:"):
                break
    rest = run.stderr.read()
    assert run.wait(timeout=300) == 2, "".join(seen) + rest
    printed = ["".join(seen) + rest]
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in rest, rest
    assert f"the tracking server {shown_url} stopped answering" in errors[0]
    command_shown = errors[0].split("finish the run with ")[1].split()
    assert command_shown[:4] == ["python", "-m", "experiments.run", "--resume"]
    run_id = command_shown[4]
    assert (tmp_path / "checkpoints" / run_id).is_dir()
    tiny = ("--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "1", "--num-validation-samples", "0", "--max-new-tokens", "4",
            "--no-system-metrics")
    gone = run_module("experiments.run", *tiny, cwd=tmp_path, env_extra=env)
    assert gone.returncode == 2 and "does not answer" in gone.stderr
    printed.append(gone.stdout + gone.stderr)

    with mlflow_server(tmp_path / "server", port):
        resumed = run_module("experiments.run", "--resume", run_id, cwd=tmp_path, env_extra=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        printed.append(resumed.stdout + resumed.stderr)
        client = MlflowClient(tracking_uri=shown_url, registry_uri=shown_url)
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = sorted(p.step for p in client.get_metric_history(run_id, "validation_loss"))
        assert steps == [1, 2, 3]
        (version,) = client.search_model_versions("name = 'medlm'")
        assert version.run_id == run_id
        for module, args, status in [
                ("experiments.search", (*tiny, "--param", "lr=5e-4", "--trials", "1",
                                         "--no-symptom-eval"), 0),
                ("experiments.generate", ("Asthma", "--max-new-tokens", "4"), 0),
                ("experiments.evaluate", ("--max-samples", "40", "--max-new-tokens", "4"), 0),
                ("experiments.generate", ("Asthma", "--model-uri", "models:/nothing/1"), 2)]:
            result = run_module(module, *args, cwd=tmp_path, env_extra=env)
            assert result.returncode == status, (module, result.stderr[-3000:])
            printed.append(result.stdout + result.stderr)
        assert len(client.search_runs([client.get_experiment_by_name("medlm")
                                       .experiment_id])) == 3  # the run, a search and its trial
    assert any("View run" in output for output in printed)  # MLflow's own line, on stdout
    assert f"at {shown_url}" in printed[-1]  # where the error looked
    for output in printed:
        assert "SECRET" not in output, output[-3000:]
