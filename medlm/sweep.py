"""What ``python -m experiments.run`` calls: ``run`` (one configuration, or a sweep of them) and
``resume`` (an interrupted run or sweep), each checking what it can before any MLflow run
starts.

Sweeps: the grid of ``medlm.config.SWEEPABLE`` values (and, with ``--folds``, the folds of
a cross-validation) as child runs of ``medlm.recipe`` under one parent run, which carries the
best child, or the best recipe's scores over the folds. An interrupted sweep resumes as a whole
(``resume_sweep``) from what MLflow records: the grid on the parent run (``SWEEP_TAG``), each
child's place in it (``INDEX_TAG``), status and scores."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medlm import distributed, stop
from medlm.checkpoint import (
    claim,
    has_checkpoint,
    let_go,
    remove_finished,
    saved_epochs,
    trained_here,
    write_durably,
)
from medlm.config import SWEEPABLE, TrainConfig, sweep_value
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable
from medlm.recipe import (
    DATA_FILE,
    Run,
    check_output_paths,
    check_resume_data,
    data_fingerprint,
    on_this_machine,
    resolve_lora_rank,
    resumable_failures,
    resume_command,
    resume_config,
    split_for,
)
from medlm.scores import CONFIDENCE, SUMMARY_SCORES, interval_text, over
from medlm.store import shown_tracking_uri
from medlm.tracking import MlflowTracker, end_abandoned_run, log_sweep_summary, run_outcome
from medlm.train import NonFiniteLossError

log = logging.getLogger("medlm")

SWEEP_TAG = "medlm.sweep"  # on a sweep's parent run: its first run's settings, grid, processes
INDEX_TAG = "medlm.sweep_index"  # on a sweep's child run: its place in the grid


def saved_sweep(parent_id: str) -> tuple[list[TrainConfig], dict[str, list], int] | None:
    """The sweep whose parent run is ``parent_id``, as that run records it: its configurations,
    grid and process count; None where the run is no sweep's parent, or no run."""
    try:
        saved = MlflowClient().get_run(parent_id).data.tags.get(SWEEP_TAG)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None
    if saved is None:
        return None
    saved = json.loads(saved)
    return (sweep_configs(TrainConfig.from_saved(saved["config"]), saved["grid"]),
            saved["grid"], saved["processes"])


def sweep_axes(config: TrainConfig) -> tuple[str, ...]:
    """What tells a sweep's children apart: the sweepable settings, and ``fold`` with
    ``--folds``."""
    return (*SWEEPABLE, "fold") if config.folds else SWEEPABLE


def diverged_row(run_id: str, row: dict) -> dict:
    nan = float("nan")
    return {"run_id": run_id, **row, "best_epoch": nan, "validation_loss": nan,
            **dict.fromkeys(SUMMARY_SCORES, nan), "version": None,
            "status": "FAILED: loss diverged"}


