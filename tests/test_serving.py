"""The registered model served as MLflow serves it: `mlflow models serve` on 127.0.0.1, sent
disease names over HTTP, answers with symptoms, as `experiments.generate --greedy` writes them."""

import json
import os
import sys
import urllib.request

import pytest

from tests.conftest import background_server, free_port, run_module

pytestmark = pytest.mark.slow


def test_mlflow_models_serve_answers_disease_names_with_their_symptoms(
        tmp_path, tiny_model_dir, dataset_csv):
    """Before, the served model got the bare name, without the " |" it was trained to continue
    after, and echoed the prompt back in front of its answer."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    trained = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                         str(dataset_csv), "--max-samples", "60", "--epochs", "2", "--lr",
                         "3e-3", "--num-validation-samples", "0", "--no-symptom-eval",
                         cwd=tmp_path, env_extra=env)
    assert trained.returncode == 0, trained.stderr
    names = ["Kidney Failure", "Asthma"]
    generated = run_module("experiments.generate", *names, "--greedy", cwd=tmp_path,
                           env_extra=env)
    assert generated.returncode == 0, generated.stderr
    expected = [line.split(" | ", 1)[1] for line in generated.stdout.splitlines()]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_server([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                            "models:/medlm@champion", "--env-manager", "local", "--host",
                            "127.0.0.1", "--port", str(port)], f"{url}/ping", tmp_path,
                           # as in an activated virtualenv: MLflow runs `uvicorn` from PATH
                           env={**os.environ, **env, "PATH": os.pathsep.join(
                               [os.path.dirname(sys.executable), os.environ.get("PATH", "")])}):
        request = urllib.request.Request(
            f"{url}/invocations", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": names}).encode())  # greedy: the served default
        with urllib.request.urlopen(request, timeout=120) as response:
            answers = json.loads(response.read())["predictions"]
    assert [answer.strip() for answer in answers] == expected
    assert not any(answer.strip().startswith(name) for answer, name in zip(answers, names,
                                                                           strict=True))
