import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_CSV = Path(os.environ.get("MEDLM_TEST_DATASET",
                                  REPO_ROOT.parent / "shared" / "data" / "diseases_symptoms.csv"))


@pytest.fixture(scope="session")
def dataset_csv() -> Path:
    if not DATASET_CSV.is_file():
        pytest.fail(f"test dataset {DATASET_CSV} not found; set MEDLM_TEST_DATASET")
    return DATASET_CSV


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from medlm.offline import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer, saved with save_pretrained."""
    from medlm.offline import save_random_gpt2

    return save_random_gpt2(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from medlm.modeling import load_tokenizer_and_model

    return load_tokenizer_and_model(str(tiny_model_dir))


@pytest.fixture
def mlflow_home(tmp_path, monkeypatch) -> Path:
    """A private tracking store (SQLite + ./mlruns) in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(None)  # forget any URI an earlier test set
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def run_python(*args: str, cwd: Path, env_extra: dict | None = None):
    """Run ``python ARGS`` (a script, or ``-m module``) as a user would, without a TTY, with
    this checkout importable."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def run_module(module: str, *args: str, cwd: Path, env_extra: dict | None = None):
    """Run ``python -m module args`` as a user would, without a TTY."""
    return run_python("-m", module, *args, cwd=cwd, env_extra=env_extra)
