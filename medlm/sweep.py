"""What ``python -m experiments.run`` calls: ``run`` (one run, or a sweep of ``SWEEPABLE`` values
and ``--folds`` as child runs of a parent run) and ``resume``, from what MLflow records."""

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

from medlm import checkpoint, distributed, recipe, stop
from medlm.config import SWEEPABLE, TrainConfig, sweep_value
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable
from medlm.scores import CONFIDENCE, SUMMARY_SCORES, interval_text, over
from medlm.store import shown_tracking_uri
from medlm.tracking import MlflowTracker, end_abandoned_run, log_sweep_summary, run_outcome
from medlm.train import NonFiniteLossError

log = logging.getLogger("medlm")

SWEEP_TAG = "medlm.sweep"  # on a sweep's parent run: its first run's settings, grid, processes
INDEX_TAG = "medlm.sweep_index"  # on a sweep's child run: its place in the grid


def saved_sweep(parent_id: str) -> tuple[list[TrainConfig], dict[str, list], int] | None:
    """A sweep parent's configurations, grid and process count; None for any other run id."""
    try:
        saved = MlflowClient().get_run(parent_id).data.tags.get(SWEEP_TAG)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None
    if saved is None:
        return None
    saved = json.loads(saved)
    first, grid = TrainConfig.from_saved(saved["config"]), saved["grid"]
    return ([replace(first, **dict(zip(grid, values, strict=True)))
             for values in itertools.product(*grid.values())], grid, saved["processes"])


def sweep_axes(config: TrainConfig) -> tuple[str, ...]:
    """What tells a sweep's children apart: the sweepable settings, and the fold."""
    return (*SWEEPABLE, "fold") if config.folds else SWEEPABLE


def diverged_row(run_id: str, row: dict) -> dict:
    return {"run_id": run_id, **row, "best_epoch": math.nan, "validation_loss": math.nan,
            **dict.fromkeys(SUMMARY_SCORES, math.nan), "version": None,
            "status": "FAILED: loss diverged"}


def _past_children(parent_id: str, configs: list[TrainConfig]) -> list[tuple]:
    """Each child's latest run under the parent: (its row, None, how) where it ended (FINISHED
    or diverged), (None, its run id, how) where it resumes, else (None, None, how)."""
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
        run_id, kept = run.info.run_id, Path(config.checkpoint_dir) / run.info.run_id
        row = {name: getattr(config, name) for name in sweep_axes(config)}
        if run.info.status == "FINISHED":  # (a kill may have cut off its checkpoint's removal)
            shutil.rmtree(kept, ignore_errors=True)
            row = {"run_id": run_id, **row, **run_outcome(run_id)[1], "status": "FINISHED"}
        elif checkpoint.has_checkpoint(kept):
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


def _children(configs: list[TrainConfig], past: list[tuple], run: recipe.Run,
              rows: list[dict]) -> None:
    """Each child's row onto ``rows``, in grid order: as ``past`` left it, else trained."""
    axes = sweep_axes(configs[0])
    for index, (config, (row, resume_child, how)) in enumerate(zip(configs, past, strict=True)):
        stop.raise_if_asked()  # a SIGTERM whose raise was lost (medlm.stop): no next child
        label = " ".join(f"{name}={sweep_value(getattr(config, name))}" for name in axes)
        position = f"{index + 1}/{len(configs)}"
        log.info("--- child %s: %s%s", position, label, how)
        if row:
            rows.append(row)
            continue
        row = {name: getattr(config, name) for name in axes}  # the grid's, not a resume's
        if resume_child:  # its own saved settings, where this process keeps them
            config = replace(recipe.resume_config(resume_child, config.checkpoint_dir),
                             checkpoint_dir=config.checkpoint_dir,
                             collective_timeout_min=config.collective_timeout_min)

        def placed(run_id: str, index: int = index) -> None:  # where a resume looks for it
            if distributed.is_main():
                MlflowClient().set_tag(run_id, INDEX_TAG, str(index))

        run = run.next(replace(config, run_name=label))
        try:
            rows.append({**run.execute(resume_run_id=resume_child, nested=True,
                                       started=placed), "status": "FINISHED"})
        except NonFiniteLossError as error:
            log.warning("child %s (%s) FAILED: %s", position, label, error)
            run_id = getattr(error, "run_id", "")
            if distributed.is_main() and run_id:  # nothing there is worth resuming
                shutil.rmtree(Path(config.checkpoint_dir) / run_id, ignore_errors=True)
            rows.append(diverged_row(run_id, row))


