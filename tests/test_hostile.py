"""Hostile and broken inputs (issue 36): a model that ships its own code or only a pickle, a
full disk, a damaged checkpoint or store, a resume against another store. Each is one line
(``error: ...``, exit status 2), runs no code that came with a model, and loses nothing
computed."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from experiments._cli import run_cli
from medlm.errors import MedLMError
from tests.conftest import REPO_ROOT

# a model's own Python, as transformers imports it from the directory when trusted
OWN_CODE = """
open({marker!r}, "w").write("imported")
from transformers import GPT2Config, GPT2LMHeadModel


class HostileConfig(GPT2Config):
    model_type = "medlm_hostile"


class HostileModel(GPT2LMHeadModel):
    config_class = HostileConfig
"""


def with_own_code(config_file, marker, architecture_built_in: bool = False) -> None:
    """Make the model whose config is ``config_file`` name a .py file beside it (``auto_map``)
    that creates ``marker`` when imported; with ``architecture_built_in``, the config keeps
    GPT-2's model type, which transformers has."""
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": "hostile.HostileConfig",
                          "AutoModelForCausalLM": "hostile.HostileModel"}
    if not architecture_built_in:
        config.update(model_type="medlm_hostile", architectures=["HostileModel"])
    config_file.write_text(json.dumps(config))
    (config_file.parent / "hostile.py").write_text(OWN_CODE.format(marker=str(marker)))


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("error: "), stderr
    return lines[-1]


def test_a_model_directory_never_runs_its_own_code(tiny_model_dir, tmp_path, monkeypatch):
    """Before, transformers asked on stdin whether to run the directory's code, and a ``y``
    imported it. Now it is refused in one line; a built-in architecture loads as itself."""
    from medlm.modeling import load_tokenizer_and_model

    monkeypatch.setattr("builtins.input", lambda prompt="": "y")  # a user who says yes
    marker = tmp_path / "imported"
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_model_dir, hostile)
    with_own_code(hostile / "config.json", marker)
    with pytest.raises(MedLMError, match="never runs a model's own code") as error:
        load_tokenizer_and_model(str(hostile))
    assert not marker.exists()
    assert str(hostile) in str(error.value) and "\n" not in str(error.value)

    built_in = tmp_path / "built-in"
    shutil.copytree(tiny_model_dir, built_in)
    with_own_code(built_in / "config.json", marker, architecture_built_in=True)
    _, model = load_tokenizer_and_model(str(built_in))
    assert type(model).__name__ == "GPT2LMHeadModel" and not marker.exists()


@pytest.mark.slow  # a process of its own, with its imports
def test_generate_refuses_a_model_directory_that_ships_code_even_when_told_yes(
        tiny_model_dir, tmp_path):
    marker = tmp_path / "imported"
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_model_dir, hostile)
    with_own_code(hostile / "config.json", marker)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--model-uri", str(hostile),
         "Kidney Failure"], cwd=tmp_path, input="y\n", capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": ""})
    assert not marker.exists()  # before, the "y" imported it
    assert result.returncode == 2, result.stderr
    assert "never runs a model's own code" in one_line_error(result.stderr)


