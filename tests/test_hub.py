"""Without Hub access a command fails in seconds with the command that works; what is in the
Hugging Face cache still loads; online, nothing changes."""

import http.server
import re
import socket
import threading
from pathlib import Path

import pytest

from medlm import hub
from tests.conftest import run_module


@pytest.fixture
def answering_hub():
    """A Hub endpoint that answers every request (404): reachable."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hf_hub_offline_decides_without_asking(monkeypatch, silent_hub):
    monkeypatch.setenv("HF_ENDPOINT", silent_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.unreachable_reason() == "HF_HUB_OFFLINE=1"
    assert silent_hub.connections == 0


@pytest.mark.parametrize("variables, expected", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
    ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE=yes"),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, None),  # huggingface_hub's precedence
])
def test_offline_settings_are_read_as_huggingface_hub_reads_them(monkeypatch, variables,
                                                                 expected):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert hub.offline_setting() == expected


def test_a_host_that_does_not_answer_is_given_up_at_the_deadline(monkeypatch, silent_hub):
    monkeypatch.setenv("HF_ENDPOINT", silent_hub.url)
    assert hub.unreachable_reason(timeout=0.5) == f"{silent_hub.url} did not answer within 0.5 s"
    assert silent_hub.connections == 1


def test_a_refused_connection_is_unreachable(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert "refused" in hub.unreachable_reason().lower()


def test_any_answer_means_online_and_changes_nothing(monkeypatch, answering_hub):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", answering_hub)
    assert hub.check_hub() is None
    assert not constants.is_offline_mode()


def test_unreachable_hub_switches_libraries_already_imported_to_their_cache(monkeypatch,
                                                                            silent_hub):
    import datasets  # imported before the decision, as quiet_libraries does
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", silent_hub.url)
    assert hub.check_hub(timeout=0.5)
    assert constants.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE
    assert hub.check_hub(timeout=0.5)  # decided once: not asked again
    assert silent_hub.connections == 1


@pytest.mark.slow  # a process of its own, with its imports: 6-12 s
def test_default_command_without_the_hub_says_what_to_type(tmp_path, silent_hub):
    """Done-when of the first-contact issue: the README's main command, offline, exits 2 after
    one question to the Hub with one line ending in the command that works."""
    result = run_module("experiments.run", "--lr", "5e-4", cwd=tmp_path,
                        env_extra={"HF_HOME": str(tmp_path / "hf"),
                                   "HF_ENDPOINT": silent_hub.url, "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 2
    (error,) = result.stderr.strip().splitlines()  # one line, no traceback, no chatter
    assert error.startswith("error: dataset 'QuyenAnhDE/Diseases_Symptoms' is not in the local "
                            "Hugging Face cache and the Hub is not reachable")
    assert re.search(r"offline, run: (python -m experiments\.download smollm2-135m-instruct && )?"
                     r"python -m experiments\.run --lr 5e-4 --dataset PATH/TO/diseases_symptoms"
                     r"\.csv --model smollm2-135m-instruct$", error), error
    assert silent_hub.connections == 1
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started


@pytest.mark.slow  # a process of its own, with its imports: 6-12 s
def test_evaluate_without_the_hub_says_what_to_type(tmp_path, tiny_model_dir, silent_hub):
    result = run_module("experiments.evaluate", "--model-uri", str(tiny_model_dir),
                        "--split", "all", cwd=tmp_path,
                        env_extra={"HF_HOME": str(tmp_path / "hf"),
                                   "HF_ENDPOINT": silent_hub.url, "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"expected a local dataset file; offline, run: python -m experiments.evaluate "
        f"--model-uri {tiny_model_dir} --split all --dataset PATH/TO/diseases_symptoms.csv")


def test_the_alternative_replaces_only_what_cannot_load(monkeypatch, tmp_path):
    from experiments import _cli
    from experiments.run import build_parser
    from medlm.hub import HubUnavailable

    monkeypatch.setattr("medlm.offline.find_base", lambda name: None)
    argv = ["--lr=5e-4", "--data", "QuyenAnhDE/Diseases_Symptoms", "--epochs", "3",
            "--model", str(tmp_path)]
    error = _cli.offline_alternative(HubUnavailable("dataset", "QuyenAnhDE/Diseases_Symptoms",
                                                    "HF_HUB_OFFLINE=1"),
                                     build_parser(), argv, "--dataset", "--model", str(tmp_path))
    assert str(error).endswith(
        "expected a local dataset file; offline, run: python -m experiments.run --lr=5e-4 "
        f"--epochs 3 --model {tmp_path} --dataset PATH/TO/diseases_symptoms.csv")
    # a Hub model that is not cached is replaced too, and the offline base is downloaded first
    assert not hub.model_in_cache("my model")  # not a Hub id at all: not cached, no error
    monkeypatch.setattr("medlm.hub.model_in_cache", lambda model_id: False)
    error = _cli.offline_alternative(HubUnavailable("model", "gpt2", "HF_HUB_OFFLINE=1"),
                                     build_parser(), ["--model", "gpt2"], "--dataset", "--model",
                                     "gpt2")
    assert str(error).endswith(
        "expected an offline base model; offline, run: python -m experiments.download "
        "smollm2-135m-instruct && python -m experiments.run --model smollm2-135m-instruct")


@pytest.mark.slow  # a pytest process of its own: 3-4 s each
@pytest.mark.parametrize("shell", [
    {"HF_HUB_OFFLINE": "1"},
    {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
])
def test_these_tests_pass_for_a_user_who_keeps_the_hub_offline_in_the_shell(tmp_path, shell):
    """The README's test command, run by someone without Hub access who exports the offline
    variables: each test sets what it depends on instead of inheriting them."""
    result = run_module("pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "-m", "not slow", "-k", "not keeps_the_hub_offline",
                        cwd=tmp_path, env_extra=shell)
    assert result.returncode == 0, result.stdout[-3000:]
