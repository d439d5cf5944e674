import copy
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from medlm.config import TrainConfig
from medlm.data import CausalLMCollator, LanguageDataset, load_disease_data
from medlm.modeling import Precision, resolve_precision
from medlm.split import split_by_disease
from medlm.train import (
    FitResult,
    Logger,
    NonFiniteLossError,
    Report,
    TrainState,
    count_loss_tokens,
    evaluate,
    fit,
    token_loss_sum,
)


def plain(**settings) -> TrainConfig:
    """The loop's own behaviour: a constant rate, no warmup and no early stopping unless a test
    asks for them (the default recipe has all three)."""
    return TrainConfig(**{"scheduler": "constant", "warmup_steps": 0, "patience": 0, **settings})


CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", "cpu")


def loaders(tokenizer, frame, batch_size=8, seed=42):
    split = split_by_disease(frame, 0.2, seed)
    train_frame, validation_frame = split.train, split.validation
    collate = CausalLMCollator(tokenizer.pad_token_id)
    train = DataLoader(LanguageDataset(train_frame, tokenizer), batch_size=batch_size,
                       shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(seed))
    validation = DataLoader(LanguageDataset(validation_frame, tokenizer),
                            batch_size=batch_size, collate_fn=collate)
    return train, validation


@pytest.fixture(scope="module")
def small_frame(dataset_csv):
    return load_disease_data(str(dataset_csv), max_samples=48).frame


class Scoring(Logger):
    """A scorer function as the loop's scoring logger."""

    def __init__(self, function):
        self.function = function

    def score(self, model):
        return self.function(model)


class Recorder(Logger):
    def __init__(self):
        self.results = []

    def on_epoch_end(self, model, result):
        self.results.append(result)


def test_loss_goes_down_and_every_epoch_is_reported(tiny_model, small_frame):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    recorder = Recorder()
    config = plain(epochs=3, lr=3e-3, progress=False)
    result = fit(model, (train, validation), config, FP32, report=Report([recorder]))
    losses = [epoch.training_loss for epoch in result.epochs]
    assert [epoch.epoch for epoch in recorder.results] == [1, 2, 3]
    assert losses[-1] < losses[0] - 0.5
    assert result.epochs[-1].validation_loss < result.epochs[0].validation_loss
    last = result.epochs[-1]
    assert last.validation_perplexity == pytest.approx(math.exp(last.validation_loss))
    assert last.train_samples_per_sec > 0 and last.train_tokens_per_sec > 0
    assert last.learning_rate == pytest.approx(3e-3)


def test_padding_does_not_change_the_loss(tiny_model, gpt2_tokenizer):
    tokenizer, model = tiny_model
    model.eval()
    frame = pd.DataFrame({"Name": ["Flu", "Chronic kidney disease"],
                          "Symptoms": ["Fever", "Fatigue, swelling, itching, nausea"]})
    dataset = LanguageDataset(frame, tokenizer)
    collate = CausalLMCollator(tokenizer.pad_token_id)
    padded = collate([dataset[0], dataset[1]])
    alone = collate([dataset[0]])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        short_in_batch = token_loss_sum(model, {k: v[:1] for k, v in padded.items()})
        short_alone = token_loss_sum(model, alone)
    assert short_in_batch.item() == pytest.approx(short_alone.item(), rel=1e-5)
    assert count_loss_tokens({k: v[:1] for k, v in padded.items()}) == len(dataset[0]
                                                                           ["input_ids"]) - 1


