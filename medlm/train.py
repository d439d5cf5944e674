"""The training loop: plain PyTorch, one screen. It reports through ``Logger``s, never to MLflow."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medlm import distributed, stop
from medlm.checkpoint import (
    frozen_sha256,
    has_checkpoint,
    load_checkpoint,
    load_trained_weights,
    rng_state,
    save_checkpoint,
    trained_weights,
)
from medlm.config import TrainConfig
from medlm.data import IGNORE_INDEX
from medlm.errors import MedLMError
from medlm.modeling import Precision, casts_cached, peak_flops
from medlm.timing import Stopwatch

log = logging.getLogger(__name__)

LIVE_LOSS_EVERY = 10  # optimizer steps between progress-bar loss updates (each one syncs)


@dataclass
class EpochResult:
    epoch: int
    training_loss: float  # mean per real (non-padding) token
    validation_loss: float  # mean per real token
    validation_perplexity: float
    epoch_duration_sec: float  # training + validation, not sample generation
    train_samples_per_sec: float
    train_tokens_per_sec: float  # real tokens only
    learning_rate: float  # at the end of the epoch
    model_flops_utilization: float = 0.0  # training FLOP/s over the device's peak (modeling)
    is_best: bool = False
    scores: dict[str, float] = field(default_factory=dict)  # from fit's scorer, e.g. symptom_f1

    def selection_value(self, select_by: str) -> float:
        """The figure ``select_by`` names, oriented so that lower is better."""
        if select_by == "validation_loss":
            return self.validation_loss
        return -self.scores.get(select_by, -math.inf)


@dataclass
class FitResult:
    epochs: list[EpochResult] = field(default_factory=list)
    stopped_early: bool = False
    select_by: str = "validation_loss"

    @property
    def best(self) -> EpochResult:
        """The first epoch with the best ``select_by`` value (a tie keeps the earlier one)."""
        return min(self.epochs, key=lambda result: result.selection_value(self.select_by))


class Logger:
    """Everything the loop reports, and when: the whole logging interface (torchtune's
    ``MetricLoggerInterface``, in small). Every method does nothing here, so ``Logger()`` is the
    logger of a run without tracking, and the base of those with it (``medlm.tracking``,
    ``medlm.report``), which override what they log. Under torchrun only rank 0's are called."""

    def on_step(self, step: int, values: dict[str, float]) -> None:
        """Every ``config.log_every_steps`` optimizer steps (``step`` counts from the run's
        start): ``values`` holds training_loss over those steps, learning_rate, tokens_per_sec
        and, when clipping is on, grad_norm before clipping."""

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """After an epoch's validation, before the best epoch is chosen and the checkpoint
        written: figures that join the epoch's (say, symptom F1 of generated answers)."""
        return {}

    def on_epoch_end(self, model: torch.nn.Module, result: EpochResult) -> None:
        """After each epoch's validation, scoring and checkpoint; at a resume, once more for
        the checkpointed epoch (a kill may have cut its logging short): log only what is
        missing."""


class NonFiniteLossError(MedLMError):
    pass


