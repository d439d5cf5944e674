"""A hyperparameter search on Optuna: each trial a run of ``medlm.recipe`` under one parent
run, pruned after an epoch that is clearly worse than the trials before it, in a study that
any number of processes, on any number of machines, join by running the same command against
the same storage. The parent's run id is kept in the study, so every process nests its trials
under it; the best trial's settings and scores are kept on the parent."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus, RunTag
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from medlm import stop
from medlm.config import sweep_value
from medlm.errors import DiskFull, MedLMError
from medlm.heldout import SUMMARY_SCORES, interval_text
from medlm.processes import is_gone, this_process
from medlm.recipe import Prepared, resolve_lora_rank, train_and_register
from medlm.registry import KEY_PARAMS_BY_SELECTION, SPLIT_KEY_PARAMS
from medlm.report import run_description
from medlm.space import contains, describe
from medlm.store import launched_by, without_password
from medlm.tracking import (
    DESCRIPTION_TAG,
    end_abandoned_run,
    param_value,
    project_parent,
    training_experiment,
)
from medlm.train import EpochResult, Logger, NonFiniteLossError, RunStopped

log = logging.getLogger("medlm")

LOCAL_STORAGE = "medlm-search.journal"  # the study beside the runs when no --storage is given
PARENT_ATTR = "mlflow_parent_run_id"  # the study's user attribute that names its parent run
SETTINGS_ATTR = "medlm_settings"  # what every trial shares: a joining process must match it
PARENT_WAIT_SEC = 300  # how long a joining process waits for the creator to start the parent
# the settings of this machine, not of the search: a joining process may differ in them
MACHINE = ("device", "precision", "progress", "system_metrics", "checkpoint_dir",
           "collective_timeout_min")


@dataclass
class SearchOptions:
    """How the search runs: its study and where it is stored, how many trials in all, and
    how trials are drawn and pruned."""
    study: str = "medlm-search"
    storage: str | None = None  # None: LOCAL_STORAGE; a URL: a database (postgresql://...)
    trials: int = 12
    sampler: str = "tpe"  # tpe | random
    pruner: str = "median"  # median | none
    seed: int = 42
    startup_trials: int = 4  # trials the pruner and TPE see before they act
    replay: str | None = None  # a study in the same storage whose trials a new study runs first


def check_comparable(space: dict[str, BaseDistribution], select_by: str) -> None:
    """Trials are compared by ``select_by``: a setting that changes what it measures (the
    champion rule's evaluation key: the validation loss's tokens, F1's answer length) cannot
    be searched by it."""
    measured = set(KEY_PARAMS_BY_SELECTION[select_by]) - set(SPLIT_KEY_PARAMS)  # unsearchable
    changes = sorted(name for name in space
                     if name in measured or f"{name}_effective" in measured)
    if changes:
        other = "symptom_f1" if select_by == "validation_loss" else "validation_loss"
        raise MedLMError(f"--param {', '.join(changes)} with --select-by {select_by} is "
                         f"invalid: it changes what {select_by} measures, so trials could "
                         f"not be compared: expected --select-by {other}, or a space "
                         "without it")


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """The study's storage: a database URL (PostgreSQL for a team: trials' heartbeats let a
    process that died mid-trial be noticed and its trial run again), or a local journal file,
    which Optuna's file locks make safe for several processes on one machine (SQLite is not:
    it locks the whole database for each write)."""
    url = url or LOCAL_STORAGE
    if "://" not in url:
        Path(url).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(Path(url).expanduser())))
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3: MedLM's PostgreSQL driver
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    def database() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                          heartbeat_stale_trial_callback=_rerun_stale_trial)

    for attempt in range(5):
        try:
            return database()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # another process is creating the tables of a new database at the same moment
            time.sleep(1 + attempt)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy's errors name the cause
            reason = (str(error).strip().splitlines()[0] if str(error).strip()
                      else type(error).__name__)
            raise MedLMError(f"--storage {without_password(url)!r} cannot be opened ({reason}): "
                             "expected a reachable database URL (postgresql://user:password@"
                             "host:port/db) or a file path") from None
    return database()


def _run_again(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose process died: its settings queued to run again, once (a trial that kills
    its process each time is not retried for ever; a Ctrl-C is not a death)."""
    if trial.user_attrs.get("died", 0) >= 1:
        log.warning("trial %d: its process died, as the run it repeats did; not run again",
                    trial.number)
        return
    study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number, "died": 1})