def test_label_smoothing_raises_the_training_loss_and_leaves_the_validation_loss_alone(
        tiny_model_dir, small_frame):
    """--label-smoothing changes what training minimises; the validation loss, which early
    stopping and the champion compare across runs, stays the plain cross-entropy."""
    from medlm.modeling import load_tokenizer_and_model

    results = {}
    for smoothing in (0.0, 0.2):
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        with torch.no_grad():  # confident predictions: a random model's are near uniform,
            model.lm_head.weight *= 30  # where smoothing changes nothing
        train, validation = loaders(tokenizer, small_frame)
        config = plain(epochs=1, lr=1e-12, progress=False, label_smoothing=smoothing)
        results[smoothing] = fit(model, (train, validation), config, FP32).epochs[0]
    assert results[0.2].training_loss != pytest.approx(results[0.0].training_loss, rel=1e-3)
    assert results[0.2].validation_loss == pytest.approx(results[0.0].validation_loss, rel=1e-5)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_model_dir, small_frame):
    from medlm.modeling import load_tokenizer_and_model

    weights = []
    for batch_size, accum in ((16, 1), (8, 2)):  # one optimizer step over the same 16 rows
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        for module in model.modules():  # dropout masks would differ between batch shapes
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train_frame = split_by_disease(small_frame, 0.2, 42).train
        dataset = LanguageDataset(train_frame.head(16), tokenizer)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=CausalLMCollator(
            tokenizer.pad_token_id))
        config = plain(epochs=1, lr=1e-3, grad_accum=accum, progress=False,
                             max_grad_norm=0)
        fit(model, (loader, loader), config, FP32)
        weights.append(model.transformer.h[0].mlp.c_fc.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-3, atol=1e-5)


def test_early_stopping_keeps_the_best_epochs_weights(tiny_model, small_frame):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    # A learning rate this high overfits/diverges, so validation loss stops improving fast.
    config = plain(epochs=8, lr=5e-2, patience=1, progress=False)
    result = fit(model, (train, validation), config, FP32)
    assert result.stopped_early and len(result.epochs) < 8
    best = result.best
    assert [epoch.is_best for epoch in result.epochs].count(True) >= 1
    assert result.epochs[-1].validation_loss >= best.validation_loss
    assert evaluate(model, validation, FP32) == pytest.approx(best.validation_loss,
                                                                   rel=1e-4)


class ScriptedScorer(Logger):
    """Returns the next scripted symptom F1 each epoch and remembers the weights it scored."""

    def __init__(self, values):
        self.values, self.weights = list(values), []

    def score(self, model):
        self.weights.append(model.lm_head.weight.detach().clone())
        return {"symptom_f1": self.values[len(self.weights) - 1], "word_f1": 0.0}


def test_select_by_symptom_f1_keeps_the_highest_scoring_epoch_and_stops_on_it(
        tiny_model, small_frame):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    scorer = ScriptedScorer([0.10, 0.30, 0.20, 0.25, 0.9])
    config = plain(epochs=5, lr=3e-3, patience=2, select_by="symptom_f1", progress=False)
    result = fit(model, (train, validation), config, FP32, report=Report([scorer]))
    # Epoch 2 is best by F1 although validation loss falls every epoch; two epochs without a
    # better F1 stop the run before epoch 5.
    assert result.stopped_early and len(result.epochs) == 4
    assert result.epochs[3].validation_loss < result.epochs[1].validation_loss
    assert result.best.epoch == 2 and [e.is_best for e in result.epochs] == [
        True, True, False, False]
    assert result.best.scores == {"symptom_f1": 0.30, "word_f1": 0.0}
    assert torch.equal(model.lm_head.weight, scorer.weights[1])


def test_select_by_symptom_f1_without_a_scorer_is_refused(tiny_model, small_frame):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    with pytest.raises(ValueError, match="scorer"):
        fit(model, (train, validation), plain(epochs=1, select_by="symptom_f1"), FP32)


def test_a_non_finite_loss_stops_training_with_advice(tiny_model, small_frame):
    tokenizer, model = tiny_model
    with torch.no_grad():
        model.transformer.wte.weight[:] = float("nan")
    train, validation = loaders(tokenizer, small_frame)
    with pytest.raises(NonFiniteLossError, match="lower --lr"):
        fit(model, (train, validation), plain(epochs=2, progress=False), FP32)


def test_same_seed_same_losses(tiny_model_dir, small_frame):
    from medlm.modeling import load_tokenizer_and_model

    runs = []
    for _ in range(2):
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        train, validation = loaders(tokenizer, small_frame)
        result = fit(model, (train, validation), plain(epochs=2, progress=False), FP32)
        runs.append([(e.training_loss, e.validation_loss) for e in result.epochs])
    assert runs[0] == runs[1]


