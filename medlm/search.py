"""A hyperparameter search on Optuna: each trial a run of ``medlm.recipe`` under one parent
run, pruned after an epoch that is clearly worse than the trials before it, in a study that
any number of processes, on any number of machines, join by running the same command against
the same storage. The parent's run id is kept in the study, so every process nests its trials
under it; the best trial's settings and scores are kept on the parent.

A hyperparameter search's space: which settings it varies and over what, from
``--param NAME=SPEC`` flags or a TOML file of the same specs, as Optuna distributions.

A spec is ``LOW..HIGH`` (uniform; a whole-number setting draws whole numbers), ``LOW..HIGH:log``
(log-uniform) or ``A,B,C`` (one of those values); in a file, ``lr = "1e-4..3e-3:log"`` or
``lora_rank = [8, 16, 32]``. Every bound and value is checked by its setting's own rule
(``medlm.config``), so a search never proposes what a run would refuse."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
import tomllib
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus, RunTag
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from medlm import stop
from medlm.config import DEFAULT_SPACE, NOT_RECIPE, TrainConfig, setting_kinds, sweep_value
from medlm.errors import DiskFull, MedLMError
from medlm.hub import HubUnavailable
from medlm.recipe import Run, check_output_paths, resolve_lora_rank
from medlm.registry import KEY_PARAMS_BY_SELECTION, SPLIT_KEY_PARAMS
from medlm.report import run_description
from medlm.scores import SUMMARY_SCORES, interval_text
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

LOCAL_STORAGE = "medlm-search.db"  # the study beside the runs when no --storage is given
OLD_LOCAL_STORAGE = "medlm-search.journal"  # an older MedLM's default: refused, named
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
    storage: str | None = None  # None: LOCAL_STORAGE; a SQLite file or a database URL
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


def open_storage(url: str | None) -> optuna.storages.RDBStorage:
    """The study's database: a SQLite file (``LOCAL_STORAGE`` by default; a few processes of
    one machine) or a URL (PostgreSQL for a team). Each trial's process sends a heartbeat; a
    trial whose heartbeat has stopped (its process killed, its machine gone) is failed by the
    next process to begin or end a trial, and run again once."""
    if url is None and Path(OLD_LOCAL_STORAGE).is_file() and not Path(LOCAL_STORAGE).is_file():
        url = OLD_LOCAL_STORAGE  # an older MedLM's study here: refused below, not started anew
    url = url or LOCAL_STORAGE
    if url.endswith(".journal"):
        raise MedLMError(f"--storage {url!r} is an Optuna journal file (an older MedLM's "
                         "default), which has no heartbeat to tell a dead process's trial: "
                         f"expected a SQLite file ({LOCAL_STORAGE}) or a database URL "
                         "(postgresql://user:password@host:port/db); a search of the journal "
                         "is finished with the MedLM that started it")
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3: MedLM's PostgreSQL driver
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    attempts = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                              heartbeat_stale_trial_callback=_rerun_stale_trial)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy's errors name the cause
            attempts += 1
            if attempts < 5 and (isinstance(error, sqlalchemy.exc.IntegrityError | sqlalchemy.exc
                                            .ProgrammingError) or "already exists" in str(error)):
                time.sleep(attempts)  # another process is making a new database's tables
                continue
            reason = (str(error).strip().splitlines()[0] if str(error).strip()
                      else type(error).__name__)
            raise MedLMError(f"--storage {without_password(url)!r} cannot be opened ({reason}): "
                             "expected a reachable database URL (postgresql://user:password@"
                             "host:port/db) or a SQLite file path") from None


def _rerun_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose heartbeat stopped: queued to run again, once (a trial that kills its
    process each time is not retried for ever), and its MLflow run marked KILLED."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    retry(study, trial)
    log.warning("trial %d: its process is gone; %s", trial.number,
                "not run again (it was a re-run)" if retry.retry_history(trial)
                else "it runs again")
    if trial.user_attrs.get("run_id"):
        try:
            end_abandoned_run(trial.user_attrs["run_id"])
        except Exception as error:  # noqa: BLE001 - the store is down: the trial runs again
            log.warning("could not mark trial %d's run KILLED: %s", trial.number, error)


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

    def __init__(self, config, space, run: Run, parent_id: str):
        self.config, self.space, self.run, self.parent_id = config, space, run, parent_id

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        drawn = {name: suggest(trial, name, value) for name, value in self.space.items()}
        config = replace(self.config, **drawn, run_name=f"trial {trial.number}")
        log.info("--- trial %d: %s", trial.number,
                 " ".join(f"{name}={sweep_value(value)}" for name, value in drawn.items()))
        pruning = Pruning(trial, config.select_by)
        try:
            self.run = self.run.next(config)  # each trial from the untouched base
            result = self.run.execute(
                parent_run_id=self.parent_id, loggers=[pruning],
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
        except (KeyboardInterrupt, DiskFull) as error:  # run again, from its start, on resume
            trial.study.enqueue_trial(drawn, user_attrs={"rerun_of": trial.number})
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
        optuna.storages.fail_stale_trials(study)  # a process that died: its trial counts no more
        if _counted(study) >= total:
            study.stop()

    return check


def _close_parent(study: optuna.Study, parent_id: str, status: int) -> None:
    """The parent run ended as ``status`` when no other process is running a trial; else it
    stays RUNNING for the last one to end."""
    optuna.storages.fail_stale_trials(study)
    if not any(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False)):
        MlflowClient().set_terminated(parent_id, RunStatus.to_string(status))


def run_search(config, space: dict[str, BaseDistribution], options: SearchOptions,
               run: Run) -> optuna.Study:
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
    optuna.storages.fail_stale_trials(study)
    left = options.trials - _counted(study)
    log.info("search %r (%s): %d of %d trials %s, under parent run %s", options.study,
             without_password(options.storage or LOCAL_STORAGE), options.trials - max(left, 0),
             options.trials, "begun before" if not created else "so far", parent_id)
    try:
        if left > 0:
            # until the study holds its trials (_budget): a trial of a process that died
            # since, failed and queued again, is run here too
            study.optimize(_Trials(config, space, run, parent_id), n_trials=None,
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


# what a search may not vary: where and how runs are tracked and run, the split (every trial
# must hold out the same diseases to be compared), and the selection itself
NOT_SEARCHABLE = NOT_RECIPE | {"model", "dataset", "max_samples", "validation_fraction",
                               "split_seed", "select_by", "sample_prompts", "folds", "fold"}


def searchable() -> dict[str, type]:
    """The settings a search may vary, and their types."""
    kinds = setting_kinds()
    return {name: kind for name, kind in kinds.items()
            if name not in NOT_SEARCHABLE and kind in (int, float, str, bool)}


def _value(name: str, kind: type, text: Any) -> Any:
    """One bound or choice of ``name``, parsed as its setting's type and checked by its rule."""
    declared = next(item for item in fields(TrainConfig) if item.name == name)
    rule, choices = declared.metadata["rule"], declared.metadata["choices"]
    expected = {int: "a whole number", float: "a number", bool: "true or false"}.get(kind)
    try:
        value = (text if not isinstance(text, str) else
                 {"true": True, "false": False}[text.lower()] if kind is bool else
                 float(text) if kind is int else kind(text))
    except (KeyError, ValueError):
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected {expected}") from None
    if kind in (int, float) and not math.isfinite(value):
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected a finite number")
    if kind is int and isinstance(value, float):
        if value != int(value):
            raise MedLMError(f"--param {name}: {text!r} is invalid: expected a whole number")
        value = int(value)
    if choices and value not in choices:
        raise MedLMError(f"--param {name}: {value!r} is invalid: expected one of "
                         f"{', '.join(choices)}")
    if rule is not None and not rule.ok(value):
        raise MedLMError(f"--param {name}: {value!r} is invalid: expected {rule.expected}")
    return value


