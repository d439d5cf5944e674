"""What ``python -m experiments.run`` calls: ``run`` (one configuration, or a sweep of them)
and ``resume`` (an interrupted run or sweep), and what ``python -m experiments.search`` calls:
``search``; each checks what it can before any MLflow run starts."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medlm import distributed
from medlm.checkpoint import saved_epochs, trained_here, write_durably
from medlm.config import TrainConfig
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable
from medlm.recipe import (
    check_output_paths,
    check_resume_data,
    on_this_machine,
    prepare,
    resolve_lora_rank,
    resumable_failures,
    resume_config,
    train_and_register,
)
from medlm.search import SearchOptions, check_comparable, run_search
from medlm.store import shown_tracking_uri
from medlm.sweep import resume_sweep, run_sweep, saved_sweep

log = logging.getLogger("medlm")


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
    prepared = prepare(configs[0], started)  # a Hub or data error first, alone on its line
    # each run's LoRA decision (and its errors) before any MLflow run, a sweep's parent included
    configs = [resolve_lora_rank(config) for config in configs]
    run_ids: list[str] = []  # the run's (a sweep's: its parent's) id, for the outage message
    try:
        with resumable_failures(configs[0].checkpoint_dir, run_ids):
            if len(configs) == 1:
                train_and_register(configs[0], prepared, started=run_ids.append)
            else:
                run_sweep(configs, grid, prepared, started=run_ids.append)
    except HubUnavailable as error:  # not the "start offline instead" of a failed setup
        raise MedLMError(str(error)) from None


def search(config: TrainConfig, space: dict, options: SearchOptions,
           started: float | None = None) -> None:
    """A hyperparameter search (``medlm.search``) of ``config`` over ``space``: the data and
    model checked and loaded before the study is joined or a run started."""
    check_comparable(space, config.select_by)
    check_output_paths(config)
    prepared = prepare(config, started)
    try:
        run_search(config, space, options, prepared)
    except HubUnavailable as error:
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
        prepared = prepare(config, started)
        check_resume_data(Path(checkpoint_dir) / run_id, prepared.data, prepared.split)
        if epochs is not None and distributed.is_main():  # accepted: a later resume keeps it
            write_durably(Path(checkpoint_dir) / run_id / "config.json",
                          json.dumps(asdict(config), indent=2))
        with resumable_failures(checkpoint_dir, [run_id]):
            train_and_register(config, prepared, resume_run_id=run_id)