def _rerun_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose process is gone (killed, its machine gone; a database tells by its
    heartbeat, a journal file by ``fail_dead_trials``): queued to run again, and its MLflow
    run marked KILLED."""
    _run_again(study, trial)
    if trial.user_attrs.get("run_id"):
        try:
            end_abandoned_run(trial.user_attrs["run_id"])
        except Exception as error:  # noqa: BLE001 - the store is down: the trial runs again
            log.warning("could not mark trial %d's run KILLED: %s", trial.number, error)


def fail_dead_trials(study: optuna.Study) -> None:
    """Trials of a journal file left RUNNING by a process of this machine that is gone
    (SIGKILL, a crash; a journal has no heartbeat to tell): failed, and run again."""
    if not isinstance(study._storage, optuna.storages.JournalStorage):
        optuna.storages.fail_stale_trials(study)  # a database's heartbeats tell
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_gone(str(trial.user_attrs.get("process", ""))):
            continue
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        if failed:
            log.warning("trial %d: its process (%s) is gone; it runs again", trial.number,
                        trial.user_attrs.get("host"))
            _rerun_stale_trial(study, trial)


def _sampler(options: SearchOptions, created: bool) -> optuna.samplers.BaseSampler:
    """TPE (constant liar: a trial running elsewhere counts as a poor one, so processes do not
    draw the same point) or random. The process that created the study draws from ``seed``;
    one that joins it from its own seed, so the processes do not repeat each other's draws."""
    seed = options.seed if created else hash((options.seed, socket.gethostname(), os.getpid()))
    seed %= 2**32
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=options.startup_trials)


def _pruner(options: SearchOptions) -> optuna.pruners.BasePruner:
    """After an epoch, a trial whose value is worse than the median of the trials before it at
    the same epoch stops (once ``startup_trials`` trials have finished); ``none``: never."""
    if options.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials,
                                       n_warmup_steps=0)


def search_settings(config, space: dict[str, BaseDistribution]) -> str:
    """What every trial of a study shares (the settings not searched, not this machine's, and
    the space), as the study keeps it."""
    shared = {name: param_value(value) for name, value in config.to_params().items()
              if name not in space and name not in MACHINE}
    return json.dumps({"settings": shared, "space": describe(space)}, sort_keys=True)


def join_study(options: SearchOptions, direction: str,
               settings: str) -> tuple[optuna.Study, bool]:
    """The study ``options.study``, created if it is new (then True) or joined; a joining
    process whose settings or direction differ from the study's is refused."""
    storage = open_storage(options.storage)
    created = True
    try:
        study = optuna.create_study(storage=storage, study_name=options.study,
                                    direction=direction, sampler=_sampler(options, True),
                                    pruner=_pruner(options))
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        try:
            study = optuna.load_study(study_name=options.study, storage=storage,
                                      sampler=_sampler(options, False), pruner=_pruner(options))
        except KeyError:  # its creator failed and took it away
            raise MedLMError(_REMOVED.format(options.study)) from None
    if created:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return study, True
    study = _wait_for(study, SETTINGS_ATTR, options)
    kept = study.user_attrs[SETTINGS_ATTR]
    if study.direction.name.lower() != direction or kept != settings:
        theirs, ours = json.loads(kept), json.loads(settings)
        differ = sorted(name for name in {*theirs.get("settings", {}), *ours["settings"]}
                        if theirs.get("settings", {}).get(name) != ours["settings"].get(name))
        if theirs.get("space") != ours["space"]:
            differ.append(f"the space ({theirs.get('space')})")
        raise MedLMError(f"--study {options.study!r} exists with other settings "
                         f"({', '.join(differ) or 'the direction'}): expected the same "
                         "settings as the processes that began it, or a new --study name")
    return study, False


