"""A run killed with SIGKILL mid-training and resumed ends with the losses of an uninterrupted
run, in the same MLflow run, with no metric logged twice."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient

from medlm.checkpoint import has_checkpoint
from tests.conftest import REPO_ROOT, run_module
from tests.test_bad_input import refused

pytestmark = pytest.mark.slow


def args(model, csv):
    return ["--model", str(model), "--dataset", str(csv), "--epochs", "4", "--max-samples", "60",
            "--lr", "3e-3", "--max-new-tokens", "4", "--num-validation-samples", "0",
            "--patience", "0", "--score-every-epoch"]


def client_for(directory):
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_until(arguments, cwd, line_start: str):
    """``experiments.run ARGUMENTS`` started in ``cwd`` (./mlflow.db), read until a line that
    starts with ``line_start``: (the process, its run id)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *arguments], cwd=cwd, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": ""})
    run_id = None
    for line in process.stderr:
        found = re.match(r"MLflow run (\w+)", line)
        run_id = found.group(1) if found else run_id
        if line.startswith(line_start):
            break
    return process, run_id


def losses(client, run_id):
    return {name: [(p.step, p.value) for p in sorted(client.get_metric_history(run_id, name),
                                                     key=lambda p: p.step)]
            for name in ("training_loss", "validation_loss", "symptom_f1", "word_f1",
                         "step/training_loss", "step/learning_rate")}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                          dataset_csv):
    """The uninterrupted run is also asked to resume while it still trains, which is refused
    (found by hostile use: that, and two resumes at once, both trained it: every epoch logged
    twice)."""
    env = {"MLFLOW_TRACKING_URI": ""}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    process, straight_id = run_until(args(tiny_model_dir, dataset_csv), straight, "epoch 1:")
    process.send_signal(signal.SIGSTOP)  # still training, however fast the machine
    try:
        second = run_module("experiments.run", "--resume", straight_id, cwd=straight,
                            env_extra=env)
    finally:
        process.send_signal(signal.SIGCONT)
    process.stderr.read()
    assert process.wait(timeout=600) == 0
    assert second.returncode == 2 and "is being trained by another process" in second.stderr
    reference = client_for(straight).get_run(straight_id)
    assert reference.info.status == "FINISHED"

    process, run_id = run_until(args(tiny_model_dir, dataset_csv), killed, "epoch 2:")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert run_id and has_checkpoint(killed / "checkpoints" / run_id)

    resumed = run_module("experiments.run", "--resume", run_id, cwd=killed, env_extra=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stderr
    client = client_for(killed)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert losses(client, run_id) == losses(client_for(straight), reference.info.run_id)
    assert [step for step, _ in losses(client, run_id)["training_loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in losses(client, run_id)["symptom_f1"]] == [0, 1, 2, 3, 4]
    resumed_epochs = [line for line in resumed.stderr.splitlines() if line.startswith("epoch ")]
    # epochs 3 and 4, after epoch 2 again if the kill cut its logging (samples) short
    assert [line.split(":")[0] for line in resumed_epochs][-2:] == ["epoch 3", "epoch 4"]
    assert len(resumed_epochs) in (2, 3) and all("| untuned " in line for line in resumed_epochs)
    assert not (killed / "checkpoints" / run_id).exists()
    assert client.get_model_version_by_alias("medlm", "champion").run_id == run_id


def test_a_checkpoint_of_other_data_does_not_resume(tmp_path, dataset_csv):
    from dataclasses import replace

    from medlm.data import load_disease_data
    from medlm.errors import MedLMError
    from medlm.recipe import DATA_FILE, check_resume_data, data_fingerprint
    from medlm.split import split_by_disease

    data = load_disease_data(str(dataset_csv), 60)
    split = split_by_disease(data.frame, 0.2, 42)
    checkpoint = tmp_path / "run1"
    checkpoint.mkdir()
    with pytest.raises(MedLMError, match="trained on other data"):  # an older MedLM's checkpoint
        check_resume_data(checkpoint, data, split)
    (checkpoint / DATA_FILE).write_text(json.dumps(data_fingerprint(data, split_by_disease(
        data.frame, 0.2, 7))))
    with pytest.raises(MedLMError, match="another split of the data: split_validation_sha256"):
        check_resume_data(checkpoint, data, split)
    # the same diseases on each side, but one row's symptoms edited in the file
    edited = data.frame.copy()
    edited.loc[edited.index[0], "Symptoms"] += ", fever"
    (checkpoint / DATA_FILE).write_text(json.dumps(data_fingerprint(
        replace(data, frame=edited), split)))
    with pytest.raises(MedLMError, match="the dataset's content changed: dataset_content_sha256"):
        check_resume_data(checkpoint, data, split)
    (checkpoint / DATA_FILE).write_text(json.dumps(data_fingerprint(data, split)))
    check_resume_data(checkpoint, data, split)


def test_resume_of_an_unknown_run_is_a_user_error(mlflow_home, capsys):
    from experiments import run

    status, err = refused(run.main, ["--resume", "abc123"], capsys)
    assert status == 2
    assert "error: --resume 'abc123': no checkpoint" in err
    assert "Traceback" not in err


def test_an_epoch_killed_while_it_was_being_logged_is_logged_on_resume(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """Ctrl-C after epoch 1 was checkpointed but before its samples were logged (during the
    symptom scoring and sampling, the longest part of a CPU epoch): the resume logs what was
    missing, from the checkpointed weights, and nothing twice. Before, epoch 1's samples (and,
    killed a moment earlier, its scores) were lost for good."""
    import mlflow
    import pandas as pd

    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    log_samples = MlflowTracker.log_samples

    def killed(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowTracker, "log_samples", killed)
    args = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "2", "--max-new-tokens", "8", "--no-progress", "--patience", "0",
            "--score-every-epoch"]
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(MlflowTracker, "log_samples", log_samples)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert run.info.status == "KILLED"
    # a new process, as a user resumes: its active experiment is not the run's (the check for
    # rows already logged found nothing that way, and logged the epoch's tables twice)
    resumed = run_module("experiments.run", "--resume", run.info.run_id, cwd=mlflow_home)
    assert resumed.returncode == 0, resumed.stderr
    assert "WARNING" not in resumed.stderr

    def steps(name):
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, name))

    assert steps("training_loss") == [1, 2] and steps("symptom_f1") == [0, 1, 2]
    samples = mlflow.load_table("samples.json", run_ids=[run.info.run_id])
    assert samples.groupby("epoch")["prompt"].apply(list).to_dict()[1] == (
        samples.groupby("epoch")["prompt"].apply(list).to_dict()[2])  # epoch 1 once, as 2
    scores = mlflow.load_table("symptom_scores.json", run_ids=[run.info.run_id])
    per_epoch = scores.groupby("epoch").size()
    assert per_epoch[1] == per_epoch[2] == per_epoch[0]  # no epoch's rows twice
    results = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="results.csv"))
    assert results["epoch"].tolist() == [1, 2]


