"""What `mlflow ui` draws for a default run, read as the UI reads it: through a real `mlflow
server`'s REST API on 127.0.0.1, after a short training logged to that server; then the pages
themselves, drawn by a real headless Chromium (Debian's ``chromium`` package; the check is
skipped without it, unless ``MEDLM_REQUIRE_BROWSER=1``, which ``.ci/run`` sets). Its
screenshots are left in ``MEDLM_UI_SCREENSHOTS`` when that names a folder."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

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


def drawn(url: str, screenshot: Path | None = None) -> str:
    """The text of the page at ``url`` as headless Chromium draws it (its scripts run for 20 s
    of virtual time); its screenshot saved to ``screenshot`` when given."""
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("MEDLM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is missing (MEDLM_REQUIRE_BROWSER=1): apt-get install chromium")
        pytest.skip("no headless browser: apt-get install chromium to check the drawn pages")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=20000", "--window-size=1400,1000"]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True,
                       timeout=180, check=True)
    page = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                          timeout=180, check=True).stdout
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def check_the_drawn_pages(printed_url: str, run_id: str, run_name: str, version: str,
                          shots: Path) -> None:
    """The URL the run printed opens the training runs, the run named by what it is; the run's
    page draws its charts, the losses and F1s first; the registered model lists its version."""
    shots = Path(os.environ.get("MEDLM_UI_SCREENSHOTS") or shots)
    shots.mkdir(parents=True, exist_ok=True)
    runs_table = drawn(printed_url, shots / "runs-table.png")
    assert "Run Name" in runs_table and run_name in runs_table, runs_table[:2000]
    assert re.search(r"(?<!\d)1 matching runs?\b", runs_table), runs_table[:2000]
    base, _, _ = printed_url.partition("/#/")
    charts = drawn(f"{base}/#/experiments/{printed_url.split('/experiments/')[1].split('?')[0]}"
                   f"/runs/{run_id}/model-metrics", shots / "run-charts.png")
    drawn_charts = re.search(r"Model metrics \((\d+)\)", charts)
    assert drawn_charts and int(drawn_charts.group(1)) >= 5, charts[:2000]  # losses, F1s, ...
    # each section's heading, in the order drawn: "epoch (4) Add chart step (4) Add chart ..."
    # (before: step, time, time_total, then Model metrics)
    sections = re.findall(r"(\S+(?: metrics)?) \((\d+)\) Add chart", charts)
    assert sections[:1] == [("epoch", "4")], sections
    model = drawn(f"{base}/#/models/medlm", shots / "registered-model.png")
    assert f"Version {version}" in model, model[:2000]


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

        hint = re.search(r"compare runs: (\S+)", result.stderr)
        assert hint, result.stderr[-2000:]
        printed = hint.group(1)
        assert printed == (f"{url}/#/experiments/{experiment['experiment_id']}"
                           "?workflowType=machine_learning")
        # the tiny base has random weights: every weight is trained (before: "colorful-whale-549")
        assert run["info"]["run_name"] == "tiny full lr3e-3"
        check_the_drawn_pages(printed, run_id, run["info"]["run_name"], version["version"],
                              tmp_path / "screenshots")
