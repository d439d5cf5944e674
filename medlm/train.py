"""The training loop: plain PyTorch, one screen. It reports through ``Logger``s, never to MLflow."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medlm import distributed, stop
from medlm.checkpoint import (
    frozen_sha256,
    load_checkpoint,
    load_trained_weights,
    logged_epoch,
    mark_logged,
    rng_state,
    save_checkpoint,
    trained_weights,
)
from medlm.config import TrainConfig
from medlm.data import IGNORE_INDEX
from medlm.errors import MedLMError
from medlm.modeling import Precision, casts_cached
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

    def on_epoch_end(self, model: torch.nn.Module, result: EpochResult) -> None:
        """After each epoch's validation, scoring and checkpoint."""

    def on_epoch_replay(self, model: torch.nn.Module, result: EpochResult) -> None:
        """At a resume, the last epoch again when a kill cut its ``on_epoch_end`` short (the
        checkpoint came first): a logger skips what it had already logged."""
        self.on_epoch_end(model, result)


# Scores the model after an epoch's validation loss (say, symptom F1 of generated answers);
# its figures join the EpochResult before the best epoch is chosen and the checkpoint written.
Scorer = Callable[[torch.nn.Module], dict[str, float]]


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
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             precision: Precision, progress: bool = False) -> float:
    """Mean loss per real token over ``loader`` (over every process's share of it, under
    torchrun: pass the plain model, not its DistributedDataParallel wrapper).

    One autocast region over every batch, under no_grad (not inference_mode, where autocast
    keeps no cast cache): each weight is cast to the low precision once, not once per batch."""
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
def row_losses(model: torch.nn.Module, loader: DataLoader, device: torch.device,
               precision: Precision) -> np.ndarray:
    """Each row's summed loss and predicted-token count, in dataset order (one row each of
    ``loader.dataset``; ``loader.batch_sampler`` a list of index lists, as ``make_loader``
    builds for validation in one process): what a paired comparison of two models resamples.
    Their sums' ratio is ``evaluate``'s mean."""
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
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, scheduler,
               precision: Precision, device: torch.device,
               max_grad_norm: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One optimizer step over a window of batches (gradient accumulation).

    The loss is normalised by the window's real-token count, so accumulating k batches equals
    one batch k times as large. Under torchrun ``model`` is the DistributedDataParallel wrapper:
    the count is that of all processes' windows and gradients are averaged once per window, so
    the step equals one process's step over all their rows. Returns this process's summed token
    loss as a device tensor (not read here: reading it would make the host wait for the device),
    its token count, and the gradient norm before clipping (a device tensor; None when clipping
    is off).
    """
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
                batch_loss_sum = token_loss_sum(model, _to(batch, device), label_smoothing)
            scaler.scale(batch_loss_sum / divisor).backward()
        loss_sum += batch_loss_sum.detach()
    grad_norm = None
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None  # fp16 only: a host sync
    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
    scaler.update()
    if scale is None or scaler.get_scale() >= scale:  # the schedule follows real steps only
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, window_tokens, grad_norm


class StepCurve:
    """Per-step points (``step/*`` metrics) every ``every`` optimizer steps: the training loss,
    learning rate, gradient norm and tokens/s of the steps since the previous point (across an
    epoch's end; the seconds count training only). ``flush`` gives the steps left at the end
    their own point. ``state()`` goes into the checkpoint, so a resumed run's next point covers
    the steps before the kill too."""

    def __init__(self, loggers: Sequence[Logger], every: int, device: torch.device,
                 saved: dict | None = None):
        self.loggers = list(loggers) if every else []
        self.every = every
        saved = saved or {}
        self.loss_sum = torch.zeros((), device=device) + saved.get("loss_sum", 0.0)
        self.tokens = saved.get("tokens", 0)
        self.real_tokens = saved.get("real_tokens", 0)
        self.seconds = saved.get("seconds", 0.0)
        self.mark = time.perf_counter()
        self.last: tuple[int, float, torch.Tensor | None] | None = None  # step, lr, grad norm

    def start_timer(self) -> None:
        self.mark = time.perf_counter()

    def stop_timer(self) -> None:
        self.seconds += time.perf_counter() - self.mark

    def add(self, step: int, loss_sum: torch.Tensor, tokens: int, real_tokens: int,
            learning_rate: float, grad_norm: torch.Tensor | None) -> None:
        if not self.loggers:
            return
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.real_tokens += real_tokens
        self.last = (step, learning_rate, grad_norm)
        if step % self.every == 0:
            self.stop_timer()
            self._point()
            self.start_timer()

    def flush(self) -> None:
        if self.loggers and self.tokens and self.last is not None:
            self._point()

    def _point(self) -> None:
        """One host read per point (rank 0's figures under torchrun); the tracker logs without
        waiting for MLflow."""
        step, learning_rate, grad_norm = self.last
        values = {"training_loss": self.loss_sum.item() / max(self.tokens, 1),
                  "learning_rate": learning_rate,
                  "tokens_per_sec": self.real_tokens / max(self.seconds, 1e-9)}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        for logger in self.loggers:
            logger.on_step(step, values)
        self.loss_sum.zero_()
        self.tokens = self.real_tokens = 0
        self.seconds = 0.0

    def state(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum.item(), "tokens": self.tokens,
                "real_tokens": self.real_tokens, "seconds": self.seconds}


@dataclass
class _EpochTotals:
    """One epoch's training figures, summed over every process under torchrun."""

    loss: float  # mean per predicted token
    seconds: float  # the slowest process's
    samples: int
    real_tokens: int

    def result(self, epoch: int, validation_loss: float, seconds: float,
               learning_rate: float) -> EpochResult:
        return EpochResult(
            epoch=epoch, training_loss=self.loss, validation_loss=validation_loss,
            validation_perplexity=math.exp(min(validation_loss, 700.0)),
            epoch_duration_sec=seconds, train_samples_per_sec=self.samples / self.seconds,
            train_tokens_per_sec=self.real_tokens / self.seconds, learning_rate=learning_rate)


def _scores(scorer: Scorer, model) -> dict[str, float]:
    """The main process's scores of ``model``, on every process."""
    scores = scorer(model) if distributed.is_main() else None
    return distributed.broadcast_object(
        None if scores is None else {name: float(v) for name, v in scores.items()})


@dataclass
class _Loop:
    """The state a checkpoint saves beside the weights, and a resume restores."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    result: FitResult
    steps_per_epoch: int
    generator: torch.Generator | None  # the training batches' shuffle
    frozen: str | None = None  # frozen_sha256 of a LoRA base, which the checkpoint lacks
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's trained weights
    epochs_without_improvement: int = 0
    step_interval: dict | None = None  # StepCurve's state at the checkpoint

    def restore(self, checkpoint_dir: str, model, device: torch.device,
                precision: Precision, patience: int) -> None:
        state = load_checkpoint(checkpoint_dir, model, distributed.rank(),
                                distributed.world_size())
        if state.get("frozen_sha256") not in (None, self.frozen):
            raise MedLMError(f"the checkpoint in {checkpoint_dir!r} was trained on other frozen "
                             "base weights than the model loaded now (its file or Hub "
                             "revision changed): expected the base the run started from")
        model.to(device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler (fp32/bf16) saved {}: nothing to restore
            self.scaler.load_state_dict(state["scaler"])
        self.result.epochs = [EpochResult(**values) for values in state["epochs"]]
        self.best_state = state["best_state"]  # None on the other processes
        self.epochs_without_improvement = state["epochs_without_improvement"]
        if self.generator is not None and "generator" in state["loader"]:
            self.generator.set_state(state["loader"]["generator"])
        self.step_interval = state.get("step_interval")
        if state.get("precision") not in (None, precision.name):
            log.warning("WARNING: resuming in %s on %s; the epochs before were trained in %s "
                        "(another machine): the losses from here on are not bit-for-bit "
                        "those of an uninterrupted run", precision.name, device.type,
                        state["precision"])
        if patience and self.epochs_without_improvement >= patience:
            self.result.stopped_early = True  # it had stopped early before it was interrupted

    def keep_if_best(self, epoch_result: EpochResult, model, select_by: str) -> None:
        """Mark the epoch best (and copy its weights to the host, on the main process, which
        alone logs the model) or count it as one more without improvement."""

        value = epoch_result.selection_value(select_by)
        result = self.result
        if not result.epochs or value < result.best.selection_value(select_by):
            epoch_result.is_best = True
            if distributed.is_main():
                self.best_state = {key: weight.to("cpu", copy=True)
                                   for key, weight in trained_weights(model).items()}
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        result.epochs.append(epoch_result)

    def save(self, checkpoint_dir: str, model, curve: StepCurve, precision: Precision) -> None:
        """The training state after this epoch, saved whole (every process's RNGs, gathered;
        written by the main process)."""
        rng_states = distributed.gather_objects(rng_state())
        if not distributed.is_main():
            return
        save_checkpoint(checkpoint_dir, model=model, optimizer=self.optimizer,
                        scheduler=self.scheduler, scaler=self.scaler, epochs=self.result.epochs,
                        best_state=self.best_state,
                        epochs_without_improvement=self.epochs_without_improvement,
                        loader_state={"generator": self.generator.get_state()}
                        if self.generator is not None else {},
                        rng_states=rng_states, precision=precision.name,
                        step_interval=curve.state(),
                        best_is_current=self.result.epochs[-1].is_best, frozen=self.frozen)


def _start_loop(model, train_loader: DataLoader, config: TrainConfig, device: torch.device,
                precision: Precision, checkpoint_dir: str | None, resume: bool,
                loggers: Sequence[Logger]) -> _Loop:
    """The loop's state: new, or with ``resume`` restored from ``checkpoint_dir`` (and the last
    epoch's logging replayed where a kill cut it short)."""
    optimizer = make_optimizer(model, config, device)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    fingerprint = checkpoint_dir and (distributed.is_main() or resume)
    loop = _Loop(optimizer, make_scheduler(optimizer, config, steps_per_epoch * config.epochs),
                 precision.grad_scaler(), FitResult(select_by=config.select_by), steps_per_epoch,
                 getattr(train_loader, "generator", None),
                 frozen_sha256(model) if fingerprint else None)
    if resume:
        loop.restore(checkpoint_dir, model, device, precision, config.patience)
        if distributed.is_main():
            _replay_unlogged_epoch(checkpoint_dir, model, loop, loggers)
    return loop


def _replay_unlogged_epoch(checkpoint_dir: str, model, loop: _Loop,
                           loggers: Sequence[Logger]) -> None:
    """Killed after the checkpoint, before the epoch's loggers finished: they log it now, from
    the checkpointed weights (skipping what is there)."""
    epochs = loop.result.epochs
    if epochs and logged_epoch(checkpoint_dir) < epochs[-1].epoch:
        for logger in loggers:
            logger.on_epoch_replay(model, epochs[-1])
        mark_logged(checkpoint_dir, epochs[-1].epoch)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """The epoch's batches, and its symptom orders (``--shuffle-symptoms``)."""
    for epoch_aware in (loader.batch_sampler, loader.dataset):
        if hasattr(epoch_aware, "set_epoch"):
            epoch_aware.set_epoch(epoch - 1)


def _train_epoch(trained, loader: DataLoader, loop: _Loop, config: TrainConfig, epoch: int,
                 precision: Precision, device: torch.device, curve: StepCurve,
                 progress: bool, stopwatch: Stopwatch) -> _EpochTotals:
    """One pass over ``loader``, an optimizer step per ``config.grad_accum`` batches (the
    stopwatch's ``training``: the steps alone)."""
    started = time.perf_counter()
    trained.train()
    loss_sum = torch.zeros((), device=device)
    tokens = real_tokens = samples = step = 0
    curve.start_timer()
    with stopwatch.phase("training"), _bar(len(loader), f"epoch {epoch}/{config.epochs}",
                                           progress) as bar:
        for window in _windows(loader, config.grad_accum):
            window_loss_sum, window_tokens, grad_norm = train_step(
                trained, window, loop.optimizer, loop.scaler, loop.scheduler, precision, device,
                config.max_grad_norm, config.label_smoothing)
            loss_sum += window_loss_sum
            tokens += window_tokens
            samples += sum(len(batch["input_ids"]) for batch in window)
            window_real_tokens = sum(int(batch["attention_mask"].sum()) for batch in window)
            real_tokens += window_real_tokens
            bar.update(len(window))
            step += 1
            if step % LIVE_LOSS_EVERY == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / tokens:.4f}")
            curve.add((epoch - 1) * loop.steps_per_epoch + step, window_loss_sum,
                      window_tokens, window_real_tokens, loop.scheduler.get_last_lr()[0],
                      grad_norm)
            stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop)
    curve.stop_timer()
    epoch_loss_sum = loss_sum.item()  # the epoch's one read of the loss (a host sync)
    totals = _EpochTotals(epoch_loss_sum / max(tokens, 1), time.perf_counter() - started,
                          samples, real_tokens)
    if distributed.world_size() > 1:
        loss_sum_all, tokens, totals.samples, totals.real_tokens = (
            distributed.all_reduce_numbers([epoch_loss_sum, tokens, samples, real_tokens],
                                           device))
        totals.loss = loss_sum_all / max(tokens, 1)
        (totals.seconds,) = distributed.all_reduce_numbers([totals.seconds], device, "max")
    if not math.isfinite(totals.loss):
        raise NonFiniteLossError(
            f"training loss became {totals.loss} in epoch {epoch}: expected a finite loss "
            f"(try a lower --lr than {config.lr:g}, --precision fp32, or --max-grad-norm 1)")
    return totals


def _wrapped(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What trains: the model, or under torchrun its DistributedDataParallel wrapper."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def _end_epoch(epoch_result: EpochResult, model, loop: _Loop, config: TrainConfig,
               precision: Precision, curve: StepCurve, loggers: Sequence[Logger],
               checkpoint_dir: str | None, scorer: Scorer | None, stopwatch: Stopwatch) -> None:
    """After an epoch's validation: score it, keep it if best, checkpoint it, then log it (the
    checkpoint first, so a kill while logging replays the epoch's logging at resume)."""
    main_process = distributed.is_main()
    if scorer is not None:
        with stopwatch.phase("scoring"):
            epoch_result.scores = _scores(scorer, model)
    with stopwatch.phase("checkpoint"):  # the best weights' host copy, then the state
        loop.keep_if_best(epoch_result, model, config.select_by)
        if checkpoint_dir:
            loop.save(checkpoint_dir, model, curve, precision)
    with stopwatch.phase("logging"):
        for logger in loggers if main_process else ():
            logger.on_epoch_end(model, epoch_result)
    if checkpoint_dir and main_process:
        mark_logged(checkpoint_dir, epoch_result.epoch)


def fit(model: torch.nn.Module, train_loader: DataLoader, validation_loader: DataLoader,
        config: TrainConfig, device: torch.device, precision: Precision,
        loggers: Sequence[Logger] = (), checkpoint_dir: str | None = None, resume: bool = False,
        scorer: Scorer | None = None, stopwatch: Stopwatch | None = None) -> FitResult:
    """Train for ``config.epochs`` (or until early stopping); leave the best epoch's weights in
    ``model`` and return every epoch's figures. Under torchrun the main process alone, which
    logs the model, ends with the best weights; the others keep the last epoch's.

    "Best" is by ``config.select_by``: the lowest validation loss, or the highest score of that
    name returned by ``scorer`` (called after each epoch's validation, on the main process);
    early stopping (``config.patience``) counts epochs without a better value of the same.

    With ``checkpoint_dir``, the training state is saved there after every epoch (before the
    loggers run; the weights training changes, not a frozen LoRA base); with ``resume``,
    training continues from it and ends with the losses of an uninterrupted run.

    Under torchrun (``medlm.distributed``) each process passes loaders built with its own
    ``shard``: the model is wrapped in DistributedDataParallel, losses and throughput are summed
    over all processes, and rank 0 alone shows progress, checkpoints and calls the loggers.
    ``stopwatch`` is told where the time goes (``logging``: the loggers).
    """

    if config.select_by != "validation_loss" and scorer is None:
        raise ValueError(f"select_by={config.select_by!r} needs a scorer that returns it")
    stopwatch = stopwatch or Stopwatch()
    main_process = distributed.is_main()
    progress = config.progress and main_process
    torch.manual_seed(config.seed + distributed.rank())  # each process its own dropout masks
    model.to(device)
    model.train()
    loop = _start_loop(model, train_loader, config, device, precision, checkpoint_dir, resume,
                       loggers)
    trained, result = _wrapped(model, device), loop.result
    curve = StepCurve(loggers if main_process else [], config.log_every_steps, device,
                      loop.step_interval)
    first_epoch = config.epochs + 1 if result.stopped_early else len(result.epochs) + 1
    for epoch in range(first_epoch, config.epochs + 1):
        stop.raise_if_asked()
        _set_epoch(train_loader, epoch)
        started = time.perf_counter()
        totals = _train_epoch(trained, train_loader, loop, config, epoch, precision, device,
                              curve, progress, stopwatch)
        with stopwatch.phase("validation"):
            validation_loss = evaluate(model, validation_loader, device, precision, progress)
        epoch_result = totals.result(epoch, validation_loss, time.perf_counter() - started,
                                     loop.scheduler.get_last_lr()[0])
        _end_epoch(epoch_result, model, loop, config, precision, curve, loggers, checkpoint_dir,
                   scorer, stopwatch)
        if config.patience and loop.epochs_without_improvement >= config.patience:
            result.stopped_early = True
            break
    curve.flush()  # the steps since the last point: a short run's curves are not empty
    if loop.best_state is not None:
        load_trained_weights(model, loop.best_state)
    return result
