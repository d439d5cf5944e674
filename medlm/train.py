"""The training loop: plain PyTorch, one screen. It reports through ``Logger``s, never to MLflow."""

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medlm import checkpoint, distributed, stop
from medlm.config import TrainConfig
from medlm.data import IGNORE_INDEX
from medlm.errors import MedLMError
from medlm.modeling import Precision, casts_cached, peak_flops
from medlm.timing import Stopwatch

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


@dataclass
class FitResult:
    epochs: list[EpochResult] = field(default_factory=list)
    stopped_early: bool = False
    select_by: str = "validation_loss"

    @property
    def best(self) -> EpochResult:
        """The first epoch with the best ``select_by`` value (a tie keeps the earlier one)."""
        if self.select_by == "validation_loss":
            return min(self.epochs, key=lambda result: result.validation_loss)
        return max(self.epochs, key=lambda result: result.scores.get(self.select_by, -math.inf))


class Logger:
    """What the loop reports, and when (torchtune's ``MetricLoggerInterface``); rank 0's only."""

    def on_step(self, step: int, values: dict[str, float]) -> None:
        """Every ``log_every_steps`` steps: training_loss, learning_rate, tokens_per_sec and,
        with clipping, grad_norm."""

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """After an epoch's validation: figures that join the epoch's (say, symptom F1)."""
        return {}

    def on_epoch_end(self, model: torch.nn.Module, result: EpochResult) -> None:
        """After each epoch's checkpoint, and again for it at a resume: log what is missing."""


class NonFiniteLossError(MedLMError):
    pass


class RunStopped(Exception):
    """Raised by a logger to end the run on purpose (a pruned trial): marked KILLED."""


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of next-token cross-entropy over real tokens (labels of -100 skipped)."""
    logits, labels = _next_token(model, batch)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum", label_smoothing=label_smoothing)


def _next_token(model: torch.nn.Module,
                batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's logits but the last (in fp32) and the label each predicts (the next)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float(), batch["labels"][:, 1:]


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens predicted (every real token but each row's first), counted on the host."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Asynchronously only from pinned memory to CUDA (on MPS it can read freed memory)."""
    return {key: value.to(device, non_blocking=device.type == "cuda" and value.is_pinned())
            for key, value in batch.items()}