def replayed(options: SearchOptions, settings: str) -> list[tuple[int, dict[str, Any]]]:
    """Each trial that ran in ``options.replay`` (a study of the same settings and space: the
    same trials under another pruner or sampler), as its number and settings, in its order;
    checked before the new study is created."""
    if not options.replay:
        return []
    try:
        source = optuna.load_study(study_name=options.replay,
                                   storage=open_storage(options.storage))
    except KeyError:
        raise MedLMError(f"--replay {options.replay!r} is not a study in this --storage: "
                         "expected the name of an earlier search's --study") from None
    if source.user_attrs.get(SETTINGS_ATTR) != settings:
        raise MedLMError(f"--replay {options.replay!r} was run with other settings or another "
                         "space: expected the same flags as that search (only --pruner, "
                         "--sampler and --study may differ)")
    ran = [trial for trial in source.get_trials(deepcopy=False)  # each setting once: not
           if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)  # what failed and ran
           or "diverged" in trial.user_attrs]  # again, nor what is queued or running
    return [(trial.number, trial.params) for trial in sorted(ran, key=lambda t: t.number)]


def queue_first(study: optuna.Study, config, space: dict[str, BaseDistribution],
                replay: list[tuple[int, dict[str, Any]]]) -> None:
    """What a new study runs first: the trials it replays, else the recipe as given, where
    the space holds it."""
    for number, params in replay:
        study.enqueue_trial(params, user_attrs={"replay_of": number})
    recipe = vars(resolve_lora_rank(config))  # a LoRA recipe's rank as its runs train it
    if not replay and contains(space, recipe):
        study.enqueue_trial({name: recipe[name] for name in space},
                            user_attrs={"recipe": config.recipe})


def _parent_params(config, space: dict[str, BaseDistribution], options: SearchOptions) -> dict:
    params = {name: value for name, value in config.to_params().items() if name not in space}
    return {**params, "search_space": describe(space), "search_study": options.study,
            "search_storage": without_password(options.storage or LOCAL_STORAGE),
            "search_sampler": options.sampler, "search_pruner": options.pruner,
            "search_trials": options.trials,
            **({"search_replay": options.replay} if options.replay else {})}


def _wait_for(study: optuna.Study, attr: str, options: SearchOptions) -> optuna.Study:
    """The study once its creator has set ``attr`` (it sets its settings, then starts the
    parent run, just after creating it)."""
    deadline = time.monotonic() + PARENT_WAIT_SEC
    try:
        while attr not in study.user_attrs:
            if time.monotonic() > deadline:
                raise MedLMError(f"--study {options.study!r} has no {attr} after "
                                 f"{PARENT_WAIT_SEC} s: expected the process that created it "
                                 "to set it (it may have failed: delete the study, or use a "
                                 "new --study name)")
            time.sleep(2)
            study = optuna.load_study(study_name=study.study_name, storage=study._storage,
                                      sampler=study.sampler, pruner=study.pruner)
    except KeyError:  # its creator failed and took it away
        raise MedLMError(_REMOVED.format(options.study)) from None
    return study


_REMOVED = ("--study {!r} was removed by the process that created it, which failed: expected "
            "the command to be run again")


def _start_parent(study: optuna.Study, config, space, options: SearchOptions) -> str:
    """The search's parent run, created by the process that created the study; its id kept
    in the study."""
    client = MlflowClient()
    experiment_id = training_experiment(config.experiment)
    launcher, parent_of = launched_by(), project_parent(experiment_id)  # `mlflow run -e search`
    run = client.create_run(
        experiment_id,
        run_name=config.run_name or f"search {options.study}",
        tags={DESCRIPTION_TAG: f"Optuna search {options.study!r}: {options.trials} trials of "
                               f"{config.model}, recipe {config.recipe}, varying "
                               f"{describe(space)}",
              "medlm.search_study": options.study,
              **({"mlflow.parentRunId": parent_of} if parent_of else {}),
              **({"medlm.launched_by_run": launcher} if launcher else {})})
    try:
        if launcher:  # each run names the other
            client.set_tag(launcher, "medlm.run_id", run.info.run_id)
        _describe_parent(client, run.info.run_id, study, config, space, options)
    except BaseException:
        try:
            client.set_terminated(run.info.run_id, "FAILED")
        except Exception as error:  # noqa: BLE001 - the store is down: its error is the one
            log.warning("could not mark the search's parent run FAILED: %s", error)
        raise
    return run.info.run_id