def test_bf16_autocast_trains_on_cpu(tiny_model, small_frame):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    bf16 = Precision("bf16", "cpu")  # whatever this CPU has natively
    result = fit(model, (train, validation), plain(epochs=2, lr=3e-3, progress=False), bf16)
    assert result.epochs[1].training_loss < result.epochs[0].training_loss
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_schedulers_warm_up_and_decay(tiny_model, small_frame, scheduler):
    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    config = plain(epochs=2, lr=1e-3, scheduler=scheduler, warmup_steps=2,
                         progress=False)
    result = fit(model, (train, validation), config, FP32)
    assert result.epochs[-1].learning_rate == pytest.approx(0.0, abs=1e-9)
    assert 0 < result.epochs[0].learning_rate < 1e-3


def test_weight_decay_skips_biases_and_norms(tiny_model, small_frame, monkeypatch):
    made = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    tokenizer, model = tiny_model
    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    fit(model, loaders(tokenizer, small_frame), plain(epochs=1, weight_decay=0.1,
                                                      progress=False), FP32)
    (optimizer,) = made
    decayed, plain_group = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain_group["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and plain_group["params"]
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for p in model.parameters())


class StopAfter(Logger):
    """Simulates a kill once ``epoch`` has been checkpointed."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, model, result):
        if result.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("group_by_length", [True, False])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_losses(
        tiny_model_dir, small_frame, tmp_path, group_by_length):
    from medlm.data import make_loader
    from medlm.modeling import load_tokenizer_and_model

    config = plain(epochs=2, lr=3e-3, progress=False, group_by_length=group_by_length)

    def attempt(**kwargs):
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        split = split_by_disease(small_frame, 0.2, 42)
        train_frame, validation_frame = split.train, split.validation
        train = make_loader(LanguageDataset(train_frame, tokenizer), config, train=True)
        validation = make_loader(LanguageDataset(validation_frame, tokenizer), config,
                                 train=False)
        return fit(model, (train, validation), config, FP32, **kwargs)

    uninterrupted = attempt()
    with pytest.raises(KeyboardInterrupt):
        attempt(checkpoint_dir=str(tmp_path), report=Report([StopAfter(1)]))
    resumed = attempt(checkpoint_dir=str(tmp_path))
    assert [(e.training_loss, e.validation_loss) for e in resumed.epochs] == [
        (e.training_loss, e.validation_loss) for e in uninterrupted.epochs]


def one_window(tokenizer, frame):
    train, _ = loaders(tokenizer, frame)
    return [next(iter(train))]


def step_with(model, window, scaler, max_grad_norm):
    from medlm.train import train_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = TrainState(optimizer, scheduler, scaler, None, FitResult())
    train_step(model, window, state, Precision("fp32", "cpu"),
               plain(max_grad_norm=max_grad_norm))
    return optimizer


def test_an_enabled_grad_scaler_unscales_before_clipping(tiny_model_dir, small_frame):
    """The fp16 path's GradScaler, run on CPU: with gradients scaled by 1024 and clipped to a
    norm of 0.1, the step equals the unscaled one only if unscale_ comes before clipping."""
    import copy

    from medlm.modeling import load_tokenizer_and_model

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    scaled, plain = copy.deepcopy(model), copy.deepcopy(model)
    window = one_window(tokenizer, small_frame)
    step_with(scaled, window, torch.amp.GradScaler("cpu", init_scale=1024.0), 0.1)
    step_with(plain, window, torch.amp.GradScaler("cpu", enabled=False), 0.1)
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(scaled.parameters(), model.parameters(),
                                                        strict=True))  # it did step


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(tiny_model_dir, dataset_csv):
    from medlm.modeling import load_tokenizer_and_model

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    before = [parameter.detach().clone() for parameter in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # scaled gradients overflow to inf
    rows = load_disease_data(str(dataset_csv), max_samples=80).frame  # a window that does
    optimizer = step_with(model, one_window(tokenizer, rows), scaler, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == pytest.approx(5e37)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and not optimizer.state  # no step taken


def test_batches_move_asynchronously_only_from_pinned_memory_to_cuda(monkeypatch):
    from medlm.train import _to

    calls = []

    def record(tensor, device, non_blocking=False):
        calls.append((torch.device(device).type, non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, "to", record)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    _to(batch, torch.device("mps"))
    _to(batch, torch.device("cuda"))  # pageable memory
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor: True)
    _to(batch, torch.device("mps"))
    _to(batch, torch.device("cuda"))
    assert calls == [("mps", False), ("cuda", False), ("mps", False), ("cuda", True)]


TWO_EPOCHS = plain(epochs=2, lr=3e-3, progress=False)  # the config most resume tests share


def interrupted_run(tiny_model_dir, small_frame, checkpoint_dir, config, precision=FP32,
                    killed=None):
    """``attempt``: fit on the tiny model into ``checkpoint_dir``, which holds the same fit killed
    after epoch 1 (``killed``: a copy of that checkpoint, made once for ``TWO_EPOCHS``)."""
    from medlm.modeling import load_tokenizer_and_model

    def attempt(precision=precision, **kwargs):
        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        train, validation = loaders(tokenizer, small_frame)
        return fit(model, (train, validation), config, precision,
                   checkpoint_dir=str(checkpoint_dir), **kwargs)

    if killed is not None:
        shutil.copytree(killed, checkpoint_dir, dirs_exist_ok=True)
        return attempt
    with pytest.raises(KeyboardInterrupt):
        attempt(report=Report([StopAfter(1)]))
    return attempt


@pytest.fixture(scope="module")
def killed_after_epoch_1(tiny_model_dir, small_frame, tmp_path_factory):
    """The checkpoint of ``TWO_EPOCHS`` killed after epoch 1, for tests that resume it."""
    directory = tmp_path_factory.mktemp("killed")
    interrupted_run(tiny_model_dir, small_frame, directory, TWO_EPOCHS)
    return directory


def claim_written_on_cuda(state_file):
    """Rewrite a torch.save file so every tensor says it was saved on cuda:0, as a checkpoint
    written on a GPU does (loading it on a CPU-only machine needs map_location)."""
    import zipfile

    with zipfile.ZipFile(state_file) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    (pickle_name,) = [name for name in members if name.endswith("/data.pkl")]
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # pickle protocol 2
    assert cpu in members[pickle_name]
    members[pickle_name] = members[pickle_name].replace(cpu, cuda)
    with zipfile.ZipFile(state_file, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(state_file, weights_only=True)  # what resuming did before map_location


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tiny_model_dir, small_frame, tmp_path,
                                                        killed_after_epoch_1):
    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    claim_written_on_cuda(tmp_path / "state.pt")
    resumed = attempt()
    assert [result.epoch for result in resumed.epochs] == [1, 2]


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tiny_model_dir, small_frame,
                                                             tmp_path):
    config = plain(epochs=4, lr=3e-3, progress=False, patience=1)
    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, config)
    # as if epoch 1 had been the patience-th epoch without improvement: the run had stopped
    state_file = tmp_path / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["epochs_without_improvement"] = 1
    torch.save(state, state_file)
    resumed = attempt()
    assert resumed.stopped_early and [result.epoch for result in resumed.epochs] == [1]


def test_resuming_in_another_precision_says_so(tiny_model_dir, small_frame, tmp_path, caplog,
                                               killed_after_epoch_1):
    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    with caplog.at_level("WARNING", logger="medlm"):
        attempt(precision=Precision("bf16", "cpu"))
    assert any("resuming in bf16 on cpu; the epochs before were trained in fp32" in
               record.getMessage() for record in caplog.records)


def test_resuming_with_tf32_where_the_run_had_ieee_fp32_says_so(tiny_model, tmp_path, caplog):
    """TF32 changes the numbers as a precision does (--[no-]tf32 may change at a resume)."""
    from medlm.checkpoint import load_checkpoint
    from tests.test_distributed import write_checkpoint

    _, model = tiny_model
    write_checkpoint(model, tmp_path)  # trained in "fp32"
    with caplog.at_level("WARNING", logger="medlm"):
        load_checkpoint(tmp_path, model, precision=Precision("fp32", "cuda", tf32=True))
    assert any("resuming in fp32+tf32 on cuda; the epochs before were trained in fp32" in
               record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("interrupt_at", ["state", "rename"])
def test_a_kill_inside_the_checkpoint_write_leaves_one_whole_epoch(
        tiny_model_dir, small_frame, tmp_path, monkeypatch, interrupt_at, killed_after_epoch_1):
    """Ctrl-C while epoch 2's checkpoint is being written: what resumes is epoch 1 whole (its
    weights with its optimizer state and results), never epoch 2's weights with epoch 1's
    state."""
    from medlm import checkpoint
    from medlm.checkpoint import saved_epochs

    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    epoch_1 = torch.load(tmp_path / "state.pt", weights_only=True)["weights"]

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    if interrupt_at == "state":
        monkeypatch.setattr(checkpoint.torch, "save", kill)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", kill)
    with pytest.raises(KeyboardInterrupt):
        attempt()
    monkeypatch.undo()
    assert [epoch["epoch"] for epoch in saved_epochs(tmp_path)] == [1]
    weights = torch.load(tmp_path / "state.pt", weights_only=True)["weights"]
    assert all(torch.equal(weights[name], epoch_1[name]) for name in epoch_1)
    resumed = attempt()
    assert [result.epoch for result in resumed.epochs] == [1, 2]


def test_per_step_values_reach_the_loggers_every_n_optimizer_steps(tiny_model_dir,
                                                                     small_frame):
    """The curves MLflow draws between epochs: loss over the last N steps, learning rate,
    the gradient norm clip_grad_norm_ measured (thrown away before) and tokens/s, numbered
    by optimizer steps since the run began."""
    from medlm.modeling import load_tokenizer_and_model

    class StepRecorder(Logger):
        def __init__(self):
            self.steps = []

        def on_step(self, step, values):
            self.steps.append((step, values))

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    train, validation = loaders(tokenizer, small_frame)
    config = plain(epochs=2, lr=3e-3, grad_accum=2, log_every_steps=4, progress=False)
    recorder = StepRecorder()
    fit(model, (train, validation), config, FP32, report=Report([recorder]))
    last = 2 * math.ceil(len(train) / 2)
    assert last % 4, "the run must end between two points for this test"
    # every 4 steps across the epochs' end, and the steps after the last of those: their own
    # point at the last step (a run shorter than --log-every-steps has one)
    assert [step for step, _ in recorder.steps] == [*range(4, last + 1, 4), last]
    for _, values in recorder.steps:
        assert set(values) == {"training_loss", "learning_rate", "grad_norm", "tokens_per_sec"}
        assert values["learning_rate"] == 3e-3 and values["grad_norm"] > 0
        assert math.isfinite(values["training_loss"]) and values["tokens_per_sec"] > 0
    assert recorder.steps[-1][1]["training_loss"] < recorder.steps[0][1]["training_loss"]


def test_every_checkpoint_file_is_on_disk_before_a_name_points_to_it(
        tiny_model_dir, small_frame, tmp_path, monkeypatch, killed_after_epoch_1):
    """Power loss, unlike a kill, drops what the OS had not written yet: a rename that reached
    the disk before the data it names leaves `state.pt` empty. The file must be flushed before
    the rename that names it, and the rename before the checkpoint counts as written."""
    import os

    from medlm import checkpoint

    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    events, fsync, replace = [], checkpoint._fsync, os.replace
    monkeypatch.setattr(checkpoint, "_fsync",
                        lambda path: events.append(("fsync", Path(path).name)) or fsync(path))
    monkeypatch.setattr(checkpoint.os, "replace", lambda source, target: events.append(
        ("replace", Path(source).name, Path(target).name)) or replace(source, target))
    attempt()
    partial = f"state.pt.{os.getpid()}.partial"
    rename = events.index(("replace", partial, "state.pt"))
    assert events[rename - 1:rename + 2] == [("fsync", partial), events[rename],
                                             ("fsync", tmp_path.name)]


def test_a_checkpoint_write_cut_short_by_a_kill_leaves_no_file_behind(
        tiny_model_dir, small_frame, tmp_path, killed_after_epoch_1):
    """A SIGKILL mid-write leaves a whole-size ``state.pt.<pid>.partial`` that the resumed
    process (another pid) must remove, or each kill costs a checkpoint's worth of disk."""
    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    (tmp_path / "state.pt.999999.partial").write_bytes(b"\0" * 1024)
    attempt()
    assert not list(tmp_path.glob("*.partial"))