def _windows(loader: DataLoader, size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Groups of ``size`` batches: one optimizer step each."""
    batches = iter(loader)
    while window := list(itertools.islice(batches, size)):
        yield window


def _bar(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def evaluate(model: torch.nn.Module, loader: DataLoader, precision: Precision,
             progress: bool = False) -> float:
    """Mean loss per real token over all processes' ``loader`` (the plain model, not DDP's)."""
    rows = row_losses(model, loader, precision, progress)
    loss_sum, tokens = distributed.all_reduce_numbers(rows.sum(axis=0).tolist(), precision.device)
    return loss_sum / max(tokens, 1)


@torch.no_grad()
def row_losses(model: torch.nn.Module, loader: DataLoader, precision: Precision,
               progress: bool = False) -> np.ndarray:
    """Each row's summed loss and predicted-token count, in dataset order (``batch_sampler``:
    index lists; other rows stay 0): what a paired comparison of two models resamples. Under
    no_grad, not inference_mode (which keeps no autocast cache): each weight is cast once."""
    device, was_training = precision.device, model.training
    model.eval()
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    rows = torch.zeros((len(loader.dataset), 2), dtype=dtype, device=device)
    with (_bar(len(loader), "validation", progress) as bar, precision.autocast(),
          casts_cached(model, device)):
        for indices, batch in zip(loader.batch_sampler, loader, strict=True):
            logits, labels = _next_token(model, _to(batch, device))
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                     reduction="none")
            rows[indices, 0] = losses.sum(dim=1).to(dtype)
            rows[indices, 1] = (labels != IGNORE_INDEX).sum(dim=1).to(dtype)
            bar.update()
    model.train(was_training)
    return rows.cpu().double().numpy()


@contextlib.contextmanager
def noisy_embeddings(model: torch.nn.Module, alpha: float) -> Iterator[None]:
    """NEFTune (Jain et al. 2023, as TRL's ``neftune_noise_alpha``): in training mode, uniform
    noise of scale ``alpha / sqrt(tokens x width)`` on the input embeddings (``alpha`` 0: none)."""
    def add_noise(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    with contextlib.ExitStack() as hooks:
        if alpha:
            hooks.callback(model.get_input_embeddings().register_forward_hook(add_noise).remove)
        yield


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.scheduler, config.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)


@dataclass
class TrainState:
    """What a checkpoint saves beside the trained weights and a resume restores."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator | None  # the training batches' shuffle
    result: FitResult
    best_weights: dict[str, torch.Tensor] | None = None  # the main process's host copy
    epochs_without_improvement: int = 0
    step_interval: dict = field(default_factory=dict)  # the step/* point in progress
    precision: str = "fp32"  # the effective one, said at a resume where it differs
    frozen_sha256: str | None = None  # LoRA's base (checkpoint.frozen_sha256): not saved
    scale: float | None = None  # fp16: the loss scale the last update() left (host copy)

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
        saved = state["optimizer"]  # with this device's fused/foreach, not the saving one's
        self.optimizer.load_state_dict({**saved, "param_groups": [
            {**group, "fused": mine["fused"], "foreach": mine["foreach"]}
            for group, mine in zip(saved["param_groups"], self.optimizer.param_groups,
                                   strict=True)]})
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a disabled scaler (fp32/bf16) saved {}: nothing to restore
            self.scaler.load_state_dict(state["scaler"])
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self.result.epochs = [EpochResult(**values) for values in state["epochs"]]
        self.best_weights = state["best_weights"]  # None on the other processes
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.step_interval = state["step_interval"]


def train_step(model: torch.nn.Module, window: list[dict[str, torch.Tensor]],
               state: TrainState, precision: Precision,
               config: TrainConfig) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One optimizer step over a window of batches, the loss divided by the window's token count
    (all processes' under torchrun): k batches step as one k times as large. Returns the summed
    loss, the token count and the gradient norm before clipping (or None), tensors left unread."""
    device, scaler = precision.device, state.scaler
    if scaler.is_enabled() and state.scale is None:
        state.scale = scaler.get_scale()  # before the first scale(): the initial one, no sync
    window_tokens = max(sum(count_loss_tokens(batch) for batch in window), 1)
    divisor: int | torch.Tensor = window_tokens
    if distributed.is_enabled():  # DDP averages gradients: divide by the mean count per process
        all_tokens = torch.full((), float(window_tokens), device=device)  # no host copy, no wait
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
    scaler.step(state.optimizer)  # skipped when the scaled gradients overflowed
    scaler.update()
    stepped = True
    if scaler.is_enabled():  # fp16: an overflow lowers the scale; read once a step (a sync)
        before, state.scale = state.scale, scaler.get_scale()
        stepped = state.scale >= before
    if stepped:  # the schedule follows real steps only
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum, window_tokens, grad_norm


class Report:
    """The loop's loggers (the main process's alone) and its stopwatch."""

    def __init__(self, loggers: Sequence[Logger] = (), stopwatch: Stopwatch | None = None):
        self.loggers = list(loggers) if distributed.is_main() else []
        self.stopwatch = stopwatch or Stopwatch()

    def on_step(self, step: int, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.on_step(step, values)

    def scores(self, model: torch.nn.Module) -> dict[str, float]:
        with self.stopwatch.phase("scoring"):
            scores = {name: float(value) for logger in self.loggers
                      for name, value in logger.score(model).items()}
            return distributed.broadcast_object(scores)

    def on_epoch_end(self, model: torch.nn.Module, result: EpochResult) -> None:
        with self.stopwatch.phase("logging"):
            for logger in self.loggers:
                logger.on_epoch_end(model, result)


def fit(model: torch.nn.Module, loaders: tuple[DataLoader, DataLoader], config: TrainConfig,
        precision: Precision, checkpoint_dir: str | os.PathLike | None = None,
        report: Report | None = None) -> FitResult:
    """Train on ``loaders`` (training, validation) for ``config.epochs`` or until ``patience``
    epochs without a better ``select_by`` (validation loss or a logger's score); leave the best
    epoch's weights in ``model`` (the main process's) and return every epoch's figures. With
    ``checkpoint_dir``, saved there after every epoch; a run found there goes on to the losses of
    an uninterrupted one. Under torchrun each process passes its shard's loaders."""
    train_loader, validation_loader = loaders
    report = report or Report()
    device, main_process = precision.device, distributed.is_main()
    progress = config.progress and main_process
    torch.manual_seed(config.seed + distributed.rank())  # each process its own dropout masks
    model.to(device)
    # AdamW, weight decay on matrices only (as nanoGPT); fused on CUDA and CPU (here one step of
    # distilgpt2 takes 0.04 s fused against 0.32 s foreach), multi-tensor elsewhere
    parameters = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, fused=fused, foreach=None if fused else True)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    state = TrainState(optimizer, make_scheduler(optimizer, config,
                                                 steps_per_epoch * config.epochs),
                       precision.grad_scaler(), getattr(train_loader, "generator", None),
                       FitResult(select_by=config.select_by), precision=precision.numerics,
                       frozen_sha256=checkpoint.frozen_sha256(model) if checkpoint_dir else None)
    result = state.result
    # the main process decides, so that no rank resumes alone (a node-local directory)
    if distributed.broadcast_object(bool(checkpoint_dir) and checkpoint.has_checkpoint(
            checkpoint_dir) if main_process else None):
        state.load_state_dict(checkpoint.load_checkpoint(checkpoint_dir, model,
                                                         state.frozen_sha256, precision))
        report.on_epoch_end(model, result.epochs[-1])  # logs what a kill cut short
    trained = model if distributed.world_size() == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    # the per-step point in progress: loss, tokens and training seconds since the last one
    interval = state.step_interval or {"loss_sum": 0.0, "tokens": 0, "real_tokens": 0,
                                       "seconds": 0.0}
    interval_loss = torch.zeros((), device=device) + interval["loss_sum"]
    last_point = None  # (step, learning rate, gradient norm) of the latest step

    def log_point(since: float | None) -> float:
        """The point at ``last_point``, the loss read before the clock; ``since``: the clock."""
        step, learning_rate, grad_norm = last_point
        values = {"training_loss": interval_loss.item() / interval["tokens"],
                  "learning_rate": learning_rate,
                  **({} if grad_norm is None else {"grad_norm": float(grad_norm)})}
        now = time.perf_counter()
        seconds = interval["seconds"] + (now - since if since is not None else 0.0)
        values["tokens_per_sec"] = interval["real_tokens"] / max(seconds, 1e-9)
        report.on_step(step, values)
        interval_loss.zero_()
        interval.update(tokens=0, real_tokens=0, seconds=0.0)
        return now

    # training FLOPs per token, for MFU (Kaplan et al.'s 6N, as nanoGPT's): 2N forward, 2N for
    # the activations' gradients, 2 per trained weight (LoRA's frozen base: 4N); not attention's
    flops = sum((4 + 2 * p.requires_grad) * p.numel() for p in model.parameters())
    for epoch in range(len(result.epochs) + 1, config.epochs + 1):
        if config.patience and state.epochs_without_improvement >= config.patience:
            break  # early stopping: also for a resumed run that had stopped
        stop.raise_if_asked()
        for epoch_aware in (train_loader.batch_sampler, train_loader.dataset):  # batches, and
            if hasattr(epoch_aware, "set_epoch"):  # symptom orders (--shuffle-symptoms)
                epoch_aware.set_epoch(epoch - 1)
        started = clock = time.perf_counter()
        trained.train()
        epoch_loss = torch.zeros((), device=device)
        tokens = real_tokens = samples = 0
        with (report.stopwatch.phase("training"),
              _bar(len(train_loader), f"epoch {epoch}/{config.epochs}", progress) as bar):
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
        epoch_loss_sum, tokens, samples, real_tokens = distributed.all_reduce_numbers(
            [epoch_loss_sum, tokens, samples, real_tokens], device)  # over all processes
        (training_seconds,) = distributed.all_reduce_numbers([training_seconds], device, "max")
        training_loss = epoch_loss_sum / max(tokens, 1)
        if not math.isfinite(training_loss):
            raise NonFiniteLossError(
                f"training loss became {training_loss} in epoch {epoch}: expected a finite loss "
                f"(try a lower --lr than {config.lr:g}, --precision fp32, or --max-grad-norm 1)")
        with report.stopwatch.phase("validation"):
            validation_loss = evaluate(model, validation_loader, precision, progress)
        tokens_per_sec = real_tokens / training_seconds
        epoch_result = EpochResult(
            epoch=epoch, training_loss=training_loss, validation_loss=validation_loss,
            validation_perplexity=math.exp(min(validation_loss, 700.0)),
            epoch_duration_sec=time.perf_counter() - started,
            train_samples_per_sec=samples / training_seconds, train_tokens_per_sec=tokens_per_sec,
            learning_rate=state.scheduler.get_last_lr()[0], scores=report.scores(model),
            model_flops_utilization=tokens_per_sec * flops / (
                peak_flops(precision) * distributed.world_size()))
        if config.select_by != "validation_loss" and config.select_by not in epoch_result.scores:
            raise ValueError(f"select_by={config.select_by!r} needs a scorer: a logger whose "
                             "score() returns it")
        result.epochs.append(epoch_result)
        epoch_result.is_best = result.best is epoch_result
        state.epochs_without_improvement = (
            0 if epoch_result.is_best else state.epochs_without_improvement + 1)
        if epoch_result.is_best and main_process and epoch < config.epochs:  # the main
            state.best_weights = _keep(checkpoint.trained_weights(model),  # process logs it;
                                       state.best_weights)  # after the last, model holds it
        if checkpoint_dir:  # before the loggers: a kill while they log loses no training
            with report.stopwatch.phase("checkpoint"):
                state.step_interval = {**interval, "loss_sum": interval_loss.item()}
                rng_states = distributed.gather_objects(checkpoint.rng_state())
                if main_process:
                    checkpoint.save_checkpoint(checkpoint_dir, model, state.state_dict(),
                                               state.best_weights, rng_states)
        report.on_epoch_end(model, epoch_result)
    result.stopped_early = bool(config.patience) and (
        state.epochs_without_improvement >= config.patience)
    if last_point is not None:  # the steps since the last point
        log_point(None)
    if state.best_weights is not None and not result.epochs[-1].is_best:
        checkpoint.load_trained_weights(model, state.best_weights)
    return result


def _keep(weights: dict[str, torch.Tensor],
          kept: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``weights`` copied into ``kept``, host buffers made once: one host copy of the model
    however many epochs improve (pageable: torch's pinned allocator rounds each buffer up to a
    power of two and keeps it cached for the process)."""
    if kept is None or kept.keys() != weights.keys():
        kept = {name: torch.empty(weight.shape, dtype=weight.dtype)
                for name, weight in weights.items()}
    for name, weight in weights.items():
        kept[name].copy_(weight)
    return kept
