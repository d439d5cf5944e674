"""Bad input through the training CLI: one line naming the value and what was expected, exit
status 2, no traceback, no MLflow run (in-process, with MLflow's store in a temporary dir)."""

import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from experiments import run as run_module_under_test
from experiments._cli import run_cli
from tests.conftest import REPO_ROOT


def train(argv, capsys):
    status = run_cli(run_module_under_test.main, argv)
    captured = capsys.readouterr()
    return status, captured.err


def refused(main, argv, capsys):
    """(exit status, stderr) of a command that stops on bad input: argparse's own errors (text
    that is not a number) exit, the settings' checks return the status."""
    try:
        status = run_cli(main, argv)
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err.strip()


def no_runs(home) -> bool:
    if not (home / "mlflow.db").exists():
        return True
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


FILES = {
    "header only": (b"Name,Symptoms\n", "has a header but no rows"),
    "wrong delimiter": (b"Name;Symptoms\nFlu;Fever\nCold;Cough\n", "looks ';'-separated"),
    "binary garbage": (bytes(range(256)) * 8, "is binary, not text"),
    "latin-1 text": ("Name,Symptoms\nSjögren,Dry eyes\nFlu,Fever\n".encode("latin-1"),
                     "byte 0xf6 on line 2"),
    "all symptoms empty": (b'Name,Symptoms\nFlu,\nCold," , "\n', "no usable rows"),
    "single row": (b"Name,Symptoms\nFlu,Fever\n", "at least 2 distinct disease"),
    "single disease": (b"Name,Symptoms\nFlu,Fever\nflu,Cough\n", "at least 2 distinct"),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_bad_dataset_files(case, mlflow_home, tiny_model_dir, capsys):
    content, expected = FILES[case]
    path = mlflow_home / "data.csv"
    path.write_bytes(content)
    status, stderr = train(["--dataset", str(path), "--model", str(tiny_model_dir)], capsys)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1] and str(path) in lines[-1]
    assert no_runs(mlflow_home)


@pytest.mark.parametrize("flag,value,expected", [
    ("--lr", "abc", "'abc' is not a number"), ("--lr", "0", "expected a number > 0"),
    ("--batch-size", "-8", "expected a whole number >= 1"),
    ("--epochs", "2.5", "'2.5' is not a whole number"),
    ("--folds", "1", "--folds 1 is invalid: expected 0 (off) or a whole number >= 2"),
    ("--scheduler", "step", "--scheduler 'step' is invalid: expected one of constant, linear"),
])
def test_bad_flags(flag, value, expected, mlflow_home, tiny_model_dir, dataset_csv, capsys):
    status, err = refused(run_module_under_test.main, ["--dataset", str(dataset_csv), "--model",
                                                        str(tiny_model_dir), flag, value], capsys)
    assert status == 2 and err.count("\n") == 0 and expected in err and flag in err
    assert no_runs(mlflow_home)