def _describe_parent(client: MlflowClient, run_id: str, study: optuna.Study, config, space,
                     options: SearchOptions) -> None:
    client.log_batch(run_id, params=[Param(name, str(param_value(value))[:6000])
                                              for name, value in
                                              _parent_params(config, space, options).items()])
    study.set_user_attr(PARENT_ATTR, run_id)


def parent_run(study: optuna.Study, created: bool, config, space,
               options: SearchOptions) -> str:
    """The parent run's id: started here if this process created the study, else the one the
    creator keeps in it (waited for, while the creator sets up); marked RUNNING again when a
    process joins or resumes the search."""
    if created:
        return _start_parent(study, config, space, options)
    parent_id = _wait_for(study, PARENT_ATTR, options).user_attrs[PARENT_ATTR]
    MlflowClient().update_run(parent_id, status="RUNNING")
    return parent_id


class Pruning(Logger):
    """The trial's value after each epoch, told to Optuna; a trial the pruner stops ends its
    run (``RunStopped``: KILLED) after the epoch is logged."""

    def __init__(self, trial: optuna.Trial, select_by: str):
        self.trial, self.select_by = trial, select_by
        self.pruned_after: int | None = None

    def on_epoch_end(self, model, result: EpochResult) -> None:
        value = result.validation_loss if self.select_by == "validation_loss" else (
            result.scores.get(self.select_by, math.nan))
        self.trial.report(value, result.epoch)
        if self.trial.should_prune():
            self.pruned_after = result.epoch
            raise RunStopped(f"trial {self.trial.number} pruned after epoch {result.epoch}")


def suggest(trial: optuna.Trial, name: str, drawn: BaseDistribution) -> Any:
    if isinstance(drawn, CategoricalDistribution):
        return trial.suggest_categorical(name, drawn.choices)
    if isinstance(drawn, FloatDistribution):
        return trial.suggest_float(name, drawn.low, drawn.high, log=drawn.log)
    return trial.suggest_int(name, drawn.low, drawn.high, log=drawn.log)


def _counted(study: optuna.Study) -> int:
    """Trials that have used up the search's budget, or are using it: all but those queued
    (they will run) and those an interruption failed (queued again)."""
    return sum(1 for trial in study.get_trials(deepcopy=False)
               if trial.state not in (TrialState.FAIL, TrialState.WAITING)
               or "diverged" in trial.user_attrs)