def sweep_args(model, csv, *lrs):
    return ["--model", str(model), "--dataset", str(csv), "--max-samples", "40", "--epochs", "1",
            "--lr", *lrs, "--num-validation-samples", "0", "--max-new-tokens", "4",
            "--no-progress"]


def sweep_runs(client):
    runs = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = sorted((run for run in runs if run.data.tags.get("mlflow.parentRunId")),
                      key=lambda run: run.info.start_time)
    return parent, children


@pytest.mark.parametrize("child_first", [False, True], ids=["sweep", "child resumed first"])
def test_an_interrupted_sweep_resumes_with_the_children_it_has_not_finished(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, caplog, capsys, child_first):
    """Ctrl-C in the second of three children, after its epoch was checkpointed: `--resume
    PARENT_RUN_ID`, in a new process from another directory, keeps the first child as it was,
    resumes the second in its own run (or takes it as it is, if the user had resumed it alone),
    runs the third, and finishes the parent with all three in its table, all in the sweep's
    experiment. Before, a sweep's parent id was 'no checkpoint' and the user had to run the
    remaining values by hand, in another parent."""

    caplog.set_level(logging.INFO, logger="medlm")
    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    on_epoch_end, calls = MlflowTracker.on_epoch_end, []

    def interrupted_in_the_second_child(self, model, result):
        calls.append(self.run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        on_epoch_end(self, model, result)

    monkeypatch.setattr(MlflowTracker, "on_epoch_end", interrupted_in_the_second_child)
    args = sweep_args(tiny_model_dir, dataset_csv, "3e-3", "1e-3", "3e-4")
    assert run_cli(run_entry_point.main, [*args, "--checkpoint-dir", "ck"]) == 130
    monkeypatch.setattr(MlflowTracker, "on_epoch_end", on_epoch_end)
    client = MlflowClient()
    parent, children = sweep_runs(client)
    assert parent.info.status == "KILLED"
    assert [run.info.status for run in children] == ["FINISHED", "KILLED"]
    assert "interrupted (SIGINT); the MLflow run" in capsys.readouterr().err
    assert (f"Resume the whole sweep with: python -m experiments.run --resume "
            f"{parent.info.run_id} --checkpoint-dir ck") in caplog.text
    first_finished = children[0].info.end_time
    if child_first:
        assert run_cli(run_entry_point.main, ["--resume", children[1].info.run_id,
                                              "--checkpoint-dir", "ck"]) == 0
        assert client.get_run(children[1].info.run_id).info.status == "FINISHED"

    # a new process, elsewhere, whose active experiment is not the sweep's
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    elsewhere = mlflow_home / "elsewhere"
    elsewhere.mkdir()
    resumed_run = run_module("experiments.run", "--resume", parent.info.run_id,
                             "--checkpoint-dir", str(mlflow_home / "ck"), cwd=elsewhere)
    assert resumed_run.returncode == 0, resumed_run.stderr
    err = resumed_run.stderr
    assert ("child 1/3: lr=0.003 batch_size=8 epochs=1 weight_decay=0 seed=42: FINISHED before"
            in err)
    assert (f"child 2/3: lr=0.001 batch_size=8 epochs=1 weight_decay=0 seed=42: FINISHED (run "
            f"{children[1].info.run_id})" if child_first else
            f"(resuming run {children[1].info.run_id})") in err
    parent, resumed = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert [run.info.run_id for run in resumed[:2]] == [run.info.run_id for run in children]
    assert [run.info.status for run in resumed] == ["FINISHED"] * 3
    assert [run.data.params["lr"] for run in resumed] == ["0.003", "0.001", "0.0003"]
    assert resumed[0].info.end_time == first_finished  # not trained again
    for run in resumed:  # each child's epoch logged once
        assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                          "training_loss")] == [1]
    table = pd.read_csv(io.StringIO(mlflow_table(parent.info.run_id)))
    assert (table["status"] == "FINISHED").all() and len(table) == 3
    assert sorted(table["version"].astype(str)) == ["1", "2", "3"]
    assert parent.data.tags["best_child_run_id"] in {run.info.run_id for run in resumed}
    assert not any((mlflow_home / "ck").iterdir()) and not (elsewhere / "checkpoints").exists()