def distribution(name: str, spec: Any) -> BaseDistribution:
    """The distribution a spec (a string, or a file's list of choices) draws ``name`` from."""
    kinds = searchable()
    if name not in kinds:
        raise MedLMError(f"--param {name!r} is invalid: expected one of "
                         f"{', '.join(sorted(kinds))}")
    kind = kinds[name]
    if isinstance(spec, list):
        spec = ",".join(str(item) for item in spec)
    spec = str(spec).strip()
    if ".." not in spec:
        choices = list(dict.fromkeys(_value(name, kind, item.strip())
                                     for item in spec.split(",") if item.strip()))
        if not choices:
            raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW..HIGH, "
                             "LOW..HIGH:log or A,B,C")
        return CategoricalDistribution(choices)
    bounds, _, scale = spec.partition(":")
    if kind not in (int, float) or scale not in ("", "log"):
        raise MedLMError(f"--param {name}={spec!r} is invalid: expected "
                         + ("A,B,C (it is not a number)" if kind not in (int, float)
                            else "LOW..HIGH or LOW..HIGH:log"))
    low, high = (_value(name, kind, text.strip()) for text in bounds.split("..", 1))
    if not low < high or (scale == "log" and low <= 0):
        raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW < HIGH"
                         + (", both > 0 on a log scale" if scale else ""))
    if kind is int:
        return IntDistribution(low, high, log=scale == "log")
    return FloatDistribution(low, high, log=scale == "log")