def test_an_fp32_checkpoint_resumes_with_an_enabled_grad_scaler(tiny_model_dir, small_frame,
                                                                tmp_path, monkeypatch,
                                                                killed_after_epoch_1):
    """An fp32/bf16 run saves a disabled GradScaler's empty state; resumed where fp16 and its
    scaler are chosen (a T4 or V100), loading that state must not fail."""
    attempt = interrupted_run(tiny_model_dir, small_frame, tmp_path, TWO_EPOCHS,
                              killed=killed_after_epoch_1)
    monkeypatch.setattr(Precision, "needs_grad_scaler", property(lambda self: True))
    resumed = attempt()  # GradScaler("cpu") enabled: as on a GPU with fp16
    assert [result.epoch for result in resumed.epochs] == [1, 2]


def test_a_directory_without_a_checkpoint_is_refused_in_one_line(tmp_path):
    from medlm.checkpoint import check_world_size
    from medlm.errors import MedLMError

    with pytest.raises(MedLMError, match="no checkpoint in"):
        check_world_size(tmp_path, 1)


def test_a_kill_while_an_epoch_is_scored_resumes_from_the_epoch_before(
        tiny_model_dir, small_frame, tmp_path, monkeypatch):
    """A kill while an epoch is scored (before its checkpoint is written) leaves the previous
    epoch whole, and the resumed run ends with the uninterrupted run's losses and best weights."""
    from medlm.checkpoint import saved_epochs
    from medlm.modeling import load_tokenizer_and_model

    config = plain(epochs=2, lr=3e-3, progress=False, select_by="symptom_f1")

    def run(directory, scores, kill_at=None, resume=False):
        calls = []

        def scorer(model):
            calls.append(1)
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            return {"symptom_f1": scores[len(calls) - 1]}

        tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
        train, validation = loaders(tokenizer, small_frame)
        result = fit(model, (train, validation), config, FP32,
                     checkpoint_dir=str(directory), report=Report([Scoring(scorer)]))
        return result, model

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", [0.5], kill_at=2)
    assert [epoch["epoch"] for epoch in saved_epochs(tmp_path / "run")] == [1]
    resumed, resumed_model = run(tmp_path / "run", [0.2], resume=True)
    uninterrupted, model = run(tmp_path / "whole", [0.5, 0.2])
    assert [r.training_loss for r in resumed.epochs] == [
        r.training_loss for r in uninterrupted.epochs]
    assert resumed.best.epoch == uninterrupted.best.epoch == 1
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in resumed_model.named_parameters())
    best = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["best_weights"]
    assert all(torch.equal(best[n], p) for n, p in model.named_parameters())


