"""Sweeps: the grid of ``medlm.config.SWEEPABLE`` values (and, with ``--folds``, the folds of
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
from medlm.checkpoint import claim, has_checkpoint, let_go, remove_finished, write_durably
from medlm.config import SWEEPABLE, TrainConfig, sweep_value
from medlm.errors import MedLMError
from medlm.recipe import (
    DATA_FILE,
    Prepared,
    check_resume_data,
    data_fingerprint,
    on_this_machine,
    prepare,
    resumable_failures,
    resume_command,
    resume_config,
    split_for,
    train_and_register,
)
from medlm.scores import CONFIDENCE, SUMMARY_SCORES, interval_text, over
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


def _train_child(config: TrainConfig, label: str, index: int, position: str, row: dict,
                 prepared: Prepared, resume_child: str | None) -> dict:
    """The child ``index`` of the grid (``position``: "2/3"; ``row``: its swept values, as the
    grid has them); its row of the sweep's table (a diverged child's too: the others go on, as
    is common in an lr sweep)."""

    def started(run_id: str) -> None:  # its place in the grid, where a resume looks for it
        if distributed.is_main():
            MlflowClient().set_tag(run_id, INDEX_TAG, str(index))

    try:
        result = train_and_register(replace(config, run_name=label), prepared, nested=True,
                                    resume_run_id=resume_child, started=started)
        return {**result, "status": "FINISHED"}
    except NonFiniteLossError as error:
        log.warning("child %s (%s) FAILED: %s", position, label, error)
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


def _children(configs: list[TrainConfig], past: list[tuple], prepared: Prepared,
              rows: list[dict]) -> None:
    """Every child of the grid in order, its row appended to ``rows``: one that had ended
    (``past``) as it was, the others trained, each from the untouched base."""

    loaded = True  # prepared.model is the untouched base
    axes = sweep_axes(configs[0])
    for index, (config, (row, resume_child, how)) in enumerate(zip(configs, past, strict=True)):
        stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop): no next child
        label = " ".join(f"{name}={sweep_value(getattr(config, name))}" for name in axes)
        log.info("--- child %d/%d: %s%s", index + 1, len(configs), label, how)
        if row:
            rows.append(row)
            continue
        if not loaded:  # each child from the base, its time from its own start
            prepared.reload_model(config.model)
        loaded = False
        row = {name: getattr(config, name) for name in axes}  # the grid's, not a resume's
        if resume_child:  # its own saved settings, where this process keeps them
            config = replace(resume_config(resume_child, config.checkpoint_dir),
                             checkpoint_dir=config.checkpoint_dir,
                             collective_timeout_min=config.collective_timeout_min)
        if config.folds:  # each fold holds out its own diseases
            prepared.split = split_for(config, prepared.data)
        rows.append(_train_child(config, label, index, f"{index + 1}/{len(configs)}", row,
                                 prepared, resume_child))


def _parent(configs: list[TrainConfig], grid: dict[str, list]) -> tuple[MlflowTracker, dict]:
    """The sweep's parent run and its params: the settings its children share, and the grid."""
    first = configs[0]
    parent = MlflowTracker(first.experiment, first.run_name or "sweep", first.registered_model,
                           transformer=first.model, gpu="", batch_size=first.batch_size)
    return parent, {**{k: v for k, v in first.to_params().items()
                       if k not in sweep_axes(first)},
                    **{f"sweep_{name}": ", ".join(map(str, values))
                       for name, values in grid.items()}, "sweep_size": len(configs)}


def run_sweep(configs: list[TrainConfig], grid: dict[str, list], prepared: Prepared,
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
    run = (parent.run(parent_params, resume_run_id=resume) if main_process
           else contextlib.nullcontext(resume))
    with run as parent_id:
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
                    data_fingerprint(prepared.data, split_for(first, prepared.data))))
            past = distributed.broadcast_object(
                _past_children(parent_id, configs) if main_process else None)
            log.info("sweep of %d runs under parent run %s%s", len(configs), parent_id,
                     f" (resumed: {sum(row is not None for row, _, _ in past)} ended before)"
                     if resume else "")
            _children(configs, past, prepared, children)
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
    prepared = prepare(configs[0], started)
    check_resume_data(Path(directory) / parent_id, prepared.data,
                      split_for(configs[0], prepared.data))
    with resumable_failures(directory, [parent_id]):
        run_sweep(configs, grid, prepared, resume=parent_id)


def sweep_configs(base: TrainConfig, grid: dict[str, list]) -> list[TrainConfig]:
    """One configuration per combination of the ``SWEEPABLE`` values in ``grid``."""
    return [replace(base, **dict(zip(grid, values, strict=True)))
            for values in itertools.product(*grid.values())]