def run_sweep(configs: list[TrainConfig], grid: dict[str, list], run: recipe.Run,
              resume: str | None, started: Callable[[str], None]) -> None:
    """The grid as child runs under one parent run (``resume``: an interrupted sweep's); only
    the main process asks MLflow and writes files, and tells the others what it found."""
    first = replace(configs[0], lora_rank=run.config.lora_rank)  # as its children train it
    main_process, world_size = distributed.is_main(), distributed.world_size()
    parent = MlflowTracker(replace(first, run_name=first.run_name or "sweep",
                                   system_metrics=False))  # its children's are the machine's
    params = {**{k: v for k, v in first.to_params().items() if k not in sweep_axes(first)},
              **{f"sweep_{name}": ", ".join(map(str, values)) for name, values in grid.items()},
              "sweep_size": len(configs)}
    with (parent.run(params, resume_run_id=resume) if main_process
          else contextlib.nullcontext(resume)) as parent_id:
        parent_id = distributed.broadcast_object(parent_id)
        started(parent_id)  # the parent's id: what resumes the sweep
        directory = Path(first.checkpoint_dir) / parent_id  # the data its children train on
        children: list[dict] = []
        if main_process:
            checkpoint.claim(directory)  # this process's sweep until it ends
        try:
            if main_process and not resume:
                mlflow.set_tag(SWEEP_TAG, json.dumps({"config": asdict(first), "grid": grid,
                                                      "processes": world_size}))
                checkpoint.write_durably(directory / recipe.DATA_FILE, json.dumps(
                    recipe.data_fingerprint(run.data, run.split)))
            past = distributed.broadcast_object(
                _past_children(parent_id, configs) if main_process else None)
            log.info("sweep of %d runs under parent run %s%s", len(configs), parent_id,
                     f" (resumed: {sum(row is not None for row, _, _ in past)} ended before)"
                     if resume else "")
            _children(configs, past, run, children)
        except BaseException as error:
            if main_process:
                checkpoint.let_go(directory)  # a later resume, even in this process, may take it
                stopped = isinstance(error, KeyboardInterrupt)
                log.warning("sweep %s with %d of %d runs ended. %s the whole sweep with: %s",
                            "stopped" if stopped else "failed", len(children), len(configs),
                            "Resume" if stopped else "After fixing the cause, resume",
                            recipe.resume_command(parent_id, first.checkpoint_dir, world_size))
            raise
        if not any(child["status"] == "FINISHED" for child in children):
            if main_process:
                checkpoint.remove_finished(directory)  # nothing to resume
            raise NonFiniteLossError(f"every run of the sweep diverged (lr {grid['lr']}): "
                                     "expected at least one finite training loss; try a "
                                     "lower --lr or fp32")
        if not main_process:
            return
        tables = _summary(children, first)
    checkpoint.remove_finished(directory)  # the sweep is over
    _print_table(*tables, parent_id)


def _summary(children: list[dict], first: TrainConfig) -> tuple[pd.DataFrame, ...]:
    """The sweep's tables, logged on the parent run: its children ranked by the selection, then
    the other score (diverged ones last, unranked); each recipe over its seeds or folds, or None."""
    order = sorted(("validation_loss", "symptom_f1"), key=lambda name: name != first.select_by)
    table = pd.DataFrame(children).sort_values(
        order, ascending=[name == "validation_loss" for name in order])
    table.insert(0, "rank", [str(rank) if status == "FINISHED" else "-" for rank, status
                             in enumerate(table["status"], start=1)])
    table["best_epoch"] = table["best_epoch"].astype("Int64")
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
    return "fold" in table and table["fold"].nunique() > 1


def _ranked(by_fold: pd.DataFrame | None, first: TrainConfig) -> pd.DataFrame | None:
    """The recipes by their mean ``select_by``, those that finished every fold first."""
    if by_fold is None:
        return None
    by_fold.insert(0, "complete", by_fold["folds"].str.split().str.len() == first.folds)
    return by_fold.sort_values(["complete", first.select_by],
                               ascending=[False, first.select_by == "validation_loss"],
                               kind="stable").reset_index(drop=True)


def _by_recipe(table: pd.DataFrame, axes: tuple[str, ...],
               by_fold: pd.DataFrame | None) -> pd.DataFrame:
    """A cross-validation's children in recipe order (its rank over the folds), then fold."""
    recipe_axes = [name for name in axes if name not in ("fold", "seed")]
    ranks = ({tuple(row): str(rank) for rank, row in
              enumerate(by_fold[recipe_axes].itertuples(index=False, name=None), start=1)}
             if by_fold is not None else {})
    table["rank"] = [ranks.get(tuple(row), "-") if status == "FINISHED" else "-"
                     for row, status in zip(table[recipe_axes].itertuples(index=False, name=None),
                                            table["status"], strict=True)]
    order = table["rank"].map(lambda rank: int(rank) if rank != "-" else len(table) + 1)
    return (table.assign(order=order).sort_values(["order", *[n for n in axes if n != "fold"],
                                                   "fold"], kind="stable")
            .drop(columns="order").reset_index(drop=True))