def test_neftune_noise_reaches_training_forwards_only_and_goes_with_the_context(tiny_model):
    from medlm.train import noisy_embeddings

    tokenizer, model = tiny_model
    ids = torch.tensor([tokenizer.encode("Asthma | wheezing, cough")])
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids)
    with noisy_embeddings(model, 5.0):
        model.train()
        noisy = embeddings(ids)
        width = clean.shape[1] * clean.shape[2]
        difference = (noisy - clean).abs()
        assert difference.max() > 0 and difference.max() <= 5.0 / math.sqrt(width) + 1e-6
        model.eval()
        assert torch.equal(embeddings(ids), clean)  # validation, scoring, samples: no noise
    model.train()
    assert torch.equal(embeddings(ids), clean)  # the hook is gone after training
    with noisy_embeddings(model, 0.0):
        assert torch.equal(embeddings(ids), clean)


def test_under_torchrun_a_step_copies_no_token_count_from_the_host(tiny_model_dir, small_frame,
                                                                   monkeypatch):
    """Issue 22 item 13: each optimizer step under torchrun made its token count a device
    tensor with torch.tensor(count, device=...): on CUDA a copy from pageable host memory that
    waits for the stream, every step. A one-process group stands in (the all-reduce is the
    identity): the step is the plain step, and no host value is copied to the device."""
    import copy

    from medlm import distributed
    from medlm.modeling import load_tokenizer_and_model

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    window = one_window(tokenizer, small_frame)
    reference = copy.deepcopy(model)
    step_with(reference, window, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce", lambda tensor, op="sum": tensor)
    copies, real_tensor = [], torch.tensor

    def recording_tensor(*args, **kwargs):  # MedLM's calls (the optimizer makes its own)
        if kwargs.get("device") is not None and sys._getframe(1).f_globals["__name__"] in (
                "medlm.train", "medlm.distributed"):
            copies.append(kwargs["device"])
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    step_with(model, window, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    assert copies == []
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_under_torchrun_only_the_main_process_keeps_and_restores_the_best_weights(
        tiny_model, small_frame, monkeypatch):
    """Issue 22 item 14: every process kept a host copy of the best epoch's weights, though
    only the main one logs the model. Scripted validation losses make epoch 1 the best of two:
    the main process ends with epoch 1's weights, another process keeps epoch 2's (no copy)."""
    import copy

    import medlm.train
    from medlm import distributed

    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    config = plain(epochs=2, lr=3e-3, progress=False)

    def final_and_epoch_weights(rank):
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        trained, seen, losses = copy.deepcopy(model), [], iter([1.0, 2.0])

        def scripted_validation(model, *args):
            seen.append(model.lm_head.weight.detach().clone())
            return next(losses)

        monkeypatch.setattr(medlm.train, "evaluate", scripted_validation)
        result = fit(trained, (train, validation), config, FP32)
        assert result.best.epoch == 1
        return trained.lm_head.weight.detach(), seen

    final, (first, second) = final_and_epoch_weights(0)
    assert torch.equal(final, first) and not torch.equal(final, second)
    final, (first, second) = final_and_epoch_weights(1)
    assert torch.equal(final, second) and not torch.equal(final, first)


def test_per_step_throughput_counts_the_wait_for_the_device(tiny_model, small_frame,
                                                              monkeypatch):
    """Issue 38: on a GPU the host waits for the queued steps at the loss's ``.item()``; a timer
    stopped before that read logged 19,879 tokens/s for a true 3,329. Here ``.item()`` waits
    1 s (the GPU's work): each point's tokens / tokens_per_sec must count that second."""
    import medlm.train

    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    item, step = torch.Tensor.item, medlm.train.train_step
    window_tokens, rates = [], []

    def recording_step(model, window, *args):
        window_tokens.append(sum(int(batch["attention_mask"].sum()) for batch in window))
        return step(model, window, *args)

    class StepRecorder(Logger):
        def on_step(self, step, values):
            rates.append(values["tokens_per_sec"])

    monkeypatch.setattr(medlm.train, "train_step", recording_step)
    monkeypatch.setattr(torch.Tensor, "item", lambda tensor: time.sleep(1.0) or item(tensor))
    result = fit(model, (train, validation), plain(epochs=1, log_every_steps=1, progress=False),
                 FP32, report=Report([StepRecorder()]))
    assert len(rates) == len(window_tokens) == len(train)
    assert min(tokens / rate for tokens, rate in zip(window_tokens, rates, strict=True)) >= 1.0
    epoch = result.epochs[0]  # every point's wait and the epoch's own read of its loss
    assert sum(window_tokens) / epoch.train_tokens_per_sec >= len(train) + 1


def test_fp16_reads_the_loss_scale_from_the_device_once_a_step(tiny_model, small_frame,
                                                                monkeypatch):
    """Issue 38: GradScaler.get_scale() before and after update() waited for the GPU twice per
    step ("get_scale incurs a CPU-GPU sync"); once tells a skipped step as well."""
    from medlm.train import train_step

    tokenizer, model = tiny_model
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # enabled, as fp16 on a GPU
    syncs = []
    get_scale = scaler.get_scale
    monkeypatch.setattr(scaler, "get_scale",
                        lambda: syncs.append(scaler._scale is not None) or get_scale())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(optimizer, scheduler, scaler, None, FitResult())
    for batch in itertools.islice(loaders(tokenizer, small_frame)[0], 3):
        train_step(model, [batch], state, FP32, plain())
    assert syncs.count(True) == 3  # the scale on the device read once a step
    assert scheduler.last_epoch == 3  # and no step taken for skipped


def test_improving_epochs_reuse_one_host_copy_and_the_last_needs_none(tiny_model, small_frame,
                                                                       monkeypatch, tmp_path):
    """Issue 38: every improving epoch of full fine-tuning copied the whole model to new host
    memory. One set of host buffers is made; an improving last epoch's weights are the
    model's own, not copied at all; an earlier best is still what the run ends with."""
    import medlm.train

    tokenizer, model = tiny_model
    train, validation = loaders(tokenizer, small_frame)
    kept = []

    def recording_save(directory, model, state, best_weights, rng_states=None):
        kept.append({name: (weight.data_ptr(), weight.clone())
                     for name, weight in (best_weights or {}).items()})

    def final_weights(losses):
        kept.clear()
        weights, scripted = [], iter(losses)

        def scripted_validation(model, *args):
            weights.append(model.lm_head.weight.detach().clone())
            return next(scripted)

        monkeypatch.setattr(medlm.train, "evaluate", scripted_validation)
        monkeypatch.setattr(medlm.train.checkpoint, "save_checkpoint", recording_save)
        trained = copy.deepcopy(model)
        fit(trained, (train, validation), plain(epochs=3, lr=3e-3, progress=False), FP32,
            checkpoint_dir=tmp_path)
        return trained.lm_head.weight.detach(), weights

    final, (first, second, third) = final_weights([3.0, 2.0, 1.0])  # each epoch improves
    assert torch.equal(final, third)
    pointers = [{name: pointer for name, (pointer, _) in epoch.items()} for epoch in kept]
    assert pointers[0] == pointers[1] == pointers[2]  # one set of buffers, reused
    # epoch 3's weights not copied: the buffers still hold epoch 2's (lm_head's, tied)
    assert torch.equal(kept[2]["transformer.wte.weight"][1], second)
    final, (first, second, third) = final_weights([2.0, 1.0, 3.0])
    assert torch.equal(final, second)


def test_a_resumed_optimizer_runs_this_devices_fused_or_foreach_step(tiny_model):
    """Issue 38: a state dict saved by a fused AdamW (CUDA, CPU) kept fused=True when loaded
    into the multi-tensor AdamW chosen on another device (MPS)."""
    _, model = tiny_model
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model.lm_head.weight.sum().backward()
    fused.step()
    saved = TrainState(fused, torch.optim.lr_scheduler.LambdaLR(fused, lambda step: 1.0),
                       torch.amp.GradScaler("cpu", enabled=False), None, FitResult())
    foreach = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    resumed = TrainState(foreach, torch.optim.lr_scheduler.LambdaLR(foreach, lambda step: 1.0),
                         torch.amp.GradScaler("cpu", enabled=False), None, FitResult())
    resumed.load_state_dict({**saved.state_dict(), "best_weights": None})
    model.zero_grad(set_to_none=True)
    group = foreach.param_groups[0]
    assert (group["fused"], group["foreach"]) == (None, True)
    assert foreach.state[model.lm_head.weight]["exp_avg"].abs().sum() > 0  # the state came
