"""Several processes under torchrun: 2 CPU processes talking over gloo, as a user starts them."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from medlm.checkpoint import has_checkpoint
from medlm.errors import MedLMError
from tests.conftest import REPO_ROOT, run_python

pytestmark = pytest.mark.slow
EPOCHS = 2


def torchrun(*args: str, cwd: Path, nproc: int = 2, env_extra: dict | None = None):
    """``torchrun --standalone --nproc_per_node N ARGS`` without a TTY."""
    return run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                      str(nproc), *args, cwd=cwd,
                      env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})})


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, dataset_csv):
    workdir = tmp_path_factory.mktemp("ddp-user")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = torchrun("-m", "experiments.run", "--model", str(tiny_model_dir), "--dataset",
                      str(dataset_csv), "--max-samples", "120", "--epochs", str(EPOCHS),
                      "--lr", "3e-3", "--patience", "0", "--score-every-epoch", cwd=workdir,
                      env_extra={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return workdir, result, client


def test_torchrun_makes_one_run_with_every_metric_and_registers_once(ddp_run):
    workdir, result, client = ddp_run
    experiment = client.get_experiment_by_name("medlm")
    (run,) = client.search_runs([experiment.experiment_id])  # not one run per process
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert int(run.data.params["rows_train"]) + int(run.data.params["rows_validation"]) == 120
    for metric in ("training_loss", "validation_loss", "train_samples_per_sec",
                   "train_tokens_per_sec", "symptom_f1"):
        history = client.get_metric_history(run.info.run_id, metric)
        first = 0 if metric == "symptom_f1" else 1  # epoch 0: the untuned base, scored once
        assert sorted(point.step for point in history) == list(range(first, EPOCHS + 1)), metric
    (version,) = client.search_model_versions("name='medlm'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("medlm", "champion").version == version.version
    # Each line is said once (by rank 0), and no checkpoint is left behind.
    assert result.stderr.count("epoch 1: training loss") == 1
    assert result.stderr.count("registered medlm version 1") == 1
    assert "2 processes" in result.stderr
    assert not list((workdir / "checkpoints").glob("*/latest"))


def test_samples_are_generated_once_per_epoch(ddp_run):
    workdir, _, client = ddp_run
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    local = Path(client.download_artifacts(run.info.run_id, "samples.json",
                                           str(workdir / "dl")))
    table = json.loads(local.read_text())
    prompts = [row[table["columns"].index("prompt")] for row in table["data"]]
    assert prompts.count("Kidney Failure") == EPOCHS


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory, tiny_model_dir, dataset_csv):
    """tests/ddp_worker.py under torchrun with 2 processes, and alone as the reference."""
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"worker{nproc}")
        args = ("tests/ddp_worker.py", str(tiny_model_dir), str(dataset_csv), str(out))
        result = (run_python(*args, cwd=REPO_ROOT) if nproc == 1
                  else torchrun(*args, cwd=REPO_ROOT, nproc=nproc))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[nproc] = [json.loads((out / f"rank{rank}.json").read_text())
                          for rank in range(nproc)]
    return outputs


def assert_same_up_to_fp32_rounding(together: dict, alone: dict) -> None:
    """Two processes all-reduce their gradients: fp32 sums in another order, on whichever
    kernels the CPU has (AVX512-BF16, AVX512, AVX2), so the results differ by rounding, which
    Adam's normalised steps carry on. A sum of the weights cancels, so its rounding is measured
    against the absolute sum, which bounds it. On an Intel Xeon without bf16 the signed sums
    differed by 1.65e-5 of themselves (0.08 of 4957), which failed the earlier rel=1e-5; the
    bounds here are 1e-4. A gradient not averaged, a row lost or a step skipped moves these
    figures by percents."""
    for both, single in zip(together["losses"], alone["losses"], strict=True):
        assert both == pytest.approx(single, rel=1e-4)
    (signed, absolute), (signed_alone, absolute_alone) = together["weights"], alone["weights"]
    assert absolute == pytest.approx(absolute_alone, rel=1e-4)
    assert abs(signed - signed_alone) <= 1e-4 * absolute_alone


def test_each_process_trains_on_its_own_shard_and_together_they_cover_the_training_set(
        worker_outputs):
    ranks = worker_outputs[2]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    training_rows = ranks[0]["training_rows"]
    for epoch in map(str, range(1, EPOCHS + 1)):
        shards = [set(rank["rows_by_epoch"][epoch]) for rank in ranks]
        assert all(len(shard) == len(rank["rows_by_epoch"][epoch])  # no row twice
                   for shard, rank in zip(shards, ranks, strict=True))
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(training_rows))
        assert abs(len(shards[0]) - len(shards[1])) <= 8
    assert ranks[0]["rows_by_epoch"]["1"] != ranks[0]["rows_by_epoch"]["2"]  # reshuffled


def test_two_processes_train_the_same_model_as_one(worker_outputs):
    (alone,), ranks = worker_outputs[1], worker_outputs[2]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the processes stay in step
    assert ranks[0]["losses"] == ranks[1]["losses"]  # losses are all-reduced
    # --batch-size is the batch of all processes together: one step sees the same rows, so
    # without dropout the losses and weights match a single process up to float rounding.
    assert_same_up_to_fp32_rounding(ranks[0], alone)
    assert ranks[0]["losses"][-1][0] < ranks[0]["losses"][0][0]


def test_gradient_accumulation_under_torchrun_matches_one_process(tmp_path, tiny_model_dir,
                                                                  dataset_csv):
    """--grad-accum 2 with two processes: the first batch of each window goes through DDP's
    no_sync (gradients kept local), the second all-reduces; the result is one process's."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"accum{nproc}"
        out.mkdir()
        args = ("tests/ddp_worker.py", str(tiny_model_dir), str(dataset_csv), str(out))
        env = {"MEDLM_TEST_GRAD_ACCUM": "2"}
        result = (run_python(*args, cwd=REPO_ROOT, env_extra=env) if nproc == 1
                  else torchrun(*args, cwd=REPO_ROOT, nproc=nproc, env_extra=env))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = [json.loads((out / f"rank{rank}.json").read_text())
                       for rank in range(nproc)]
    (alone,), ranks = runs[1], runs[2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert_same_up_to_fp32_rounding(ranks[0], alone)


def test_an_interrupted_torchrun_job_resumes_to_the_uninterrupted_losses(
        worker_outputs, tiny_model_dir, dataset_csv, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    args = ("tests/ddp_worker.py", str(tiny_model_dir), str(dataset_csv), str(tmp_path))
    stopped = torchrun(*args, "stop", str(checkpoint), cwd=REPO_ROOT)
    assert stopped.returncode != 0 and has_checkpoint(checkpoint)
    resumed = torchrun(*args, "resume", str(checkpoint), cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    uninterrupted = worker_outputs[2]
    for rank in range(2):
        assert ranks[rank]["losses"] == uninterrupted[rank]["losses"]
        assert ranks[rank]["weights"] == uninterrupted[rank]["weights"]
        # Epoch 2 after resuming draws exactly the rows it would have drawn.
        assert ranks[rank]["rows_by_epoch"]["2"] == uninterrupted[rank]["rows_by_epoch"]["2"]


def write_checkpoint(model, directory, rng_states=None):
    from medlm.checkpoint import save_checkpoint
    from medlm.config import TrainConfig
    from medlm.train import FitResult, TrainState, make_scheduler

    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(optimizer, make_scheduler(optimizer, TrainConfig(), 10),
                       torch.amp.GradScaler("cpu", enabled=False), None, FitResult())
    save_checkpoint(directory, model, state.state_dict(), None, rng_states)


def test_a_checkpoint_resumes_only_with_as_many_processes(tiny_model, tmp_path, monkeypatch):
    from medlm import distributed
    from medlm.checkpoint import load_checkpoint, rng_state
    from medlm.config import TrainConfig
    from medlm.recipe import resume_config

    _, model = tiny_model
    write_checkpoint(model, tmp_path, rng_states=[rng_state(), rng_state()])
    with pytest.raises(MedLMError, match="written by 2 training process.*not 1.*resume with 2"):
        load_checkpoint(tmp_path, model)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert load_checkpoint(tmp_path, model)["epochs"] == []
    monkeypatch.undo()
    # The CLI checks it before reopening the MLflow run (which would then end FAILED).
    (tmp_path / "config.json").write_text(json.dumps(asdict(TrainConfig())))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MedLMError, match="written by 2 training process"):
        resume_config(tmp_path.name, str(tmp_path.parent))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_config(tmp_path.name, str(tmp_path.parent)) == TrainConfig()


def test_a_checkpoint_of_an_older_medlm_is_refused_in_one_line(tiny_model, tmp_path):
    """Another layout (before torchrun support: one process's RNGs as top-level keys) is not
    read by guesswork: the error says how to continue."""
    from medlm.checkpoint import check_world_size, load_checkpoint

    _, model = tiny_model
    write_checkpoint(model, tmp_path)
    state_file = tmp_path / "state.pt"
    state = torch.load(state_file, weights_only=True)
    (saved,) = state.pop("rng")
    del state["format"]
    state.update({f"{name}_rng": value for name, value in saved.items()})
    torch.save(state, state_file)
    expected = "written by an older MedLM .*finish the run with the MedLM that started it"
    with pytest.raises(MedLMError, match=expected):
        check_world_size(tmp_path, 1)  # what --resume checks before the data and model load
    with pytest.raises(MedLMError, match=expected):
        load_checkpoint(tmp_path, model)


def test_a_format_3_checkpoint_resumes_but_for_a_lora_run(tiny_model, tmp_path, monkeypatch):
    """Format 3 hashed the whole frozen base and held every visible GPU's random state: a full
    fine-tuning run (no frozen base) resumes from it, its own GPU's state found by index (torch's
    queries pretending 2 GPUs, this process on cuda:1); a LoRA run's is refused in one line."""
    from medlm.checkpoint import load_checkpoint

    _, model = tiny_model
    write_checkpoint(model, tmp_path)
    state_file = tmp_path / "state.pt"
    state = torch.load(state_file, weights_only=True)
    states = [torch.full((8,), index, dtype=torch.uint8) for index in range(2)]
    state["format"], state["rng"][0]["cuda"] = 3, states
    torch.save(state, state_file)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new_state, device="cuda": restored.append((new_state, device)))
    assert load_checkpoint(tmp_path, model)["format"] == 3
    ((new_state, device),) = restored
    assert torch.equal(new_state, states[1]) and device == 1
    state["frozen_sha256"] = "0" * 64  # a LoRA run's
    torch.save(state, state_file)
    with pytest.raises(MedLMError, match=r"of a LoRA run was written by an older MedLM \(format 3"):
        load_checkpoint(tmp_path, model, frozen="0" * 64)