def parse_params(specs: list[str]) -> dict[str, str]:
    """``["lr=1e-4..1e-3:log", ...]`` as {name: spec}; a name given twice is refused."""
    parsed: dict[str, str] = {}
    for text in specs:
        name, sep, spec = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not spec.strip():
            raise MedLMError(f"--param {text!r} is invalid: expected NAME=SPEC, e.g. "
                             "lr=1e-4..3e-3:log or lora_rank=8,16,32")
        if name in parsed:
            raise MedLMError(f"--param {name} is given twice: expected one range per setting")
        parsed[name] = spec
    return parsed


def read_space_file(path: str) -> dict[str, Any]:
    """A TOML file of specs, by setting name (``warmup-steps`` as ``warmup_steps``)."""
    try:
        specs = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise MedLMError(f"--space {path!r}: {error.strerror or error}: expected a readable "
                         "TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise MedLMError(f"--space {path!r} is not valid TOML ({error}): expected lines like "
                         "lr = \"1e-4..3e-3:log\"") from None
    named = {name.replace("-", "_"): spec for name, spec in specs.items()}
    if len(named) < len(specs):
        raise MedLMError(f"--space {path!r} names a setting twice (as NAME and its flag "
                         "spelling): expected one range per setting")
    return named


def search_space(specs: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The space of ``specs`` (the default space when there are none), in the order given."""
    return {name: distribution(name, spec) for name, spec in (specs or DEFAULT_SPACE).items()}


def contains(space: dict[str, BaseDistribution], values: dict[str, Any]) -> bool:
    """Do ``values`` (a recipe's, by setting) lie in ``space``? (Then the search may start
    from them.)"""
    for name, drawn in space.items():
        value = values.get(name)
        if isinstance(drawn, CategoricalDistribution):
            if value not in drawn.choices:
                return False
        elif value is None or not drawn.low <= value <= drawn.high:
            return False
    return True


def describe(space: dict[str, BaseDistribution]) -> str:
    """The space in the specs' own words: ``lr=0.0001..0.003:log lora_rank=8,16,32``."""
    words = []
    for name, drawn in space.items():
        if isinstance(drawn, CategoricalDistribution):
            words.append(f"{name}={','.join(str(choice) for choice in drawn.choices)}")
        else:
            words.append(f"{name}={drawn.low:g}..{drawn.high:g}{':log' if drawn.log else ''}")
    return " ".join(words)


def search(config: TrainConfig, space: dict, options: SearchOptions,
           started: float | None = None) -> None:
    """A hyperparameter search (``medlm.search``) of ``config`` over ``space``: the data and
    model checked and loaded before the study is joined or a run started."""
    check_comparable(space, config.select_by)
    check_output_paths(config)
    run = Run(config, started).setup()
    try:
        run_search(config, space, options, run)
    except HubUnavailable as error:
        raise MedLMError(str(error)) from None
