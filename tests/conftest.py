import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_CSV = Path(os.environ.get("MEDLM_TEST_DATASET",
                                  REPO_ROOT.parent / "shared" / "data" / "diseases_symptoms.csv"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker, for it and its commands
    os.environ["OMP_NUM_THREADS"] = "1"


# the modules whose fixture is a trained run or a server: each goes to one worker whole (below)
WHOLE_MODULES = ("test_best_recipe", "test_cli", "test_distributed", "test_team_server")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The tests run on one pytest-xdist worker per core unless ``-n`` is given (``-n 0``: one
    process), one at a time to any free worker, except that in any selection but the quick one
    each of ``WHOLE_MODULES`` goes to one worker whole, so that its fixture is made once
    (``pytest_xdist_make_scheduler``). Set here rather than in addopts: ``pytest benchmarks``
    stays one process, where pytest-benchmark measures."""
    option = config.option
    if os.environ.get("PYTEST_XDIST_WORKER") or option.collectonly:
        return
    if getattr(option, "numprocesses", 0) is None:
        option.numprocesses = "auto"
        if option.dist == "no":
            option.dist = "load" if option.markexpr == "not slow" else "loadgroup"


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by module name: xdist's own reads ``xdist_group`` marks through a
    node id that pytest 9 no longer lets it change, so it would send every test apart."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).stem in WHOLE_MODULES else nodeid

    return WholeModules(config, log)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dataset_csv() -> Path:
    if not DATASET_CSV.is_file():
        pytest.fail(f"test dataset {DATASET_CSV} not found; set MEDLM_TEST_DATASET")
    return DATASET_CSV


@pytest.fixture(scope="session", autouse=True)
def untuned_answers_decoded_per_session(tmp_path_factory):
    """$MEDLM_CACHE in a temporary directory, linked to the real one's downloaded bases and
    de-quantized copies: each session decodes the untuned base's answers anew (a cache an
    earlier session left would hide the code that writes it, and could hold stale answers),
    and nothing is downloaded or converted twice."""
    from medlm.offline import cache_dir

    real, cache = cache_dir(), tmp_path_factory.mktemp("medlm-cache")
    for name in ("bases", "dequantized"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(real / name, target_is_directory=True)
    previous = os.environ.get("MEDLM_CACHE")
    os.environ["MEDLM_CACHE"] = str(cache)
    yield
    if previous is None:
        os.environ.pop("MEDLM_CACHE", None)
    else:
        os.environ["MEDLM_CACHE"] = previous


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


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables made (MLflow's migrations take 1.5-2.5 s
    for each new database) and no experiment: MLflow makes its Default experiment, with the
    artifact root of the directory it is used from, when a store is opened empty. The slow
    command tests (test_cli, test_best_recipe) start from no database, as a new user does."""
    import sqlite3

    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    with contextlib.closing(sqlite3.connect(path)) as database, database:
        database.execute("DELETE FROM experiments")
    return path


@pytest.fixture
def tracking_store(tmp_path, _empty_store) -> str:
    """The URI of a new, empty tracking store at ./mlflow.db in ``tmp_path``: where a command
    run there with MLFLOW_TRACKING_URI unset or empty keeps its runs."""
    import shutil

    shutil.copyfile(_empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def mlflow_home(tmp_path, tracking_store, monkeypatch) -> Path:
    """A private tracking store (SQLite + ./mlruns) in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    import mlflow

    mlflow.set_tracking_uri(None)  # forget any URI an earlier test set
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    # a run in this process made its experiment MLflow's active one: undone (the environment's
    # copy: no_experiment_leaks_into_later_commands)
    mlflow.tracking.fluent._active_experiment_id = None


def run_python(*args: str, cwd: Path, env_extra: dict | None = None, timeout: float = 600):
    """Run ``python ARGS`` (a script, or ``-m module``) as a user would, without a TTY, with
    this checkout importable."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_module(module: str, *args: str, cwd: Path, env_extra: dict | None = None,
               timeout: float = 600):
    """Run ``python -m module args`` as a user would, without a TTY."""
    return run_python("-m", module, *args, cwd=cwd, env_extra=env_extra, timeout=timeout)


@pytest.fixture(autouse=True)
def hub_decision_is_per_test(monkeypatch):
    """medlm.hub decides once per process whether the Hub answers and may switch the Hub
    libraries to cache-only mode; each test starts undecided and online-capable again.

    The offline variables a user keeps in the shell (without Hub access, commonly all three)
    are cleared for each test, here and in the commands it starts, and restored after: a test
    that wants one sets it. The Hub libraries read them once, on import: they are set back
    too."""
    import medlm.hub

    monkeypatch.setattr(medlm.hub, "_decided", {})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "")  # so that the value before, or its absence, is restored
        monkeypatch.delenv(name)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for attribute in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, attribute, False)