def _print_table(table: pd.DataFrame, by_seed: pd.DataFrame | None,
                 by_fold: pd.DataFrame | None, parent_id: str) -> None:
    """The sweep's table, best first; each recipe over its seeds or folds; where the best is."""
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

        def mean(score: str) -> str:  # "0.2412 ± 0.0310 [0.2027-0.2797]"
            return (f"{top[score]:.4f} ± {top[f'{score}_std']:.4f} "
                    f"[{top[f'{score}_ci_low']:.4f}-{top[f'{score}_ci_high']:.4f}]")

        log.info("cross-validated over %d folds (mean ± sd [%s interval]): symptom F1 %s "
                 "(no model: constant %.3f, lookup %.3f; untuned %.3f), word F1 %s, validation "
                 "loss %s; parent run %s", len(top["folds"].split()), f"{CONFIDENCE:.0%}",
                 mean("symptom_f1"), *(top.get(name, math.nan) for name in (
                     "baseline_constant_symptom_f1", "baseline_lookup_symptom_f1",
                     "untuned_symptom_f1")), mean("word_f1"), mean("validation_loss"),
                 parent_id)
    else:
        log.warning("no recipe finished every fold: no cross-validated figure; parent run %s",
                    parent_id)


def run(configs: list[TrainConfig], grid: dict[str, list], started: float | None = None,
        resume: str | None = None) -> None:
    """One run, or a sweep (``grid``: the swept values) under a parent run; ``resume``: the
    interrupted run or sweep parent they go on with. Bad input (``HubUnavailable`` too) is raised
    before any MLflow run starts; a Hub failure later on is a plain error."""
    if len(configs) > 1 and any(config.promote for config in configs):
        raise MedLMError("--promote with a sweep is invalid: expected one run (a sweep "
                         "would crown every child in turn; promote its best child's "
                         "version afterwards, in mlflow ui)")
    recipe.check_output_paths(configs[0])
    run = recipe.Run(configs[0], started).setup()  # a Hub, data or LoRA error first, alone
    if resume:  # only on the rows and split it was trained on
        recipe.check_resume_data(Path(configs[0].checkpoint_dir) / resume, run.data, run.split)
    run_ids = [resume] if resume else []  # the run's (a sweep's: its parent's) id, once known
    try:
        with recipe.resumable_failures(configs[0].checkpoint_dir, run_ids):
            if len(configs) > 1:
                run_sweep(configs, grid, run, resume, started=run_ids.append)
                return
            run.execute(resume_run_id=resume, started=run_ids.append)
    except HubUnavailable as error:  # not the "start offline instead" of a failed setup
        raise MedLMError(str(error)) from None


def resume(run_id: str, settings: dict, started: float | None = None) -> None:
    """Continue the interrupted run, or sweep (a parent run id), ``run_id`` with its own settings
    under ``settings`` (``experiments.run.resume_settings``; ``epochs``: the run's new total).
    What it resumes (the checkpoint, the MLflow run) is checked before any data or model loads."""
    here = dict(settings)
    epochs, directory = here.pop("epochs", None), Path(here["checkpoint_dir"]) / run_id
    sweep = saved_sweep(run_id)  # its parent run says so
    if sweep and epochs is not None:
        raise MedLMError(f"--epochs with --resume of sweep {run_id!r} is invalid: expected "
                         "no --epochs (a sweep resumes with its own grid)")
    configs, grid, processes = sweep or (
        [recipe.resume_config(run_id, here["checkpoint_dir"])], {}, None)
    # this process's from here (a resume while another process trains it is refused), let go
    # if the resume fails; under torchrun only rank 0 talks to MLflow and writes files
    with checkpoint.trained_here(directory) if distributed.is_main() else (
            contextlib.nullcontext()):
        if distributed.is_main():
            try:
                MlflowClient().get_run(run_id)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise MedLMError(f"--resume {run_id!r}: no such run in the tracking store "
                                 f"{shown_tracking_uri()} (its checkpoint is in {directory}): "
                                 "expected the tracking store it was started with "
                                 "(MLFLOW_TRACKING_URI as it was then)") from None
        changed = {name: value for name, value in here.items()
                   if name in ("device", "precision") and getattr(configs[0], name) != value}
        if changed:  # said once, for a sweep too
            log.info("resuming %s with %s (it ran with %s)", run_id,
                     ", ".join(f"--{name} {value}" for name, value in changed.items()),
                     ", ".join(f"--{name} {getattr(configs[0], name)}" for name in changed))
        configs = [replace(config, **here) for config in configs]
        if sweep and processes != distributed.environment_world_size():
            raise MedLMError(f"--resume {run_id!r}: the sweep ran in {processes} processes, "
                             f"this is {distributed.environment_world_size()}: expected the "
                             "same process count")
        if sweep and not (directory / recipe.DATA_FILE).is_file():
            raise MedLMError(f"--resume {run_id!r}: the sweep has nothing to resume in "
                             f"{directory}: expected the --checkpoint-dir of a sweep that was "
                             "interrupted")
        config = configs[0]
        if epochs is not None and epochs != config.epochs:  # the run saves it as it reopens
            done = len(checkpoint.saved_epochs(directory))
            if epochs < done:
                raise MedLMError(f"--epochs {epochs} with --resume {run_id!r} is invalid: the "
                                 f"run has completed {done} epochs: expected at least {done}")
            log.info("run %s: %d epochs in all instead of %d%s", run_id, epochs, config.epochs,
                     "" if config.scheduler == "constant" else
                     f" (the {config.scheduler} learning-rate schedule is spread over the new "
                     "total from the next step on)")
            configs = [replace(config, epochs=epochs)]
        run(configs, grid, started, resume=run_id)