@pytest.fixture(scope="module")
def mlflow_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved as an MLflow transformers model (MLmodel, model/, components/)."""
    import mlflow

    from medlm.modeling import load_tokenizer_and_model
    from medlm.registry import pip_requirements

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    path = tmp_path_factory.mktemp("mlflow-model") / "model"
    mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, str(path),
                                   task="text-generation", pip_requirements=pip_requirements())
    return path


def test_a_logged_model_of_a_class_transformers_lacks_is_not_loaded(mlflow_model_dir,
                                                                    tmp_path):
    """MLflow's own loader trusts the code of a logged model whose class transformers does not
    have, without asking: MedLM refuses such a model before MLflow sees it."""
    import yaml

    from medlm.inference import load_model_for_inference

    marker = tmp_path / "imported"
    logged = tmp_path / "logged"
    shutil.copytree(mlflow_model_dir, logged)
    with_own_code(logged / "model" / "config.json", marker)
    description = yaml.safe_load((logged / "MLmodel").read_text())
    description["flavors"]["transformers"]["pipeline_model_type"] = "HostileModel"
    (logged / "MLmodel").write_text(yaml.safe_dump(description))
    with pytest.raises(MedLMError, match="HostileModel.*never runs a model's own code"):
        load_model_for_inference(str(logged))
    assert not marker.exists()


def test_a_model_directory_holding_only_a_pickle_is_not_unpickled(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from medlm.modeling import load_tokenizer_and_model

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(MedLMError, match=r"only as a pickle \(pytorch_model.bin\).*expected "
                                         r"model.safetensors: re-save .* save_pretrained"):
        load_tokenizer_and_model(str(pickled))


def test_a_registered_version_whose_files_were_deleted_is_one_line(mlflow_home, tiny_model):
    import mlflow

    from medlm.inference import load_model_for_inference
    from medlm.registry import pip_requirements

    tokenizer, model = tiny_model
    with mlflow.start_run():
        mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name="model",
                                      task="text-generation", registered_model_name="medlm",
                                      pip_requirements=pip_requirements())
    assert type(load_model_for_inference("models:/medlm/1")[1]).__name__ == "GPT2LMHeadModel"
    (weights,) = (mlflow_home / "mlruns").rglob("model.safetensors")
    weights.unlink()
    missing = r"'models:/medlm/1': files missing in .*: "
    with pytest.raises(MedLMError, match=missing + "model/model.safetensors"):
        load_model_for_inference("models:/medlm/1")
    artifacts = weights.parent.parent
    for path in artifacts.iterdir():  # the model's artifact directory emptied
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(MedLMError, match=missing + "MLmodel"):
        load_model_for_inference("models:/medlm/1")


def test_generate_on_a_damaged_tracking_database_is_one_line(mlflow_home, capsys):
    from experiments import generate

    database = mlflow_home / "mlflow.db"
    garbage = bytes(range(256)) * 64
    database.write_bytes(garbage)
    assert run_cli(generate.main, ["Kidney Failure"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "mlflow.db" in line and "cannot be read" in line and "not a database" in line
    assert database.read_bytes() == garbage  # left as it was, for whoever can repair it


# ---- checkpoints: a full disk, damaged files, a resume against another store ----

class Epochs:
    """A run's checkpoints written one epoch at a time, as ``fit`` writes them."""

    def __init__(self, model, directory):
        from medlm.config import TrainConfig
        from medlm.train import make_scheduler

        self.model, self.directory, self.results = model, directory, []
        self.optimizer = torch.optim.AdamW(model.parameters())
        self.scheduler = make_scheduler(self.optimizer, TrainConfig(), 10)

    def save(self):
        from medlm.checkpoint import save_checkpoint
        from medlm.train import EpochResult, FitResult, TrainState

        epoch = len(self.results) + 1
        self.results.append(EpochResult(epoch, 3.0 - epoch / 10, 3.0, 20.0, 1.0, 1.0, 1.0, 1e-4,
                                        is_best=True))
        state = TrainState(self.optimizer, self.scheduler,
                           torch.amp.GradScaler("cpu", enabled=False), None,
                           FitResult(epochs=self.results))
        save_checkpoint(self.directory, self.model, state.state_dict(), None)


def resumable_run(model, checkpoint_dir, run_id="0123456789abcdef0123456789abcdef", epochs=1):
    """A run's checkpoint and saved settings, as a run interrupted after ``epochs`` leaves them."""
    from medlm.config import TrainConfig

    writer = Epochs(model, checkpoint_dir / run_id)
    for _ in range(epochs):
        writer.save()
    (checkpoint_dir / run_id / "config.json").write_text(json.dumps(asdict(TrainConfig())))
    return checkpoint_dir / run_id


TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("failure", [
    RuntimeError(TORCH_SHORT_WRITE),  # what torch.save says when the disk fills
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
])
def test_a_full_disk_while_checkpointing_keeps_the_last_good_epoch(failure, tiny_model,
                                                                     tmp_path, monkeypatch):
    from medlm.checkpoint import load_checkpoint

    _, model = tiny_model
    run = tmp_path / "checkpoints" / "0123456789abcdef0123456789abcdef"
    epochs = Epochs(model, run)
    epochs.save()
    real_save = torch.save

    def disk_full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(MedLMError) as error:
        epochs.save()
    message = str(error.value)
    assert "\n" not in message
    assert f"no space left on device in {tmp_path / 'checkpoints'}" in message
    assert "epoch 2" in message and "epoch 1, is kept" in message
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(path.name for path in run.iterdir()) == ["state.pt"]  # no partial
    assert [result["epoch"] for result in load_checkpoint(run, model)["epochs"]] == [1]


def test_a_full_disk_in_a_sweep_names_the_sweeps_resume(tiny_model, tmp_path, monkeypatch):
    from medlm.recipe import DATA_FILE, resumable_failures

    _, model = tiny_model
    checkpoints = tmp_path / "checkpoints"
    child, parent = "c" * 32, "p" * 32
    (checkpoints / parent).mkdir(parents=True)  # as run_sweep leaves it: the data, no settings
    (checkpoints / parent / DATA_FILE).write_text(json.dumps({}))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(MedLMError, match=f"then finish the run with python -m experiments"
                                         f".run --resume {parent} --checkpoint-dir"):
        with resumable_failures(str(checkpoints), [parent]):  # as sweep.run runs a sweep
            Epochs(model, checkpoints / child).save()
    assert not list((checkpoints / child).glob("*.partial"))


def test_a_full_artifact_store_keeps_the_checkpoint_and_says_how_to_finish(
        mlflow_home, tiny_model, monkeypatch):
    """Model logging fails for want of space (the weights' copy into the artifact store): the
    run's checkpoint stays, and the error says where and how to finish the run."""
    from medlm.checkpoint import has_checkpoint
    from medlm.config import TrainConfig
    from medlm.recipe import resumable_failures
    from medlm.registry import register
    from medlm.tracking import MlflowTracker

    tokenizer, model = tiny_model
    copy2 = shutil.copy2

    def full(source, target, *args, **kwargs):
        if str(target).endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return copy2(source, target, *args, **kwargs)

    checkpoints = mlflow_home / "checkpoints"
    params = {"checkpoint_dir": str(checkpoints)}
    tracker = MlflowTracker(TrainConfig(model="tiny", system_metrics=False), "cpu")
    with pytest.raises(MedLMError) as error, tracker.run(params) as run_id:
        writer = Epochs(model, checkpoints / run_id)
        writer.save()
        monkeypatch.setattr(shutil, "copy2", full)
        with resumable_failures(str(checkpoints), [run_id]):  # as sweep.run runs a run
            register(tracker, model, tokenizer, writer.results[-1], params)
    message = str(error.value)
    assert "\n" not in message and "no space left on device in " in message
    assert str(mlflow_home / "mlruns") in message
    assert f"python -m experiments.run --resume {run_id} --checkpoint-dir" in message
    assert has_checkpoint(checkpoints / run_id)