def test_a_sweep_child_stopped_before_its_first_epoch_starts_again(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, caplog):
    import medlm.recipe

    caplog.set_level(logging.INFO, logger="medlm")
    from experiments import run as run_entry_point
    from experiments._cli import run_cli

    fit, calls = medlm.recipe.fit, []

    def stopped_in_the_second_child(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(medlm.recipe, "fit", stopped_in_the_second_child)
    args = sweep_args(tiny_model_dir, dataset_csv, "3e-3", "1e-3")
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(medlm.recipe, "fit", fit)
    client = MlflowClient()
    parent, children = sweep_runs(client)
    killed = children[1].info.run_id
    assert run_cli(run_entry_point.main, ["--resume", parent.info.run_id]) == 0
    assert f"run {killed} was stopped before its first epoch ended" in caplog.text
    parent, children = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert [(run.data.params["lr"], run.info.status) for run in children] == [
        ("0.003", "FINISHED"), ("0.001", "KILLED"), ("0.001", "FINISHED")]
    table = mlflow_table(parent.info.run_id)
    assert killed not in table and children[2].info.run_id in table


def mlflow_table(run_id):
    import mlflow

    return mlflow.artifacts.load_text(f"runs:/{run_id}/sweep.csv")


def test_a_resumed_run_may_be_given_more_epochs(mlflow_home, tiny_model_dir, dataset_csv,
                                                monkeypatch, capsys):
    """`--resume RUN_ID --epochs N` goes on to N epochs in all (before, --epochs was ignored
    without a word); fewer than the run has completed is a one-line error."""
    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    on_epoch_end = MlflowTracker.on_epoch_end

    def interrupted_at_epoch_2(self, model, result):
        if result.epoch == 2:
            raise KeyboardInterrupt
        on_epoch_end(self, model, result)

    monkeypatch.setattr(MlflowTracker, "on_epoch_end", interrupted_at_epoch_2)
    args = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "2", "--lr", "3e-3", "--num-validation-samples", "0",
            "--no-symptom-eval", "--no-progress", "--patience", "0"]
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(MlflowTracker, "on_epoch_end", on_epoch_end)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    capsys.readouterr()
    assert run_cli(run_entry_point.main, ["--resume", run.info.run_id, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "the run has completed 2 epochs: expected at least 2" in err
    assert run_cli(run_entry_point.main, ["--resume", run.info.run_id, "--epochs", "3"]) == 0
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "training_loss"),
                                   key=lambda m: m.step)] == [1, 2, 3]
    assert client.get_run(run.info.run_id).data.metrics["best_epoch"] in (1, 2, 3)