@pytest.fixture(autouse=True)
def no_experiment_leaks_into_later_commands(monkeypatch):
    """MLflow exports the active experiment as MLFLOW_EXPERIMENT_ID into this process's
    environment, which every command a later test on this worker starts would inherit (``mlflow
    run`` refuses it beside --experiment-name): unset for each test, restored after."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")


class SilentHost:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a Hub endpoint
    that does not reply. ``connections`` counts how often it was asked."""

    def __init__(self):
        import socket
        import threading

        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections, self._held = 0, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(connection)

    def close(self):
        self._socket.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent_hub():
    host = SilentHost()
    yield host
    host.close()


def write_hub_cache(home: Path, model_dir: Path, dataset_csv: Path,
                    model_id: str = "distilgpt2",
                    dataset_id: str = "QuyenAnhDE/Diseases_Symptoms") -> None:
    """A Hugging Face cache under ``home`` (HF_HOME) holding ``model_id`` (a copy of
    ``model_dir``) and ``dataset_id`` (``dataset_csv``), laid out as the Hub libraries leave
    them after a first online run."""
    import shutil
    import subprocess

    revision = "0" * 40
    repo = home / "hub" / ("models--" + model_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    # datasets keeps a loaded Hub dataset as Arrow files under <owner>___<snake_name>; build
    # them from the CSV and put them where an offline load_dataset(dataset_id) looks.
    script = f"""
import os, shutil, datasets
from datasets.naming import camelcase_to_snakecase
built = datasets.load_dataset("csv", data_files={str(dataset_csv)!r}, split="train")
source = os.path.dirname(built.cache_files[0]["filename"])
owner, name = {dataset_id!r}.split("/")
name = camelcase_to_snakecase(name)
target = os.path.join({str(home / "datasets")!r}, owner + "___" + name, "default", "0.0.0",
                      os.path.basename(source))
shutil.copytree(source, target)
os.rename(os.path.join(target, "csv-train.arrow"), os.path.join(target, name + "-train.arrow"))
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                   env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def background_server(command: list[str], ready_url: str, home: Path, timeout: float = 180,
                      env: dict | None = None):
    """Start ``command`` (a server) in its own process group, wait (bounded) until ``ready_url``
    answers 200, and kill the group at the end; a server that does not come up fails the
    test with its log."""
    import signal
    import subprocess
    import time
    import urllib.request

    log_path = home / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, stdin=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{command[:4]} did not start:\n{log_path.read_text()}")
                time.sleep(1)
            yield server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


def all_pairs_lookup(train_frame, names, fallback):
    """``medlm.metrics.nearest_name_answers`` as it was before its word index: every name
    against every training name, the reference its answers are checked against (and, in
    benchmarks/test_lookup.py, timed against)."""
    from medlm.text import content_words

    train_names = [content_words(name) for name in train_frame["Name"]]
    train_symptoms = train_frame["Symptoms"].tolist()
    answers = []
    for name in names:
        words = content_words(name)
        best = max(range(len(train_names)), default=None,
                   key=lambda i: (len(words & train_names[i]), -len(train_names[i]), -i))
        shared = best is not None and words & train_names[best]
        answers.append(train_symptoms[best] if shared else fallback)
    return answers