@pytest.mark.slow  # two training runs of the tiny model
def test_the_command_a_full_artifact_store_names_finishes_the_run(
        mlflow_home, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    from mlflow import MlflowClient

    from experiments import run as run_entry_point

    copy2 = shutil.copy2

    def full(source, target, *args, **kwargs):
        if str(target).endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return copy2(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", full)
    argv = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples", "40",
            "--epochs", "1", "--max-new-tokens", "4", "--num-validation-samples", "0",
            "--no-progress", "--no-system-metrics"]
    assert run_cli(run_entry_point.main, argv) == 2
    line = one_line_error(capsys.readouterr().err)
    command = line.split("then finish the run with ")[1].split()
    assert command[:4] == ["python", "-m", "experiments.run", "--resume"]
    monkeypatch.setattr(shutil, "copy2", copy2)  # space again
    assert run_cli(run_entry_point.main, command[3:]) == 0
    version = MlflowClient().get_model_version("medlm", "1")
    assert version.run_id == command[4]
    assert MlflowClient().get_run(command[4]).info.status == "FINISHED"


@pytest.mark.parametrize("damaged", ["garbage", "cut short"])
def test_a_damaged_checkpoint_file_is_named_before_anything_loads(damaged, tiny_model, tmp_path):
    from medlm.checkpoint import load_checkpoint
    from medlm.recipe import resume_config

    _, model = tiny_model
    run = resumable_run(model, tmp_path)
    path = run / "state.pt"
    if damaged == "garbage":
        path.write_bytes(b"\x13\x37" * 100)
    else:
        path.write_bytes(path.read_bytes()[:200])
    expected = (rf"checkpoint file {re.escape(str(path))} is damaged .*: expected .*"
                "start the run again")
    with pytest.raises(MedLMError, match=expected):
        resume_config(run.name, str(tmp_path))  # before the data and the model load
    with pytest.raises(MedLMError, match=expected):
        load_checkpoint(run, model)


def test_resume_of_a_damaged_checkpoint_is_one_line(mlflow_home, tiny_model, monkeypatch,
                                                    capsys):
    from experiments import run as run_entry_point

    monkeypatch.setattr("medlm.recipe.Run.setup", lambda *args, **kwargs: pytest.fail("loaded"))
    _, model = tiny_model
    run = resumable_run(model, mlflow_home / "checkpoints", epochs=2)
    (run / "state.pt").write_bytes(b"")
    assert run_cli(run_entry_point.main, ["--resume", run.name]) == 2
    line = one_line_error(capsys.readouterr().err)
    relative = run.relative_to(mlflow_home)  # as the default --checkpoint-dir names it
    assert f"{relative / 'state.pt'} is damaged (an empty file)" in line
    assert line.endswith("start the run again")


def test_resume_of_a_run_of_another_tracking_store_fails_before_loading(
        mlflow_home, tiny_model, monkeypatch, capsys):
    """Before, the data and the model were loaded (9-24 s) before MLflow said the run does not
    exist, in a traceback."""
    import mlflow

    from experiments import run as run_entry_point

    monkeypatch.setattr("medlm.recipe.Run.setup", lambda *args, **kwargs: pytest.fail("loaded"))
    _, model = tiny_model
    run = resumable_run(model, mlflow_home / "checkpoints")
    assert run_cli(run_entry_point.main, ["--resume", run.name]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"--resume {run.name!r}" in line and mlflow.get_tracking_uri() in line


def test_a_run_another_process_trains_is_not_trained_twice(tmp_path):
    """The process training a run holds its checkpoint directory's lock until it ends (a
    SIGKILL lets it go with the process): a --resume meanwhile is one line, not a second
    trainer logging every epoch twice; once the run is let go, it is claimed again."""
    import fcntl

    from medlm.checkpoint import OWNER, claim, remove_finished

    run = tmp_path / "checkpoints" / ("a" * 32)
    run.mkdir(parents=True)
    other = os.open(run / OWNER, os.O_RDWR | os.O_CREAT)  # another process's, as flock sees it
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(MedLMError, match=f"run {'a' * 32} is being trained by another process"):
        claim(run)
    os.close(other)  # that process ended
    claim(run)
    claim(run)  # this process's own again: a sweep claims what its resume claimed
    remove_finished(run)
    assert not run.exists()