@pytest.mark.parametrize("flags, expected", [
    (["--fold", "2"], "--fold 2 is invalid: expected --folds K beside it"),
    (["--folds", "3", "--fold", "3"], "--fold 3 is invalid: expected 0 to 2 (--folds 3)"),
    (["--folds", "3", "--validation-fraction", "0.3"],
     "--validation-fraction with --folds 3 is invalid"),
])
def test_a_fold_outside_the_folds(flags, expected, mlflow_home, tiny_model_dir, dataset_csv,
                                  capsys):
    code = run_cli(run_module_under_test.main,
                   ["--dataset", str(dataset_csv), "--model", str(tiny_model_dir), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expected in err
    assert no_runs(mlflow_home)


@pytest.mark.parametrize("module", ["run", "evaluate", "generate", "init_model"])
@pytest.mark.parametrize("value, expected", [
    ("-1", "is invalid: expected a whole number from 0 to 2**32 - 1"),  # numpy traceback
    ("4294967296", "is invalid"),
    ("seven", "'seven' is not a whole number"),
])
def test_bad_seeds_in_every_entry_point(module, value, expected, capsys):
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    status, err = refused(main, ["Asthma", "--seed", value] if module in ("generate", "init_model")
                          else ["--seed", value], capsys)
    assert status == 2 and err.count("\n") == 0
    assert expected in err and value in err and "--seed" in err


@pytest.mark.parametrize("value, expected", [
    ("100000", "'100000' is invalid: expected a whole number from 1 to 100"),  # ran until killed
    ("0", "'0' is invalid: expected a whole number from 1 to 100"),
    ("", "'' is not a whole number"),
])
def test_generate_refuses_an_unbounded_number_of_completions(value, expected, capsys):
    from experiments import generate

    with pytest.raises(SystemExit) as exit_info:
        run_cli(generate.main, ["Asthma", "--num-return-sequences", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and "--num-return-sequences" in err


def test_answers_longer_than_the_context_fail_before_training(mlflow_home, tiny_model_dir,
                                                              dataset_csv, capsys):
    """Before: a traceback (IndexError in GPT-2's position embeddings) after the first epoch."""
    status, stderr = train(["--dataset", str(dataset_csv), "--model", str(tiny_model_dir),
                            "--max-new-tokens", "100000"], capsys)
    assert status == 2 and no_runs(mlflow_home)
    assert stderr.strip().splitlines()[-1].startswith(
        "error: --max-new-tokens 100000 is too long for this model: a prompt of ")
    assert "context of 256 tokens" in stderr


def test_generate_with_answers_longer_than_the_context_is_a_user_error(tiny_model_dir, capsys):
    from experiments import generate

    status = run_cli(generate.main, ["Asthma", "--model-uri", str(tiny_model_dir),
                                     "--max-new-tokens", "300"])
    assert status == 2
    assert "expected at most 253" in capsys.readouterr().err


def test_context_overflow_is_a_user_error(mlflow_home, tiny_model_dir, dataset_csv, capsys):
    status, stderr = train(["--dataset", str(dataset_csv), "--model", str(tiny_model_dir),
                            "--max-length", "100000"], capsys)
    assert status == 2 and "--max-length 100000 exceeds" in stderr
    assert no_runs(mlflow_home)


@pytest.mark.slow
def test_a_row_longer_than_the_context_trains_truncated_with_a_warning(
        mlflow_home, tiny_model_dir, capsys, caplog):
    rows = ["Name,Symptoms", "Flu,Fever", "Cold,Cough", "Asthma,Wheezing",
            'Long,"' + ", ".join(["persistent dry cough"] * 300) + '"']
    path = mlflow_home / "long.csv"
    path.write_text("\n".join(rows) + "\n")
    status, stderr = train(["--dataset", str(path), "--model", str(tiny_model_dir), "--epochs",
                            "1", "--validation-fraction", "0.25", "--no-symptom-eval"], capsys)
    assert status == 0, stderr
    assert "truncated 1 row(s) longer than 256 tokens" in caplog.text


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_exits_130(tmp_path, tracking_store, tiny_model_dir,
                                                     dataset_csv):
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "--model", str(tiny_model_dir), "--dataset",
         str(dataset_csv), "--epochs", "200", "--max-samples", "60", "--no-symptom-eval"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT),
             "MLFLOW_TRACKING_URI": ""})
    deadline = time.monotonic() + 300
    for line in process.stderr:
        if line.startswith("epoch 1:") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130
    assert "marked KILLED" in rest and "Traceback" not in rest
    assert "python -m experiments.run --resume" in rest
    client = MlflowClient(tracking_uri=tracking_store)
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert run.info.status == "KILLED"


def test_system_metrics_without_psutil_is_a_user_error_before_any_run(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """MLflow raises only inside start_run, after the run exists: it stayed RUNNING, with a
    traceback, for anyone who pulled without reinstalling."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "psutil" else find_spec(name, *args))
    status, stderr = train(["--dataset", str(dataset_csv), "--model", str(tiny_model_dir)],
                           capsys)
    assert status == 2 and no_runs(mlflow_home)
    assert stderr.strip().splitlines()[-1].startswith(
        "error: system metrics need psutil, which is not installed")


def _listening_socket_that_never_answers():
    """A port that accepts connections (into its backlog) and never replies: a hung server."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


@pytest.mark.slow  # a process of its own, with its imports: 6-12 s
@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:{closed}", "does not answer"),  # nothing listens: refused
    ("http://127.0.0.1:{hung}", "does not answer"),  # listens, never replies: the bound
    ("nosuchscheme://somewhere", "cannot be used"),
    ("sqlite:///{tmp}/a-file/mlflow.db", "cannot be written"),  # a directory under a file
])
def test_a_tracking_store_that_cannot_be_used_is_one_line_within_seconds(
        uri, expected, tmp_path, tiny_model_dir, dataset_csv):
    import socket
    import time

    from tests.conftest import run_module

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    hung = _listening_socket_that_never_answers()
    uri = uri.format(closed=closed.getsockname()[1], hung=hung.getsockname()[1], tmp=tmp_path)
    closed.close()
    (tmp_path / "a-file").write_text("not a directory")
    started = time.monotonic()
    result = run_module("experiments.run", "--model", str(tiny_model_dir), "--dataset",
                        str(dataset_csv), "--epochs", "1", cwd=tmp_path,
                        env_extra={"MLFLOW_TRACKING_URI": uri})
    elapsed = time.monotonic() - started
    hung.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and expected in errors[0], result.stderr
    assert elapsed < 60, f"{elapsed:.0f} s: MLflow's retries were not bounded"
    assert not (tmp_path / "checkpoints").exists()  # no work done