def test_a_gpu_random_state_is_restored_to_the_gpu_the_process_trains_on(monkeypatch):
    """A torchrun rank trained on cuda:3 of 8 visible GPUs, resumed with one GPU visible per
    process (its card is then cuda:0): it gets cuda:3's state back. Before, the states were
    restored by position, and it got GPU 0's."""
    import torch

    from medlm.checkpoint import restore_rng, rng_state

    generators = {index: torch.full((4,), index, dtype=torch.uint8) for index in range(8)}
    current = 3

    def index_of(device):  # torch's: an int, "cuda" (the current device) or "cuda:N"
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return current if device.index is None else device.index

    def get_rng_state(device="cuda"):
        return generators[index_of(device)].clone()

    def set_rng_state(state, device="cuda"):
        generators[index_of(device)] = state.clone()

    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "get_rng_state", get_rng_state)
        monkeypatch.setattr(module, "set_rng_state", set_rng_state)
        monkeypatch.setattr(module, "get_rng_state_all",
                            lambda: [get_rng_state(i) for i in range(len(generators))])
        monkeypatch.setattr(module, "set_rng_state_all", lambda states: [
            set_rng_state(state, i) for i, state in enumerate(states)])
        monkeypatch.setattr(module, "device_count", lambda: len(generators))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    saved = rng_state()
    generators = {0: torch.zeros(4, dtype=torch.uint8)}  # resumed: one GPU visible, cuda:0
    current = 0
    restore_rng(saved)
    assert generators[0].tolist() == [3] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a CPU
    restore_rng(saved)


def test_a_run_killed_while_its_model_was_registered_resumes_to_one_version(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch):
    """Ctrl-C after the model was logged and registered, before its tags and alias were set:
    the resume completes that version (tags, champion), logs best_* once, registers nothing
    new. Before, every epoch was skipped and the model registered again: two versions."""
    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    log_best = MlflowTracker.log_best

    def killed_after(self, best, model_id=None):
        log_best(self, best, model_id)
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowTracker, "log_best", killed_after)
    args = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "1", "--max-new-tokens", "4", "--no-progress",
            "--num-validation-samples", "0"]
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(MlflowTracker, "log_best", log_best)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    assert run.info.status == "KILLED"
    assert len(client.search_model_versions("name = 'medlm'")) == 1
    resumed = run_module("experiments.run", "--resume", run.info.run_id, cwd=mlflow_home)
    assert resumed.returncode == 0, resumed.stderr
    (version,) = client.search_model_versions("name = 'medlm'")
    assert version.run_id == run.info.run_id and "evaluation_key" in version.tags
    assert client.get_model_version_by_alias("medlm", "champion").version == version.version
    assert len(client.get_metric_history(run.info.run_id, "best_validation_loss")) == 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_run_resumes_on_other_hardware_and_refuses_flags_that_change_its_math(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """A checkpoint from a GPU machine (its config says --device cuda --precision bf16) resumes
    here with --device cpu --precision fp32, said in one line; --lr beside --resume is refused,
    not silently ignored."""
    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    log_samples = MlflowTracker.log_samples
    monkeypatch.setattr(MlflowTracker, "log_samples",
                        lambda self, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    args = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "2", "--max-new-tokens", "4", "--no-progress", "--patience", "0"]
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(MlflowTracker, "log_samples", log_samples)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    saved = mlflow_home / "checkpoints" / run.info.run_id / "config.json"
    config = json.loads(saved.read_text())
    saved.write_text(json.dumps({**config, "device": "cuda", "precision": "bf16"}))
    capsys.readouterr()

    status, err = refused(run_entry_point.main, ["--resume", run.info.run_id, "--lr", "1e-3"],
                          capsys)
    assert status == 2 and err.count("error:") == 1
    assert "--lr 0.001 with --resume is invalid" in err
    status, err = refused(run_entry_point.main, ["--resume", run.info.run_id, "--no-register"],
                          capsys)  # named as typed, not by its dest ("--register")
    assert status == 2 and "--no-register with --resume" in err
    elsewhere = run_module("experiments.run", "--resume", run.info.run_id, "--device", "cpu",
                           "--precision", "fp32", cwd=mlflow_home)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (f"resuming {run.info.run_id} with --device cpu, --precision fp32 (it ran with "
            "--device cuda, --precision bf16)") in elsewhere.stderr
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(run.info.run_id, "training_loss")] == [
        1, 2]