class _Trials:
    """The objective: each trial a child run of the parent with the drawn settings."""

    def __init__(self, config, space, prepared: Prepared, parent_id: str):
        self.config, self.space, self.prepared, self.parent_id = config, space, prepared, parent_id
        self.fresh_model = True  # prepared.model is the untouched base

    def _model(self) -> None:
        if not self.fresh_model:  # each trial from the base, its time from its own start
            self.prepared.reload_model(self.config.model)
        self.fresh_model = False

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")  # as shown
        trial.set_user_attr("process", this_process())  # as medlm.processes tells it gone
        drawn = {name: suggest(trial, name, value) for name, value in self.space.items()}
        config = replace(self.config, **drawn, run_name=f"trial {trial.number}")
        log.info("--- trial %d: %s", trial.number,
                 " ".join(f"{name}={sweep_value(value)}" for name, value in drawn.items()))
        pruning = Pruning(trial, config.select_by)
        try:
            self._model()
            result = train_and_register(
                config, self.prepared, parent_run_id=self.parent_id, loggers=[pruning],
                started=lambda run_id: trial.set_user_attr("run_id", run_id))
        except RunStopped:
            self._forget(trial, config, ("medlm.pruned_after_epoch", pruning.pruned_after),
                         f"pruned after epoch {pruning.pruned_after}")
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_after}") from None
        except NonFiniteLossError as error:  # marked, and the search goes on
            trial.set_user_attr("diverged", str(error))
            self._forget(trial, config, ("medlm.diverged", "true"), "diverged")
            log.warning("trial %d FAILED: %s", trial.number, error)
            return math.nan
        except (KeyboardInterrupt, DiskFull) as error:  # run again, from its start, when the
            trial.study.enqueue_trial(drawn, user_attrs={  # search resumes
                "rerun_of": trial.number, "died": trial.user_attrs.get("died", 0)})
            self._forget(trial, config, ("medlm.rerun_by_search", "true"),
                         "interrupted; the search runs these settings again when resumed")
            if isinstance(error, DiskFull):  # its checkpoint is gone: the trial starts again
                raise MedLMError(f"{error.failed}: expected free space there, then the same "
                                 f"search command again (it runs trial {trial.number}'s "
                                 "settings again from the start)") from None
            raise
        for name in ("best_epoch", "validation_loss", *SUMMARY_SCORES, "version"):
            value = result.get(name)
            trial.set_user_attr(name, None if isinstance(value, float) and math.isnan(value)
                                else value)
        return result[config.select_by]

    def _forget(self, trial: optuna.Trial, config, tag: tuple[str, Any], ended: str) -> None:
        """A stopped trial's checkpoint removed (nothing will resume it), its run tagged and
        its description saying how it ended."""
        run_id = trial.user_attrs.get("run_id")
        if not run_id:
            return
        shutil.rmtree(Path(self.config.checkpoint_dir) / run_id, ignore_errors=True)
        try:
            MlflowClient().log_batch(run_id, tags=[
                RunTag(tag[0], str(tag[1])),
                RunTag(DESCRIPTION_TAG, f"{run_description(config).removesuffix(': training')}"
                                        f": trial {trial.number}, {ended}")])
        except Exception as error:  # noqa: BLE001 - the store is down: the trial's end stands
            log.warning("could not tag trial %d's run: %s", trial.number, error)


def _note_best(parent_id: str, select_by: str):
    """An Optuna callback: after each trial, the study's best so far on the parent run (its
    settings as tags, its scores as metrics at the trial's number)."""

    def note(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        try:
            best = study.best_trial
        except ValueError:
            return
        if best.number != trial.number:
            return
        attrs = best.user_attrs
        metrics = {f"best_{name}": attrs[name] for name in ("validation_loss", *SUMMARY_SCORES)
                   if isinstance(attrs.get(name), int | float)}
        tags = {"best_trial": best.number, "best_run_id": attrs.get("run_id", ""),
                "best_version": attrs.get("version") or "",
                **{f"best_{name}": value for name, value in best.params.items()}}
        MlflowClient().log_batch(
            parent_id, metrics=[mlflow.entities.Metric(name, value, int(time.time() * 1000),
                                                       best.number)
                                for name, value in metrics.items()],
            tags=[RunTag(name, str(value)) for name, value in tags.items()])
        log.info("best so far: trial %d (%s %s)", best.number, select_by,
                 interval_text(attrs, select_by, 4) if select_by in attrs else best.value)

    return note


def _budget(total: int):
    """An Optuna callback: this process stops once the study holds ``total`` trials (those of
    every process, running ones included)."""

    def check(study: optuna.Study, trial: FrozenTrial) -> None:
        fail_dead_trials(study)  # a process that died since: its trial counts no more
        if _counted(study) >= total:
            study.stop()

    return check


def _close_parent(study: optuna.Study, parent_id: str, status: int) -> None:
    """The parent run ended as ``status`` when no other process is running a trial; else it
    stays RUNNING for the last one to end."""
    fail_dead_trials(study)
    if not any(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False)):
        MlflowClient().set_terminated(parent_id, RunStatus.to_string(status))


