"""Sweeps: the grid of ``medlm.config.SWEEPABLE`` values (and, with ``--folds``, the folds of
a cross-validation) as child runs of ``medlm.recipe`` under one parent run, which carries the
best child, or the best recipe's scores over the folds; their progress kept beside the
checkpoints, so an interrupted sweep resumes as a whole (``resume_sweep``)."""

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

import pandas as pd

from medlm import distributed, stop
from medlm._paths import sweep_state_file
from medlm.checkpoint import claim, has_checkpoint, let_go, remove_finished, write_durably
from medlm.config import SWEEPABLE, TrainConfig, sweep_value
from medlm.errors import MedLMError
from medlm.heldout import SUMMARY_SCORES, interval_text
from medlm.intervals import CONFIDENCE
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
from medlm.repeats import REFERENCE_SCORES, over
from medlm.tracking import MlflowTracker, end_abandoned_run, log_sweep_summary, run_outcome
from medlm.train import NonFiniteLossError

log = logging.getLogger("medlm")


def save_sweep_state(path: Path, state: dict) -> None:
    """Strict JSON (NaN written as null), replaced in one step and flushed to disk."""

    def strict(value):
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [strict(item) for item in value]
        return value

    write_durably(path, json.dumps(strict(state), indent=2, allow_nan=False))


def load_sweep_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MedLMError(f"--resume: the sweep's state {str(path)!r} is unreadable ({error}): "
                         "expected the file an interrupted sweep wrote") from None


def sweep_axes(config: TrainConfig) -> tuple[str, ...]:
    """What tells a sweep's children apart: the sweepable settings, and ``fold`` with
    ``--folds``."""
    return (*SWEEPABLE, "fold") if config.folds else SWEEPABLE


def diverged_row(run_id: str, row: dict) -> dict:
    nan = float("nan")
    return {"run_id": run_id, **row, "best_epoch": nan, "validation_loss": nan,
            **dict.fromkeys(SUMMARY_SCORES, nan), "version": None,
            "status": "FAILED: loss diverged"}


def _interrupted_child(interrupted: str, config: TrainConfig) -> tuple[str, dict | None]:
    """What became of the child in progress when the sweep was interrupted (asked of MLflow,
    on the main process): ``finished``, ``resume``, ``diverged`` or ``restart``."""

    checkpoint = Path(config.checkpoint_dir) / interrupted
    status, summary = run_outcome(interrupted)
    if status == "FINISHED":  # it ended after all (e.g. resumed on its own)
        shutil.rmtree(checkpoint, ignore_errors=True)
        return "finished", summary
    if has_checkpoint(checkpoint):
        return "resume", summary
    if status == "FAILED":  # diverged, and its checkpoint already removed
        return "diverged", summary
    end_abandoned_run(interrupted)  # stopped before its first epoch ended: nothing to resume
    return "restart", summary


def _train_child(config: TrainConfig, label: str, position: str, row: dict, prepared: Prepared,
                 resume_child: str | None, record: Callable[..., None]) -> dict:
    """One child run (``position``: "2/3"; ``row``: its swept values, as the grid has them);
    its row of the sweep's table (a diverged child's too: the others go on, as is common in an
    lr sweep)."""

    try:
        result = train_and_register(replace(config, run_name=label), prepared, nested=True,
                                    resume_run_id=resume_child,
                                    started=lambda run_id: record(running=run_id))
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
    # numbers, NaN where a resumed sweep's JSON wrote null or a row from before intervals has none
    scores = ["validation_loss", *SUMMARY_SCORES,
              *(name for name in REFERENCE_SCORES if name in table)]
    table[scores] = table.reindex(columns=scores).astype(float)
    table = table.sort_values(order, ascending=[name == "validation_loss" for name in order])
    table.insert(0, "rank", [str(rank) if status == "FINISHED" else "-" for rank, status
                             in enumerate(table["status"], start=1)])
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    return table