@pytest.mark.parametrize("where", ["--checkpoint-dir", "dangling link", "artifacts",
                                   "artifacts, first run"])
def test_a_path_the_run_cannot_write_is_one_line_before_any_work(where, mlflow_home,
                                                                  tiny_model_dir, dataset_csv,
                                                                  capsys):
    """Under a file (as good as a read-only filesystem here, where the tests run as root)."""
    blocked = mlflow_home / "a-file"
    blocked.write_text("not a directory")
    flags = []
    if where == "--checkpoint-dir":
        flags = ["--checkpoint-dir", str(blocked / "checkpoints")]
    elif where == "dangling link":  # a link to a directory that is gone
        (mlflow_home / "checkpoints").symlink_to(mlflow_home / "gone")
    else:  # the experiment's artifacts go to ./mlruns, which here is a file
        (mlflow_home / "mlruns").write_text("not a directory")
        if where.endswith("first run"):  # no ./mlflow.db yet: a new user's first run
            (mlflow_home / "mlflow.db").unlink()
    status, stderr = train(["--model", str(tiny_model_dir), "--dataset", str(dataset_csv),
                            "--epochs", "1", *flags], capsys)
    assert status == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be written" in errors[0], stderr
    assert ("is a link to nothing" if where == "dangling link" else "is a file") in errors[0]
    assert no_runs(mlflow_home)  # before any run


def test_a_cache_the_run_cannot_write_is_a_warning_and_the_run_goes_on(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys, caplog):
    """A shared, read-only $MEDLM_CACHE is a supported set-up: nothing new is kept in it."""
    (mlflow_home / "a-file").write_text("not a directory")
    monkeypatch.setenv("MEDLM_CACHE", str(mlflow_home / "a-file" / "cache"))
    status, stderr = train(["--model", str(tiny_model_dir), "--dataset", str(dataset_csv),
                            "--epochs", "1", "--max-samples", "40", "--max-new-tokens", "4",
                            "--num-validation-samples", "0"], capsys)
    assert status == 0, stderr
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("WARNING: $MEDLM_CACHE") and "cannot be written" in w
               for w in warnings), warnings
    uri = f"sqlite:///{mlflow_home / 'mlflow.db'}"  # to the end: trained and registered
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("medlm", "1")


BAD_NAMES = [("--registered-model", "team/medlm", "Names cannot contain '/' or ':'"),
             ("--registered-model", "../medlm", "Names cannot contain '/' or ':'"),
             ("--registered-model", "it's", "it holds \"'\"")]


@pytest.mark.parametrize("module, flag, value, expected", [
    *[(module, *case) for module in ("run", "generate", "evaluate") for case in BAD_NAMES],
    ("run", "--experiment", "", "expected a non-empty MLflow experiment name")])
def test_a_name_mlflow_refuses_is_refused_before_any_run(module, flag, value, expected,
                                                         mlflow_home, tiny_model_dir,
                                                         dataset_csv, capsys):
    """Found at registration, after training, a bad model name would cost the run (and
    --resume keeps it); a quote broke MLflow's filter syntax with a traceback."""
    import importlib

    argv = {"run": ["--dataset", str(dataset_csv), "--model", str(tiny_model_dir)],
            "generate": ["Asthma"], "evaluate": []}[module]
    status, err = refused(importlib.import_module(f"experiments.{module}").main,
                          [*argv, flag, value], capsys)
    assert status == 2 and err.count("\n") == 0, err
    assert expected in err and flag in err and "Traceback" not in err
    assert no_runs(mlflow_home)