def run_search(config, space: dict[str, BaseDistribution], options: SearchOptions,
               prepared: Prepared) -> optuna.Study:
    """Join (or begin) the study and run trials until it holds ``options.trials``; the recipe
    as given is its first trial where the space holds it. Ctrl-C stops this process: the
    trial it was running is queued to run again when the same command is given again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # MedLM says what each trial did
    direction = "minimize" if config.select_by == "validation_loss" else "maximize"
    settings = search_settings(config, space)
    replay = replayed(options, settings)
    study, created = join_study(options, direction, settings)
    try:
        if created:
            queue_first(study, config, space, replay)
        parent_id = parent_run(study, created, config, space, options)
    except BaseException:
        if created:  # else a joining process would wait for a parent that never comes
            optuna.delete_study(study_name=options.study, storage=study._storage)
        raise
    if options.replay and not created:
        log.info("--replay %s: the study %r exists, so its queue stands", options.replay,
                 options.study)
    fail_dead_trials(study)
    left = options.trials - _counted(study)
    log.info("search %r (%s): %d of %d trials %s, under parent run %s", options.study,
             without_password(options.storage or LOCAL_STORAGE), options.trials - max(left, 0),
             options.trials, "begun before" if not created else "so far", parent_id)
    try:
        if left > 0:
            # until the study holds its trials (_budget): a trial of a process that died
            # since, failed and queued again, is run here too
            study.optimize(_Trials(config, space, prepared, parent_id), n_trials=None,
                           callbacks=[_budget(options.trials),
                                      _note_best(parent_id, config.select_by),
                                      # a SIGTERM whose raise was lost (medlm.stop)
                                      lambda study, trial: stop.raise_if_asked()])
    except KeyboardInterrupt:
        _close_parent(study, parent_id, RunStatus.KILLED)
        log.warning("search stopped; the same command again resumes it (the interrupted "
                    "trial runs again)")
        raise
    except BaseException:
        _close_parent(study, parent_id, RunStatus.FAILED)
        raise
    _close_parent(study, parent_id, RunStatus.FINISHED)
    table = trials_table(study)
    MlflowClient().log_text(parent_id, table.to_csv(index=False), "search_trials.csv")
    with pd.option_context("display.width", 160, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    log.info("%s", pruning_summary(table))
    return study


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial of the study: its number, state, settings, value, scores, duration, host
    and run, best first."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        state = "DIVERGED" if "diverged" in attrs else trial.state.name
        rows.append({"trial": trial.number, "state": state, **trial.params,
                     "value": trial.value, "best_epoch": attrs.get("best_epoch"),
                     **{name: attrs.get(name) for name in SUMMARY_SCORES},
                     "epochs_run": (max(trial.intermediate_values) if trial.intermediate_values
                                    else None),
                     "seconds": (trial.duration.total_seconds() if trial.duration else None),
                     "host": attrs.get("host"), "run_id": attrs.get("run_id"),
                     "version": attrs.get("version")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["order"] = table["state"].map({"COMPLETE": 0, "PRUNED": 1}).fillna(2)
    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    return (table.sort_values(["order", "value"], ascending=[True, ascending])
            .drop(columns="order").reset_index(drop=True))


def pruning_summary(table: pd.DataFrame) -> str:
    """How many trials were pruned, and the time they ran against a finished trial's."""
    if table.empty:
        return "no trials"
    complete, pruned = table[table["state"] == "COMPLETE"], table[table["state"] == "PRUNED"]
    running, queued = ((table["state"] == state).sum() for state in ("RUNNING", "WAITING"))
    text = (f"{len(complete)} trials finished, {len(pruned)} pruned, "
            + (f"{running} running, " if running else "")
            + (f"{queued} queued, " if queued else "")
            + f"{(~table['state'].isin(['COMPLETE', 'PRUNED', 'RUNNING', 'WAITING'])).sum()} "
            "failed or interrupted")
    if len(pruned) and len(complete):
        text += (f"; a pruned trial ran {pruned['seconds'].mean():.0f} s on average, a "
                 f"finished one {complete['seconds'].mean():.0f} s")
    return text