def _children(configs: list[TrainConfig], state: dict, prepared: Prepared,
              record: Callable[..., None]) -> None:
    """Every child not ended yet, in order, each row appended to ``state["children"]`` (and
    recorded) as it ends."""

    children, main_process = state["children"], distributed.is_main()
    loaded = True  # prepared.model is the untouched base
    axes = sweep_axes(configs[0])
    for index, config in enumerate(configs):
        stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop): no next child
        label = " ".join(f"{name}={sweep_value(getattr(config, name))}" for name in axes)
        where = f"--- child {index + 1}/{len(configs)}: {label}"
        if index < len(children):
            log.info("%s: %s before the interruption (run %s)", where,
                     children[index]["status"], children[index]["run_id"])
            continue
        row = {name: getattr(config, name) for name in axes}  # the grid's, not a resume's
        interrupted = state["running"] if index == len(children) else None
        decision, summary = distributed.broadcast_object(
            _interrupted_child(interrupted, config) if interrupted and main_process
            else (None, None))
        if decision in ("finished", "diverged"):
            log.info("%s: %s (run %s)", where, decision.upper(), interrupted)
            children.append({"run_id": interrupted, **row, **summary, "status": "FINISHED"}
                            if summary else diverged_row(interrupted, row))
            record(running=None)
            continue
        resume_child = interrupted if decision == "resume" else None
        if not loaded:  # each child from the base, its time from its own start
            prepared.reload_model(config.model)
        loaded = False
        log.info("%s%s", where, f" (resuming run {resume_child})" if resume_child else
                 f" (run {interrupted} was stopped before its first epoch ended: starting it "
                 "again)" if interrupted else "")
        if resume_child:  # its own saved settings, where this process keeps them
            config = replace(resume_config(resume_child, config.checkpoint_dir),
                             checkpoint_dir=config.checkpoint_dir,
                             collective_timeout_min=config.collective_timeout_min)
        if config.folds:  # each fold holds out its own diseases
            prepared.split = split_for(config, prepared.data)
        children.append(_train_child(config, label, f"{index + 1}/{len(configs)}", row,
                                     prepared, resume_child, record))
        record(running=None)


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
              resume: tuple[str, dict] | None = None,
              started: Callable[[str], None] | None = None) -> None:
    """The grid as child runs under one parent run; the parent carries the best child.

    The sweep's progress (its settings, each ended child's row, the child in progress) is kept
    in ``<checkpoint dir>/<parent run id>/sweep.json``; ``resume`` = (parent run id, that
    state) continues an interrupted sweep: ended children are kept, the interrupted child
    resumes from its checkpoint (or starts again if it had none), the rest run. Only the main
    process asks MLflow and writes files; it tells the others what it decided."""
    first = configs[0]
    parent, parent_params = _parent(configs, grid)
    main_process, world_size = distributed.is_main(), distributed.world_size()
    resume_id, state = resume or (None, {"configs": [asdict(config) for config in configs],
                                         "grid": grid, "world_size": world_size,
                                         "children": [], "running": None})
    run = (parent.run(parent_params, resume_run_id=resume_id) if main_process
           else contextlib.nullcontext(resume_id))
    with run as parent_id:
        parent_id = distributed.broadcast_object(parent_id)
        if started:  # told the parent's id: what resumes the sweep
            started(parent_id)
        state_file = sweep_state_file(first.checkpoint_dir, parent_id)

        def record(**changes) -> None:
            state.update(changes)  # every process keeps the same state
            if main_process:
                save_sweep_state(state_file, state)

        children = state["children"]
        if main_process:
            claim(state_file.parent)  # this process's sweep until it ends
        try:
            if main_process and not resume_id:  # what every child is trained on, then progress
                write_durably(state_file.parent / DATA_FILE, json.dumps(
                    data_fingerprint(prepared.data, split_for(first, prepared.data))))
            record()
            log.info("sweep of %d runs under parent run %s%s", len(configs), parent_id,
                     f" (resumed: {len(children)} ended before)" if resume_id else "")
            _children(configs, state, prepared, record)
        except BaseException as error:
            if main_process:
                let_go(state_file.parent)  # a later resume, even in this process, may take it
                stopped = isinstance(error, KeyboardInterrupt)
                log.warning("sweep %s with %d of %d runs ended. %s the whole sweep with: %s",
                            "stopped" if stopped else "failed", len(children), len(configs),
                            "Resume" if stopped else "After fixing the cause, resume",
                            resume_command(parent_id, first.checkpoint_dir, world_size))
            raise
        if not any(child["status"] == "FINISHED" for child in children):
            if main_process:
                remove_finished(state_file.parent)  # nothing to resume
            raise NonFiniteLossError(f"every run of the sweep diverged (lr {grid['lr']}): "
                                     "expected at least one finite training loss; try a "
                                     "lower --lr or fp32")
        if not main_process:
            return
        tables = _summary(children, first)
    remove_finished(state_file.parent)  # the sweep is over
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
    """Continue the interrupted sweep ``parent_id`` with its own settings and this invocation's
    checkpoint directory; everything that can refuse it is checked before the parent run is
    reopened."""

    state = load_sweep_state(sweep_state_file(directory, parent_id))
    configs = [replace(TrainConfig.from_saved(saved), checkpoint_dir=directory,
                       collective_timeout_min=collective_timeout_min)
               for saved in state["configs"]]
    if machine:  # said once, for the sweep
        configs = [on_this_machine(configs[0], machine, parent_id),
                   *(replace(config, **machine) for config in configs[1:])]
    for child, config in zip(state["children"], configs, strict=False):
        for name in sweep_axes(config):  # rows of a sweep begun before a value was sweepable
            child.setdefault(name, getattr(config, name))
    processes = distributed.environment_world_size()
    if state.get("world_size", 1) != processes:
        raise MedLMError(f"--resume {parent_id!r}: the sweep ran in {state.get('world_size', 1)} "
                         f"processes, this is {processes}: expected the same process count")
    ended = len(state["children"])
    interrupted = state["running"] if ended < len(configs) else None
    child_checkpoint = Path(directory) / interrupted if interrupted else None
    prepared = prepare(configs[min(ended, len(configs) - 1)], started)
    check_resume_data(Path(directory) / parent_id, prepared.data,
                      split_for(configs[0], prepared.data))
    if child_checkpoint and has_checkpoint(child_checkpoint):
        check_resume_data(child_checkpoint, prepared.data, prepared.split)
    with resumable_failures(directory, [parent_id]):
        run_sweep(configs, state["grid"], prepared, resume=(parent_id, state))


def sweep_configs(base: TrainConfig, grid: dict[str, list]) -> list[TrainConfig]:
    """One configuration per combination of the ``SWEEPABLE`` values in ``grid``."""
    return [replace(base, **dict(zip(grid, values, strict=True)))
            for values in itertools.product(*grid.values())]
