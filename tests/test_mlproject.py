"""`mlflow run . -P lr=5e-4 --env-manager local`: MLproject's entry point trains and
registers, as `python -m experiments.run` does, its run a child of the one `mlflow run`
opens."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_mlflow_run_trains_and_registers(tmp_path, tiny_model_dir, dataset_csv):
    small = tmp_path / "small.csv"  # MLproject takes the main flags; a small file keeps it quick
    pd.read_csv(dataset_csv).head(40).to_csv(small, index=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # the artifacts beside the test's store, not under the repository's mlruns/
    client.create_experiment("medlm", artifact_location=(tmp_path / "artifacts").as_uri())
    def repository_store():  # what a run that escaped to the repository would change
        return sorted((path.name, path.stat().st_mtime) for path in
                      [*(REPO_ROOT / "mlruns").iterdir(), *REPO_ROOT.glob("mlflow.db")])

    before = repository_store()
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO_ROOT),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "-P", "lr=5e-4", "-P",
         f"model={tiny_model_dir}", "-P", f"dataset={small}", "--env-manager", "local",
         "--experiment-name", "medlm"], cwd=tmp_path, env=environment, capture_output=True,
        text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    (launcher,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    (trained,) = [run for run in runs if run is not launcher]
    assert launcher.info.status == trained.info.status == "FINISHED"
    assert trained.data.tags["mlflow.parentRunId"] == launcher.info.run_id
    assert launcher.data.params["lr"] == "5e-4"  # as typed; MedLM's own params on its run
    assert trained.data.params["lr"] == "0.0005"
    assert trained.data.params["dataset"] == str(small)
    (version,) = client.search_model_versions("name = 'medlm'")
    assert version.run_id == trained.info.run_id
    assert client.get_model_version_by_alias("medlm", "champion").version == version.version
    assert repository_store() == before