def _past_children(parent_id: str, configs: list[TrainConfig]) -> list[tuple]:
    """What became of each child of the grid, by its latest run under the parent (asked of
    MLflow, on the main process): (its row, None, how) where it ended, FINISHED or diverged
    (FAILED, its checkpoint removed); (None, its run id, how) where it resumes from its
    checkpoint; (None, None, how) where it starts: never started, or stopped before its first
    epoch ended."""
    parent = MlflowClient().get_run(parent_id).info
    latest = {int(run.data.tags[INDEX_TAG]): run for run in mlflow.search_runs(
        [parent.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time"], output_format="list") if INDEX_TAG in run.data.tags}
    interrupted = parent.end_time or math.inf  # a SIGKILL left it RUNNING, without one
    past = []
    for index, config in enumerate(configs):
        if (run := latest.get(index)) is None:
            past.append((None, None, ""))
            continue
        run_id, checkpoint = run.info.run_id, Path(config.checkpoint_dir) / run.info.run_id
        row = {name: getattr(config, name) for name in sweep_axes(config)}  # the grid's
        if run.info.status == "FINISHED":  # (a kill may have cut off its checkpoint's removal)
            shutil.rmtree(checkpoint, ignore_errors=True)
            row = {"run_id": run_id, **row, **run_outcome(run_id)[1], "status": "FINISHED"}
        elif has_checkpoint(checkpoint):
            past.append((None, run_id, f" (resuming run {run_id})"))
            continue
        elif run.info.status == "FAILED":
            row = diverged_row(run_id, row)
        else:
            end_abandoned_run(run_id)  # stopped before its first epoch ended: nothing to resume
            past.append((None, None, f" (run {run_id} was stopped before its first epoch "
                                     "ended: starting it again)"))
            continue
        when = " before the interruption" if run.info.end_time <= interrupted else ""
        past.append((row, None, f": {row['status']}{when} (run {run_id})"))
    return past


def _train_child(run: Run, index: int, position: str, row: dict,
                 resume_child: str | None) -> dict:
    """The child ``index`` of the grid (``position``: "2/3"; ``row``: its swept values, as the
    grid has them); its row of the sweep's table (a diverged child's too: the others go on, as
    is common in an lr sweep)."""

    def started(run_id: str) -> None:  # its place in the grid, where a resume looks for it
        if distributed.is_main():
            MlflowClient().set_tag(run_id, INDEX_TAG, str(index))

    config = run.config
    try:
        result = run.execute(resume_run_id=resume_child, nested=True, started=started)
        return {**result, "status": "FINISHED"}
    except NonFiniteLossError as error:
        log.warning("child %s (%s) FAILED: %s", position, config.run_name, error)
        run_id = getattr(error, "run_id", "")
        if distributed.is_main() and run_id:  # nothing there is worth resuming
            shutil.rmtree(Path(config.checkpoint_dir) / run_id, ignore_errors=True)
        return diverged_row(run_id, row)


def _sweep_table(children: list[dict], select_by: str) -> pd.DataFrame:
    """The children ranked by the selection (validation loss, then symptom F1; the other way
    round with ``--select-by symptom_f1``); diverged ones last, unranked."""
    order = ["validation_loss", "symptom_f1"]
    if select_by == "symptom_f1":
        order.reverse()
    table = pd.DataFrame(children)
    table = table.sort_values(order, ascending=[name == "validation_loss" for name in order])
    table.insert(0, "rank", [str(rank) if status == "FINISHED" else "-" for rank, status
                             in enumerate(table["status"], start=1)])
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    return table


def _children(configs: list[TrainConfig], past: list[tuple], run: Run,
              rows: list[dict]) -> None:
    """Every child of the grid in order, its row appended to ``rows``: one that had ended
    (``past``) as it was, the others trained, each a ``Run.next`` from the untouched base."""

    axes = sweep_axes(configs[0])
    for index, (config, (row, resume_child, how)) in enumerate(zip(configs, past, strict=True)):
        stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop): no next child
        label = " ".join(f"{name}={sweep_value(getattr(config, name))}" for name in axes)
        log.info("--- child %d/%d: %s%s", index + 1, len(configs), label, how)
        if row:
            rows.append(row)
            continue
        row = {name: getattr(config, name) for name in axes}  # the grid's, not a resume's
        if resume_child:  # its own saved settings, where this process keeps them
            config = replace(resume_config(resume_child, config.checkpoint_dir),
                             checkpoint_dir=config.checkpoint_dir,
                             collective_timeout_min=config.collective_timeout_min)
        run = run.next(replace(config, run_name=label))  # each fold its own held-out diseases
        rows.append(_train_child(run, index, f"{index + 1}/{len(configs)}", row, resume_child))


def _parent(configs: list[TrainConfig], grid: dict[str, list]) -> tuple[MlflowTracker, dict]:
    """The sweep's parent run and its params: the settings its children share, and the grid."""
    first = configs[0]
    parent = MlflowTracker(replace(first, run_name=first.run_name or "sweep",
                                   system_metrics=False))  # its children's are the machine's
    return parent, {**{k: v for k, v in first.to_params().items()
                       if k not in sweep_axes(first)},
                    **{f"sweep_{name}": ", ".join(map(str, values))
                       for name, values in grid.items()}, "sweep_size": len(configs)}


def run_sweep(configs: list[TrainConfig], grid: dict[str, list], run: Run,
              resume: str | None = None, started: Callable[[str], None] | None = None) -> None:
    """The grid as child runs under one parent run; the parent carries the best child.

    The parent records the grid (``SWEEP_TAG``), each child its place in it (``INDEX_TAG``);
    ``resume`` = the parent run id of an interrupted sweep, which goes on from what MLflow
    records of its children: ended children are kept, an interrupted child resumes from its
    checkpoint (or starts again if it had none), the rest run. Only the main process asks
    MLflow and writes files; it tells the others what it found."""
    first = configs[0]
    parent, parent_params = _parent(configs, grid)
    main_process, world_size = distributed.is_main(), distributed.world_size()
    parent_run = (parent.run(parent_params, resume_run_id=resume) if main_process
                  else contextlib.nullcontext(resume))
    with parent_run as parent_id:
        parent_id = distributed.broadcast_object(parent_id)
        if started:  # told the parent's id: what resumes the sweep
            started(parent_id)
        directory = Path(first.checkpoint_dir) / parent_id  # the data its children train on
        children: list[dict] = []
        if main_process:
            claim(directory)  # this process's sweep until it ends
        try:
            if main_process and not resume:
                mlflow.set_tag(SWEEP_TAG, json.dumps({"config": asdict(first), "grid": grid,
                                                      "processes": world_size}))
                write_durably(directory / DATA_FILE, json.dumps(
                    data_fingerprint(run.data, split_for(first, run.data))))
            past = distributed.broadcast_object(
                _past_children(parent_id, configs) if main_process else None)
            log.info("sweep of %d runs under parent run %s%s", len(configs), parent_id,
                     f" (resumed: {sum(row is not None for row, _, _ in past)} ended before)"
                     if resume else "")
            _children(configs, past, run, children)
        except BaseException as error:
            if main_process:
                let_go(directory)  # a later resume, even in this process, may take it
                stopped = isinstance(error, KeyboardInterrupt)
                log.warning("sweep %s with %d of %d runs ended. %s the whole sweep with: %s",
                            "stopped" if stopped else "failed", len(children), len(configs),
                            "Resume" if stopped else "After fixing the cause, resume",
                            resume_command(parent_id, first.checkpoint_dir, world_size))
            raise
        if not any(child["status"] == "FINISHED" for child in children):
            if main_process:
                remove_finished(directory)  # nothing to resume
            raise NonFiniteLossError(f"every run of the sweep diverged (lr {grid['lr']}): "
                                     "expected at least one finite training loss; try a "
                                     "lower --lr or fp32")
        if not main_process:
            return
        tables = _summary(children, first)
    remove_finished(directory)  # the sweep is over
    _print_table(*tables, parent_id)


def _summary(children: list[dict], first: TrainConfig) -> tuple[pd.DataFrame, ...]:
    """The sweep's tables (its children ranked; each recipe over its seeds, and over its
    folds, or None), logged on the parent run. A cross-validation ranks recipes by their
    mean over the folds, never one fold's child against another's."""
    table = _sweep_table(children, first.select_by)
    axes = sweep_axes(first)
    if not _cross_validated(table):  # (--folds K --fold I with a grid: one fold, plain ranks)
        by_seed = over(table, axes, "seed")
        log_sweep_summary(table, axes, by_seed, best=table.iloc[0])
        return table, by_seed, None
    by_fold = _ranked(over(table, axes, "fold", pooled=("seed",)), first)
    table = _by_recipe(table, axes, by_fold)
    log_sweep_summary(table, axes, by_fold=by_fold)
    return table, None, by_fold


def _cross_validated(table: pd.DataFrame) -> bool:
    """Do the children hold out several folds of a cross-validation?"""
    return "fold" in table and table["fold"].nunique() > 1


def _ranked(by_fold: pd.DataFrame | None, first: TrainConfig) -> pd.DataFrame | None:
    """The recipes ranked by their mean over the folds of ``select_by``; ``complete``: every
    fold finished (a recipe that diverged on some folds is ranked after those, on fewer)."""
    if by_fold is None:
        return None
    by_fold.insert(0, "complete", by_fold["folds"].str.split().str.len() == first.folds)
    return by_fold.sort_values(["complete", first.select_by],
                               ascending=[False, first.select_by == "validation_loss"],
                               kind="stable").reset_index(drop=True)


def _by_recipe(table: pd.DataFrame, axes: tuple[str, ...],
               by_fold: pd.DataFrame | None) -> pd.DataFrame:
    """A cross-validation's children in recipe order (its rank over the folds), then fold."""
    recipe = [name for name in axes if name not in ("fold", "seed")]
    ranks = ({tuple(row): str(rank) for rank, row in
              enumerate(by_fold[recipe].itertuples(index=False, name=None), start=1)}
             if by_fold is not None else {})
    table["rank"] = [ranks.get(tuple(row), "-") if status == "FINISHED" else "-"
                     for row, status in zip(table[recipe].itertuples(index=False, name=None),
                                            table["status"], strict=True)]
    order = table["rank"].map(lambda rank: int(rank) if rank != "-" else len(table) + 1)
    return (table.assign(order=order).sort_values(["order", *[n for n in axes if n != "fold"],
                                                   "fold"], kind="stable")
            .drop(columns="order").reset_index(drop=True))


def _print_table(table: pd.DataFrame, by_seed: pd.DataFrame | None,
                 by_fold: pd.DataFrame | None, parent_id: str) -> None:
    """The sweep's table, best child (or, cross-validated, best recipe) first; each recipe over
    its training seeds, or its folds, where it had several; and where the best is."""
    with pd.option_context("display.width", 160, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for title, repeats in (("training seeds", by_seed), ("folds, best first", by_fold)):
            if repeats is not None:
                print(f"\nover {title} (mean, standard deviation and {CONFIDENCE:.0%} "
                      "t-interval):")
                print(repeats.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if not _cross_validated(table):
        best = table.iloc[0]
        log.info("best child: run %s (validation loss %.4f, symptom F1 %s); parent run %s",
                 best["run_id"], best["validation_loss"], interval_text(best, "symptom_f1", 4),
                 parent_id)
    elif by_fold is not None and by_fold.iloc[0]["complete"]:
        top = by_fold.iloc[0]
        log.info("cross-validated over %d folds (mean ± sd [%s interval]): symptom F1 %s "
                 "(no model: constant %.3f, lookup %.3f; untuned %.3f), word F1 %s, validation "
                 "loss %s; parent run %s", len(top["folds"].split()), f"{CONFIDENCE:.0%}",
                 _mean_text(top, "symptom_f1"), *(top.get(name, math.nan) for name in (
                     "baseline_constant_symptom_f1", "baseline_lookup_symptom_f1",
                     "untuned_symptom_f1")),
                 _mean_text(top, "word_f1"), _mean_text(top, "validation_loss"), parent_id)
    else:
        log.warning("no recipe finished every fold: no cross-validated figure; parent run %s",
                    parent_id)


def _mean_text(row: pd.Series, score: str) -> str:
    """"0.2412 ± 0.0310 [0.2027-0.2797]": the mean over the folds, its standard deviation
    and its interval."""
    return (f"{row[score]:.4f} ± {row[f'{score}_std']:.4f} "
            f"[{row[f'{score}_ci_low']:.4f}-{row[f'{score}_ci_high']:.4f}]")


def resume_sweep(parent_id: str, directory: str, collective_timeout_min: float,
                 started: float | None = None, machine: dict[str, str] | None = None) -> None:
    """Continue the interrupted sweep ``parent_id`` with its own settings, as its parent run
    records them, and this invocation's checkpoint directory; everything that can refuse it is
    checked before the parent run is reopened."""

    configs, grid, processes = saved_sweep(parent_id)
    configs = [replace(config, checkpoint_dir=directory,
                       collective_timeout_min=collective_timeout_min) for config in configs]
    if machine:  # said once, for the sweep
        configs = [on_this_machine(configs[0], machine, parent_id),
                   *(replace(config, **machine) for config in configs[1:])]
    if processes != distributed.environment_world_size():
        raise MedLMError(f"--resume {parent_id!r}: the sweep ran in {processes} processes, "
                         f"this is {distributed.environment_world_size()}: expected the same "
                         "process count")
    if not (Path(directory) / parent_id / DATA_FILE).is_file():
        raise MedLMError(f"--resume {parent_id!r}: the sweep has nothing to resume in "
                         f"{Path(directory) / parent_id}: expected the --checkpoint-dir of a "
                         "sweep that was interrupted")
    run = Run(configs[0], started).setup()
    check_resume_data(Path(directory) / parent_id, run.data, split_for(configs[0], run.data))
    with resumable_failures(directory, [parent_id]):
        run_sweep(configs, grid, run, resume=parent_id)


def sweep_configs(base: TrainConfig, grid: dict[str, list]) -> list[TrainConfig]:
    """One configuration per combination of the ``SWEEPABLE`` values in ``grid``."""
    return [replace(base, **dict(zip(grid, values, strict=True)))
            for values in itertools.product(*grid.values())]


def run(configs: list[TrainConfig], grid: dict[str, list], started: float | None = None) -> None:
    """Train one configuration, or a sweep of them (``grid``: the swept values) under a parent
    run; ``started``: when the process began (its start-up counts in the first run's time).
    Bad input (including ``medlm.hub.HubUnavailable``) is raised before any MLflow run starts;
    a Hub failure later on (a sweep child's model) is a plain error."""

    if len(configs) > 1 and any(config.promote for config in configs):
        raise MedLMError("--promote with a sweep is invalid: expected one run (a sweep "
                         "would crown every child in turn; promote its best child's "
                         "version afterwards, in mlflow ui)")
    check_output_paths(configs[0])
    run = Run(configs[0], started).setup()  # a Hub or data error first, alone on its line
    # each run's LoRA decision (and its errors) before any MLflow run, a sweep's parent included
    configs = [resolve_lora_rank(config) for config in configs]
    run.config = configs[0]  # decided: its recipe file holds the rank it trains with
    run_ids: list[str] = []  # the run's (a sweep's: its parent's) id, for the outage message
    try:
        with resumable_failures(configs[0].checkpoint_dir, run_ids):
            if len(configs) == 1:
                run.execute(started=run_ids.append)
            else:
                run_sweep(configs, grid, run, started=run_ids.append)
    except HubUnavailable as error:  # not the "start offline instead" of a failed setup
        raise MedLMError(str(error)) from None


def resume(run_id: str, checkpoint_dir: str, collective_timeout_min: float,
           epochs: int | None = None, started: float | None = None,
           machine: dict[str, str] | None = None) -> None:
    """Continue the interrupted run, or sweep (a parent run id), ``run_id``: its own settings,
    but this machine's checkpoint directory, collective timeout and ``machine`` (``device``,
    ``precision``, ``progress``, ``system_metrics``, where given); ``epochs``, when given,
    changes how many epochs the run has in all (at least those it has completed). What it
    resumes (the checkpoint, the MLflow run) is checked before any data or model loads."""

    sweep = saved_sweep(run_id) is not None  # its parent run says so
    if sweep and epochs is not None:
        raise MedLMError(f"--epochs with --resume of sweep {run_id!r} is invalid: expected "
                         "no --epochs (a sweep resumes with its own grid)")
    saved = None if sweep else resume_config(run_id, checkpoint_dir)
    # this process's from here (a resume while another process trains it is refused), let go
    # if the resume fails; under torchrun only rank 0 talks to MLflow and writes files
    owner = (trained_here(Path(checkpoint_dir) / run_id) if distributed.is_main()
             else contextlib.nullcontext())
    with owner:
        if distributed.is_main():
            try:
                MlflowClient().get_run(run_id)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise MedLMError(f"--resume {run_id!r}: no such run in the tracking store "
                                 f"{shown_tracking_uri()} (its checkpoint is in "
                                 f"{Path(checkpoint_dir) / run_id}): expected the tracking store "
                                 "it was started with (MLFLOW_TRACKING_URI as it was then)"
                                 ) from None
        if sweep:
            resume_sweep(run_id, checkpoint_dir, collective_timeout_min, started, machine)
            return
        config = on_this_machine(replace(saved, checkpoint_dir=checkpoint_dir,
                                         collective_timeout_min=collective_timeout_min),
                                 machine or {}, run_id)
        if epochs is not None and epochs != config.epochs:
            done = len(saved_epochs(Path(checkpoint_dir) / run_id))
            if epochs < done:
                raise MedLMError(f"--epochs {epochs} with --resume {run_id!r} is invalid: the run "
                                 f"has completed {done} epochs: expected at least {done}")
            log.info("run %s: %d epochs in all instead of %d%s", run_id, epochs, config.epochs,
                     "" if config.scheduler == "constant" else
                     f" (the {config.scheduler} learning-rate schedule is spread over the new "
                     "total from the next step on)")
            config = replace(config, epochs=epochs)
        check_output_paths(config)
        run = Run(config, started).setup()
        check_resume_data(Path(checkpoint_dir) / run_id, run.data, run.split)
        if epochs is not None and distributed.is_main():  # accepted: a later resume keeps it
            write_durably(Path(checkpoint_dir) / run_id / "config.json",
                          json.dumps(asdict(config), indent=2))
        with resumable_failures(checkpoint_dir, [run_id]):
            run.execute(resume_run_id=run_id)