@pytest.mark.parametrize("flags, expected", [
    (["--resume", ""], "--resume '': no checkpoint in"),  # an unset shell variable
    (["--max-length", "1"], "--max-length 1 leaves no token to learn in any training row"),
    (["--checkpoint-dir", "/proc/medlm-checkpoints"], "'/proc' is not writable"),
    (["--dataset", ""], "dataset '' is empty"),
])
def test_input_found_by_a_round_of_hostile_use(flags, expected, mlflow_home, tiny_model_dir,
                                               dataset_csv, capsys):
    """Before: --resume "" trained and registered a new run; --max-length 1 trained on no
    token (loss 0.0000) and crowned the result; a checkpoint directory root may not create
    (os.access says yes to root) failed after set-up with a traceback and a FAILED run."""
    argv = [*(["--dataset", str(dataset_csv)] if "--dataset" not in flags else []),
            "--model", str(tiny_model_dir), "--epochs", "1", "--max-samples", "40", *flags]
    status, err = train(argv, capsys)
    assert status == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ") and expected in err
    assert no_runs(mlflow_home)


def test_a_deleted_experiment_is_named_with_how_to_get_it_back(mlflow_home, tiny_model_dir,
                                                              dataset_csv, capsys):
    """mlflow ui's delete keeps an experiment in the trash, where MLflow refuses to run in it:
    before, a traceback and exit 1."""
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("medlm"))
    status, err = train(["--dataset", str(dataset_csv), "--model", str(tiny_model_dir),
                         "--epochs", "1", "--max-samples", "40", "--no-symptom-eval"], capsys)
    assert status == 2 and err.strip().count("\n") == 0, err
    assert "--experiment 'medlm' was deleted" in err and "mlflow experiments restore" in err
    assert client.search_runs([e.experiment_id for e in client.search_experiments(
        view_type=3)]) == []


def test_a_cuda_run_without_nvidia_ml_py_says_its_gpu_metrics_are_missing(
        tiny_model_dir, dataset_csv, monkeypatch, caplog):
    """Issue 38: MLflow drops its GPU monitor at DEBUG level, so a GPU run logged no system/gpu_*
    metrics and nothing said why. Set up on a pretended GPU (torch's own queries), where the
    run's --deterministic also reaches torch before any CUDA work."""
    import importlib.util

    import torch

    from medlm.config import TrainConfig
    from medlm.modeling import set_deterministic
    from medlm.recipe import Run
    from tests.test_modeling import pretend_gpu

    pretend_gpu(monkeypatch, 8)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "pynvml" else find_spec(name, *args))
    matmul, kept = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    config = TrainConfig(dataset=str(dataset_csv), model=str(tiny_model_dir), deterministic=True)
    try:
        with caplog.at_level("WARNING", logger="medlm"):
            run = Run(config).setup()
        assert run.precision.device.type == "cuda" and run.precision.numerics == "bf16+tf32"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False, "cuda")
        matmul.allow_tf32 = kept
    (warning,) = [r.getMessage() for r in caplog.records if "nvidia-ml-py" in r.getMessage()]
    assert warning.startswith("WARNING: no GPU system metrics") and "pip install" in warning
    caplog.clear()
    Run(TrainConfig(dataset=str(dataset_csv), model=str(tiny_model_dir),
                    system_metrics=False)).setup()
    assert not [r for r in caplog.records if "nvidia-ml-py" in r.getMessage()]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_failing_run_under_torchrun_aborts_nccl_instead_of_waiting_for_every_rank(
        mlflow_home, tiny_model_dir, monkeypatch, capsys):
    """Issue 38: the error path called destroy_process_group(), which NCCL runs collectively
    (PyTorch #122358): one rank's error hung the job up to --collective-timeout."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append("destroy"))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group",
                        lambda group=None: calls.append("abort"))
    status, stderr = train(["--dataset", str(mlflow_home / "missing.csv"), "--model",
                            str(tiny_model_dir)], capsys)
    assert status == 2 and "missing.csv" in stderr
    assert calls == ["abort"]
    calls.clear()
    monkeypatch.delattr(dist.distributed_c10d, "_abort_process_group")  # torch 2.4: no abort
    train(["--dataset", str(mlflow_home / "missing.csv"), "--model", str(tiny_model_dir)], capsys)
    assert calls == []  # nor a destroy: the process's exit tears the group down
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")  # its destroy is local
    train(["--dataset", str(mlflow_home / "missing.csv"), "--model", str(tiny_model_dir)], capsys)
    assert calls == ["destroy"]
