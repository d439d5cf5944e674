"""What `mlflow ui` draws for a default run, read as the UI reads it: through a real `mlflow
server`'s REST API on 127.0.0.1, after a short training logged to that server."""

import json
import sys
import urllib.parse
import urllib.request

import pytest

from tests.conftest import background_server, free_port, run_module

pytestmark = pytest.mark.slow


def get(url: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}",
                                timeout=30) as response:
        return json.loads(response.read())


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_default_run_shows_curves_datasets_system_metrics_and_its_model(
        tmp_path, tiny_model_dir, dataset_csv):
    """Before: one point per epoch, no datasets, no system metrics, a version without
    description, a model without metrics, an experiment of no kind."""
    home = tmp_path / "server"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_server(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
             str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], f"{url}/health", home):
        result = run_module(
            "experiments.run", "--model", str(tiny_model_dir), "--dataset", str(dataset_csv),
            "--max-samples", "100", "--epochs", "2", "--lr", "3e-3", "--max-new-tokens", "4",
            "--num-validation-samples", "0", "--patience", "0", "--score-every-epoch",
            cwd=tmp_path,
            env_extra={"MLFLOW_TRACKING_URI": url,
                       "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
        assert result.returncode == 0, result.stderr

        experiment = get(url, "/api/2.0/mlflow/experiments/get-by-name",
                         experiment_name="medlm")["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        (run,) = post(url, "/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        run_id = run["info"]["run_id"]

        def history(metric):
            points = get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                         metric_key=metric).get("metrics", [])
            return sorted((point["step"], point["value"]) for point in points)

        params = {param["key"]: param["value"] for param in run["data"]["params"]}
        steps = 2 * -(-int(params["rows_train"]) // 8)  # batch 8, two epochs
        for metric in ("step/training_loss", "step/learning_rate", "step/grad_norm",
                       "step/tokens_per_sec"):  # a point every 10 optimizer steps
            assert [step for step, _ in history(metric)] == list(range(10, steps + 1, 10)), metric
        assert [step for step, _ in history("training_loss")] == [1, 2]
        assert [step for step, _ in history("symptom_f1")] == [0, 1, 2]
        metrics = {metric["key"] for metric in run["data"]["metrics"]}
        assert {"system/cpu_utilization_percentage",
                "system/system_memory_usage_megabytes"} <= metrics

        inputs = {next(tag["value"] for tag in item["tags"]
                       if tag["key"] == "mlflow.data.context"): item["dataset"]
                  for item in run["inputs"]["dataset_inputs"]}
        assert set(inputs) == {"training", "validation"}
        source = dataset_csv.resolve().as_uri()  # the file itself, whatever path led to it
        assert all(source in dataset["source"] for dataset in inputs.values())
        assert inputs["training"]["digest"] != inputs["validation"]["digest"]
        assert json.loads(inputs["validation"]["profile"])["num_rows"] == int(
            params["rows_validation"])

        version = get(url, "/api/2.0/mlflow/registered-models/alias", name="medlm",
                      alias="champion")["model_version"]
        assert version["run_id"] == run_id
        assert "fine-tuned on" in version["description"]
        assert "best of 2 epochs by validation_loss" in version["description"]
        models = post(url, "/api/2.0/mlflow/logged-models/search",
                      {"experiment_ids": [experiment["experiment_id"]]})["models"]
        (model,) = [model for model in models if model["info"]["source_run_id"] == run_id]
        model_metrics = {metric["key"] for metric in model["data"]["metrics"]}
        assert {"best_validation_loss", "best_symptom_f1", "best_epoch"} <= model_metrics
        assert not any(key.startswith(("step/", "system/")) for key in model_metrics), model_metrics