def test_the_same_command_with_resume_continues_and_a_changed_flag_is_named(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """A run's own command plus --resume ID resumes: a flag whose value is the run's saved
    setting is accepted; one that differs is a one-line error naming the flag, the saved and
    the given value (before, every such flag was refused, whatever its value)."""
    from experiments import run as run_entry_point
    from experiments._cli import run_cli
    from medlm.tracking import MlflowTracker

    on_epoch_end = MlflowTracker.on_epoch_end

    def interrupted_at_epoch_1(self, model, result):
        if result.epoch == 1:
            raise KeyboardInterrupt
        on_epoch_end(self, model, result)

    def command(lr):
        return ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
                "30", "--epochs", "2", "--lr", lr, "--num-validation-samples", "0",
                "--no-symptom-eval", "--no-progress", "--patience", "0", "--no-register"]

    monkeypatch.setattr(MlflowTracker, "on_epoch_end", interrupted_at_epoch_1)
    assert run_cli(run_entry_point.main, command("3e-3")) == 130
    monkeypatch.setattr(MlflowTracker, "on_epoch_end", on_epoch_end)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    run_id = run.info.run_id
    capsys.readouterr()

    assert run_cli(run_entry_point.main, [*command("1e-3"), "--resume", run_id]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: --lr 0.001 with --resume is invalid: ")
    assert f"run {run_id} was started with --lr 0.003" in error
    named = error.split(": expected")[0]
    assert "--model" not in named and "--max-samples" not in named  # as saved: not named
    assert client.get_run(run_id).info.status == "KILLED"  # refused before it was reopened

    assert run_cli(run_entry_point.main, [*command("3e-3"), "--resume", run_id]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "training_loss")] == [1, 2]


def test_a_run_killed_while_its_model_was_logged_resumes_comparable(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, caplog):
    """Ctrl-C while the kept epoch's model was being saved (after its scores were logged):
    the resume logs the kept epoch's scores once (before, symptom_scores.json had each disease
    twice, each score two points at one step, and experiments.compare refused the run) and
    leaves no logged model PENDING."""
    import mlflow

    from experiments import run as run_entry_point
    from experiments._cli import run_cli

    save_model = mlflow.transformers.save_model

    def killed_while_saving(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.transformers, "save_model", killed_while_saving)
    args = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
            "40", "--epochs", "1", "--max-new-tokens", "4", "--no-progress",
            "--num-validation-samples", "0"]
    assert run_cli(run_entry_point.main, args) == 130
    monkeypatch.setattr(mlflow.transformers, "save_model", save_model)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("medlm").experiment_id
    (run,) = client.search_runs([experiment])
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    assert f"Resume with: python -m experiments.run --resume {run_id}" in caplog.text
    assert run_cli(run_entry_point.main, ["--resume", run_id]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    for score in ("symptom_f1", "word_f1", "best_symptom_f1"):
        steps = [point.step for point in client.get_metric_history(run_id, score)]
        assert len(steps) == len(set(steps)), (score, steps)
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/symptom_scores.json")
    rows = pd.DataFrame(table["data"], columns=table["columns"])
    assert not rows.duplicated(["epoch", "disease"]).any()
    assert sorted(rows["epoch"].unique()) == [0, 1]
    models = client.search_logged_models([experiment],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert sorted(str(model.status) for model in models) == ["FAILED", "READY"]
    (version,) = client.search_model_versions("name = 'medlm'")
    assert version.run_id == run_id