class RunStopped(Exception):
    """Raised by a logger to end the run early on purpose (a search pruning a trial that is
    clearly worse): the run is marked KILLED and the caller decides what follows."""


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy over real tokens (labels of -100 are skipped), with
    ``label_smoothing`` of the target's probability spread over the vocabulary."""
    logits, labels = _next_token(model, batch)
    return F.cross_entropy(
        logits.flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def _next_token(model: torch.nn.Module,
                batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of each position but the last (in fp32) and the label each predicts: the
    next token's."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float(), batch["labels"][:, 1:]


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted (every real token but each row's first), read on the host."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``; asynchronously only from pinned memory to CUDA, the one case
    torch documents as safe (from pageable memory on MPS it can read freed memory: PyTorch
    issues 139550, 189690)."""
    return {key: value.to(device, non_blocking=device.type == "cuda" and value.is_pinned())
            for key, value in batch.items()}


def _windows(loader: DataLoader, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Groups of ``size`` batches: one optimizer step each (gradient accumulation)."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _bar(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, precision: Precision,
             progress: bool = False) -> float:
    """Mean loss per real token over ``loader`` (over every process's share of it, under
    torchrun: pass the plain model, not its DistributedDataParallel wrapper).

    One autocast region over every batch, under no_grad (not inference_mode, where autocast
    keeps no cast cache): each weight is cast to the low precision once, not once per batch."""
    device = precision.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    with (_bar(len(loader), "validation", progress) as bar, precision.autocast(),
          casts_cached(model, device)):
        for batch in loader:
            tokens += count_loss_tokens(batch)
            loss_sum += token_loss_sum(model, _to(batch, device))
            bar.update()
    model.train(was_training)
    if distributed.is_enabled():
        loss_sum_all, tokens_all = distributed.all_reduce_numbers([loss_sum.item(), tokens],
                                                                  device)
        return loss_sum_all / max(tokens_all, 1)
    return loss_sum.item() / max(tokens, 1)


@torch.no_grad()
def row_losses(model: torch.nn.Module, loader: DataLoader,
               precision: Precision) -> np.ndarray:
    """Each row's summed loss and predicted-token count, in dataset order (one row each of
    ``loader.dataset``; ``loader.batch_sampler`` a list of index lists, as ``make_loader``
    builds for validation in one process): what a paired comparison of two models resamples.
    Their sums' ratio is ``evaluate``'s mean."""
    device = precision.device
    was_training = model.training
    model.eval()
    rows = np.zeros((len(loader.dataset), 2))
    with precision.autocast(), casts_cached(model, device):
        for indices, batch in zip(loader.batch_sampler, loader, strict=True):
            logits, labels = _next_token(model, _to(batch, device))
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                     reduction="none")
            rows[indices, 0] = losses.sum(dim=1).cpu().numpy()
            rows[indices, 1] = (labels != IGNORE_INDEX).sum(dim=1).cpu().numpy()
    model.train(was_training)
    return rows


@contextlib.contextmanager
def noisy_embeddings(model: torch.nn.Module, alpha: float) -> Iterator[None]:
    """NEFTune (Jain et al. 2023, as TRL's ``neftune_noise_alpha``): while the model trains,
    uniform noise of scale ``alpha / sqrt(tokens x width)`` on the input embeddings; validation,
    scoring and samples (eval mode) see none. ``alpha`` 0: nothing changes."""
    if not alpha:
        yield
        return

    def add_noise(module, inputs, output):
        if module.training:
            scale = alpha / math.sqrt(output.size(1) * output.size(2))
            output = output + torch.zeros_like(output).uniform_(-scale, scale)
        return output

    handle = model.get_input_embeddings().register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW: the fused kernel on CUDA and CPU (on this project's CPU, one step over distilgpt2's
    82M parameters takes 0.04 s fused against 0.32 s foreach), multi-tensor elsewhere.

    Weight decay applies to matrices only, not to biases and norm gains (as nanoGPT and the
    Hugging Face examples do).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused, foreach=None if fused else True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.scheduler, config.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)


def train_step(model: torch.nn.Module, window: list[dict[str, torch.Tensor]],
               state: TrainState, precision: Precision,
               config: TrainConfig) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One optimizer step over a window of batches (gradient accumulation), with ``state``'s
    optimizer, scheduler and GradScaler and ``config``'s clipping and label smoothing.

    The loss is normalised by the window's real-token count, so accumulating k batches equals
    one batch k times as large. Under torchrun ``model`` is the DistributedDataParallel wrapper:
    the count is that of all processes' windows and gradients are averaged once per window, so
    the step equals one process's step over all their rows. Returns this process's summed token
    loss as a device tensor (not read here: reading it would make the host wait for the device),
    its token count, and the gradient norm before clipping (a device tensor; None when clipping
    is off).
    """
    device, scaler = precision.device, state.scaler
    window_tokens = max(sum(count_loss_tokens(batch) for batch in window), 1)
    divisor: int | torch.Tensor = window_tokens
    if distributed.is_enabled():  # DDP averages gradients: divide by the mean count per process
        # torch.full fills on the device from the value given at launch; torch.tensor(value,
        # device=cuda) would copy from pageable host memory and wait for the stream each step
        all_tokens = torch.full((), float(window_tokens), device=device)
        divisor = distributed.all_reduce(all_tokens) / distributed.world_size()
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(window):
        accumulating = index < len(window) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if accumulating else contextlib.nullcontext():
            with precision.autocast():
                batch_loss_sum = token_loss_sum(model, _to(batch, device), config.label_smoothing)
            scaler.scale(batch_loss_sum / divisor).backward()
        loss_sum += batch_loss_sum.detach()
    grad_norm = None
    if config.max_grad_norm > 0:
        scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None  # fp16 only: a host sync
    scaler.step(state.optimizer)  # skipped when the scaled gradients overflowed
    scaler.update()
    if scale is None or scaler.get_scale() >= scale:  # the schedule follows real steps only
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum, window_tokens, grad_norm


@dataclass
class TrainState:
    """What a checkpoint saves beside the trained weights, and a resume restores: the
    optimizer, schedule and GradScaler, the training batches' shuffle, every epoch's figures,
    the best epoch's weights and the early-stopping count, and the per-step point in progress
    (so a resumed run's next ``step/*`` point covers the same steps as an uninterrupted run's)."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator | None  # the training batches' shuffle
    result: FitResult
    best_weights: dict[str, torch.Tensor] | None = None  # the main process's host copy
    epochs_without_improvement: int = 0
    step_interval: dict = field(default_factory=dict)  # loss_sum, tokens, real_tokens, seconds
    precision: str = "fp32"  # the effective one, said at a resume where it differs
    frozen_sha256: str | None = None  # LoRA's base (checkpoint.frozen_sha256): not saved

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "generator": None if self.generator is None else self.generator.get_state(),
                "epochs": [asdict(epoch) for epoch in self.result.epochs],
                "best_is_current": bool(self.result.epochs and self.result.epochs[-1].is_best),
                "epochs_without_improvement": self.epochs_without_improvement,
                "step_interval": self.step_interval, "precision": self.precision,
                "frozen_sha256": self.frozen_sha256}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler (fp32/bf16) saved {}: nothing to restore
            self.scaler.load_state_dict(state["scaler"])
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self.result.epochs = [EpochResult(**values) for values in state["epochs"]]
        self.best_weights = state["best_weights"]  # None on the other processes
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.step_interval = state["step_interval"]


class Report:
    """Where the loop reports: its loggers (the main process's alone, under torchrun) and the
    stopwatch that splits the run's time into phases."""

    def __init__(self, loggers: Sequence[Logger] = (), stopwatch: Stopwatch | None = None):
        self.loggers = list(loggers) if distributed.is_main() else []
        self.stopwatch = stopwatch or Stopwatch()

    def phase(self, name: str):
        return self.stopwatch.phase(name)

    def on_step(self, step: int, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.on_step(step, values)

    def scores(self, model: torch.nn.Module) -> dict[str, float]:
        """The loggers' scores of ``model`` (the main process's, on every process)."""
        scores: dict[str, float] = {}
        with self.phase("scoring"):
            for logger in self.loggers:
                scores.update(logger.score(model))
            return distributed.broadcast_object(
                {name: float(value) for name, value in scores.items()}
                if distributed.is_main() else None)

    def on_epoch_end(self, model: torch.nn.Module, result: EpochResult) -> None:
        with self.phase("logging"):
            for logger in self.loggers:
                logger.on_epoch_end(model, result)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """The epoch's batches, and its symptom orders (``--shuffle-symptoms``)."""
    for epoch_aware in (loader.batch_sampler, loader.dataset):
        if hasattr(epoch_aware, "set_epoch"):
            epoch_aware.set_epoch(epoch - 1)


def _wrapped(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What trains: the model, or under torchrun its DistributedDataParallel wrapper."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def flops_per_token(model: torch.nn.Module) -> int:
    """Training FLOPs per token (Kaplan et al.'s 6N, as nanoGPT's MFU): 2N forward, 2N for the
    activations' gradients, and 2 per trained weight for the weights' (so LoRA's frozen base
    costs 4N). Attention's own FLOPs are left out: small at these lengths."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters()
                  if parameter.requires_grad)
    return 4 * total + 2 * trained


def fit(model: torch.nn.Module, loaders: tuple[DataLoader, DataLoader], config: TrainConfig,
        precision: Precision, checkpoint_dir: str | os.PathLike | None = None,
        report: Report | None = None) -> FitResult:
    """Train for ``config.epochs`` (or until early stopping) on ``loaders`` (training,
    validation); leave the best epoch's weights in ``model`` and return every epoch's figures.
    Under torchrun the main process alone, which logs the model, ends with the best weights;
    the others keep the last epoch's.

    "Best" is by ``config.select_by``: the lowest validation loss, or the highest score of that
    name from the loggers' ``score`` (after each epoch's validation, on the main process);
    early stopping (``config.patience``) counts epochs without a better value of the same.

    With ``checkpoint_dir``, the training state is saved there after every epoch, before the
    loggers run (the weights training changes, not a frozen LoRA base); where it holds a
    checkpoint already, training continues from it and ends with the losses of an
    uninterrupted run.

    Under torchrun (``medlm.distributed``) each process passes loaders built with its own
    ``shard``: the model is wrapped in DistributedDataParallel, losses and throughput are summed
    over all processes, and rank 0 alone shows progress, checkpoints and calls the loggers.
    """
    train_loader, validation_loader = loaders
    report = report or Report()
    device, main_process = precision.device, distributed.is_main()
    progress = config.progress and main_process
    torch.manual_seed(config.seed + distributed.rank())  # each process its own dropout masks
    model.to(device)
    optimizer = make_optimizer(model, config, device)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    state = TrainState(optimizer, make_scheduler(optimizer, config,
                                                 steps_per_epoch * config.epochs),
                       precision.grad_scaler(), getattr(train_loader, "generator", None),
                       FitResult(select_by=config.select_by), precision=precision.name,
                       frozen_sha256=frozen_sha256(model) if checkpoint_dir else None)
    result = state.result
    # the main process decides, so that no rank resumes alone (a node-local directory)
    resuming = distributed.broadcast_object(
        bool(checkpoint_dir) and has_checkpoint(checkpoint_dir) if main_process else None)
    if resuming:
        state.load_state_dict(load_checkpoint(checkpoint_dir, model, state.frozen_sha256,
                                              precision))
        model.to(device)
        result.stopped_early = bool(config.patience) and (
            state.epochs_without_improvement >= config.patience)
        # the loggers are idempotent: they log what a kill cut short of the checkpointed epoch
        report.on_epoch_end(model, result.epochs[-1])
    trained, flops = _wrapped(model, device), flops_per_token(model)
    # the per-step point in progress: loss, tokens and training seconds since the last one
    interval = state.step_interval or {"loss_sum": 0.0, "tokens": 0, "real_tokens": 0,
                                       "seconds": 0.0}
    interval_loss = torch.zeros((), device=device) + interval["loss_sum"]
    last_point = None  # (step, learning rate, gradient norm) of the latest step

    def log_point(since: float | None) -> float:
        """The ``step/*`` point of the steps since the last one, at ``last_point``: the loss and
        gradient norm read first (the host waits for the device there), then the clock, which
        is returned; ``since``: when the interval's current stretch of training began."""
        step, learning_rate, grad_norm = last_point
        values = {"training_loss": interval_loss.item() / interval["tokens"],
                  "learning_rate": learning_rate}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        now = time.perf_counter()
        seconds = interval["seconds"] + (now - since if since is not None else 0.0)
        report.on_step(step, {**values,
                              "tokens_per_sec": interval["real_tokens"] / max(seconds, 1e-9)})
        interval_loss.zero_()
        interval.update(tokens=0, real_tokens=0, seconds=0.0)
        return now

    first_epoch = config.epochs + 1 if result.stopped_early else len(result.epochs) + 1
    for epoch in range(first_epoch, config.epochs + 1):
        stop.raise_if_asked()
        _set_epoch(train_loader, epoch)
        started = clock = time.perf_counter()
        trained.train()
        epoch_loss = torch.zeros((), device=device)
        tokens = real_tokens = samples = 0
        with report.phase("training"), _bar(len(train_loader), f"epoch {epoch}/{config.epochs}",
                                            progress) as bar:
            for step, window in enumerate(_windows(train_loader, config.grad_accum),
                                          (epoch - 1) * steps_per_epoch + 1):
                loss_sum, window_tokens, grad_norm = train_step(trained, window, state,
                                                                precision, config)
                window_real_tokens = sum(int(batch["attention_mask"].sum()) for batch in window)
                epoch_loss += loss_sum
                tokens += window_tokens
                real_tokens += window_real_tokens
                samples += sum(len(batch["input_ids"]) for batch in window)
                bar.update(len(window))
                if step % LIVE_LOSS_EVERY == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{epoch_loss.item() / tokens:.4f}")
                if report.loggers and config.log_every_steps:
                    interval_loss += loss_sum
                    interval["tokens"] += window_tokens
                    interval["real_tokens"] += window_real_tokens
                    last_point = (step, state.scheduler.get_last_lr()[0], grad_norm)
                    if step % config.log_every_steps == 0:
                        clock, last_point = log_point(clock), None
                stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop)
            epoch_loss_sum = epoch_loss.item()  # the epoch's one read of the loss (a host sync)
            training_seconds = time.perf_counter() - started
            if report.loggers and config.log_every_steps:
                interval["seconds"] += time.perf_counter() - clock
        if distributed.world_size() > 1:
            epoch_loss_sum, tokens, samples, real_tokens = distributed.all_reduce_numbers(
                [epoch_loss_sum, tokens, samples, real_tokens], device)
            (training_seconds,) = distributed.all_reduce_numbers([training_seconds], device,
                                                                 "max")
        training_loss = epoch_loss_sum / max(tokens, 1)
        if not math.isfinite(training_loss):
            raise NonFiniteLossError(
                f"training loss became {training_loss} in epoch {epoch}: expected a finite loss "
                f"(try a lower --lr than {config.lr:g}, --precision fp32, or --max-grad-norm 1)")
        with report.phase("validation"):
            validation_loss = evaluate(model, validation_loader, precision, progress)
        tokens_per_sec = real_tokens / training_seconds
        epoch_result = EpochResult(
            epoch=epoch, training_loss=training_loss, validation_loss=validation_loss,
            validation_perplexity=math.exp(min(validation_loss, 700.0)),
            epoch_duration_sec=time.perf_counter() - started,
            train_samples_per_sec=samples / training_seconds,
            train_tokens_per_sec=tokens_per_sec,
            learning_rate=state.scheduler.get_last_lr()[0],
            model_flops_utilization=tokens_per_sec * flops / (
                peak_flops(precision) * distributed.world_size()),
            scores=report.scores(model))
        if config.select_by != "validation_loss" and config.select_by not in epoch_result.scores:
            raise ValueError(f"select_by={config.select_by!r} needs a scorer: a logger whose "
                             "score() returns it")
        # keep the epoch's weights if it is the best (on the main process, which logs the model)
        value = epoch_result.selection_value(config.select_by)
        if not result.epochs or value < result.best.selection_value(config.select_by):
            epoch_result.is_best = True
            state.epochs_without_improvement = 0
            if main_process:
                state.best_weights = {name: weight.to("cpu", copy=True)
                                      for name, weight in trained_weights(model).items()}
        else:
            state.epochs_without_improvement += 1
        result.epochs.append(epoch_result)
        if checkpoint_dir:  # before the loggers: a kill while they log loses no training
            with report.phase("checkpoint"):
                state.step_interval = {**interval, "loss_sum": interval_loss.item()}
                rng_states = distributed.gather_objects(rng_state())
                if main_process:
                    save_checkpoint(checkpoint_dir, model, state.state_dict(), state.best_weights,
                                    rng_states)
        report.on_epoch_end(model, epoch_result)
        if config.patience and state.epochs_without_improvement >= config.patience:
            result.stopped_early = True
            break
    if last_point is not None and interval["tokens"]:  # the steps since the last point
        log_point(None)
    if state.best_weights is not None:
        load_trained_weights(model, state.best_weights)
    return result
