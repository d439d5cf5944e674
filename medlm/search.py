"""A hyperparameter search on Optuna: each trial a run under one parent run, pruned after a
clearly worse epoch, in a study that processes on several machines join through one storage."""

import contextlib
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

import optuna
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

from medlm import stop, tracking
from medlm.config import DEFAULT_SPACE, NOT_RECIPE, TrainConfig, setting_kinds, sweep_value
from medlm.errors import DiskFull, MedLMError
from medlm.hub import HubUnavailable
from medlm.recipe import Run, check_output_paths, resolve_lora_rank
from medlm.registry import KEY_PARAMS_BY_SELECTION, SPLIT_KEY_PARAMS
from medlm.report import run_description
from medlm.scores import SUMMARY_SCORES, interval_text
from medlm.store import launched_by, without_password
from medlm.train import EpochResult, Logger, NonFiniteLossError, RunStopped

log = logging.getLogger("medlm")

LOCAL_STORAGE = "medlm-search.db"  # the study beside the runs when no --storage is given
OLD_LOCAL_STORAGE = "medlm-search.journal"  # an older default: refused, not started anew
PARENT_ATTR = "mlflow_parent_run_id"  # the study's user attribute that names its parent run
SETTINGS_ATTR = "medlm_settings"  # what every trial shares: a joining process must match it
PARENT_WAIT_SEC = 300  # how long a joining process waits for the creator to set the study up
# this machine's: a joining process may differ
MACHINE = ("device", "precision", "tf32", "deterministic", "progress", "system_metrics",
           "checkpoint_dir", "collective_timeout_min")
# not searchable: where runs are tracked, the split (trials hold out the same diseases), ...
NOT_SEARCHABLE = NOT_RECIPE | {"model", "dataset", "max_samples", "validation_fraction",
                               "split_seed", "select_by", "sample_prompts", "folds", "fold"}


@dataclass
class SearchOptions:  # experiments.search's flags
    study: str = "medlm-search"
    storage: str | None = None  # None: LOCAL_STORAGE; a SQLite file or a database URL
    trials: int = 12  # of all processes together
    sampler: str = "tpe"  # tpe (a constant liar: no point running elsewhere is drawn) | random
    pruner: str = "median"  # median | none
    sampler_seed: int = 42
    startup_trials: int = 4  # trials the pruner and TPE see before they act
    replay: str | None = None  # a study in the same storage whose trials a new study runs first


def check_comparable(space: dict[str, BaseDistribution], select_by: str) -> None:
    """Refuse a setting that changes what ``select_by`` measures (the champion rule's key)."""
    measured = set(KEY_PARAMS_BY_SELECTION[select_by]) - set(SPLIT_KEY_PARAMS)
    if changes := sorted(name for name in space if {name, f"{name}_effective"} & measured):
        other = "symptom_f1" if select_by == "validation_loss" else "validation_loss"
        raise MedLMError(f"--param {', '.join(changes)} with --select-by {select_by} is invalid: "
                         f"it changes what {select_by} measures: expected --select-by {other}, "
                         "or a space without it")


def open_storage(url: str | None) -> optuna.storages.RDBStorage:
    """The study's database, with heartbeats (a dead process's trial is failed, then rerun)."""
    url = url or (OLD_LOCAL_STORAGE if Path(OLD_LOCAL_STORAGE).is_file()
                  and not Path(LOCAL_STORAGE).is_file() else LOCAL_STORAGE)
    if url.endswith(".journal"):
        raise MedLMError(f"--storage {url!r} is an Optuna journal file (no heartbeat): expected a "
                         f"SQLite file ({LOCAL_STORAGE}) or postgresql://user:password@host/db")
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3: MedLM's PostgreSQL driver
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(1, 6):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                              heartbeat_stale_trial_callback=_rerun_stale_trial)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy's errors name the cause
            if attempt == 5 or not (isinstance(error, IntegrityError | ProgrammingError)
                                    or "already exists" in str(error)):
                reason = (str(error).strip() or type(error).__name__).splitlines()[0]
                raise MedLMError(f"--storage {without_password(url)!r} cannot be opened "
                                 f"({reason}): expected a reachable database URL (postgresql://"
                                 "user:password@host:port/db) or a SQLite file path") from None
            time.sleep(attempt)  # another process is making a new database's tables


def _rerun_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose heartbeat stopped: queued again once, its MLflow run marked KILLED."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    retry(study, trial)
    log.warning("trial %d: its process is gone; %s", trial.number, "not run again (it was a "
                "re-run)" if retry.retry_history(trial) else "it runs again")
    if trial.user_attrs.get("run_id"):
        try:  # the store is down: the trial runs again anyway
            tracking.end_abandoned_run(trial.user_attrs["run_id"])
        except Exception as error:  # noqa: BLE001
            log.warning("could not mark trial %d's run KILLED: %s", trial.number, error)


def join_study(options: SearchOptions, direction: str, settings: str) -> tuple[optuna.Study, bool]:
    """The study, created (then True) or joined by a process of the same settings."""
    storage = open_storage(options.storage)
    pruner = (optuna.pruners.NopPruner() if options.pruner == "none"
              else optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials))
    own_seed = hash((options.sampler_seed, socket.gethostname(), os.getpid())) % 2**32
    creator, joiner = (optuna.samplers.RandomSampler(seed=seed) if options.sampler == "random"
                       else optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                                       n_startup_trials=options.startup_trials)
                       for seed in (options.sampler_seed, own_seed))
    with contextlib.suppress(optuna.exceptions.DuplicatedStudyError):
        study = optuna.create_study(storage=storage, study_name=options.study,
                                    direction=direction, sampler=creator, pruner=pruner)
        study.set_user_attr(SETTINGS_ATTR, settings)
        return study, True
    for _ in range(PARENT_WAIT_SEC // 2 + 1):  # its creator sets its settings, then its parent
        try:
            study = optuna.load_study(study_name=options.study, storage=storage,
                                      sampler=joiner, pruner=pruner)
        except KeyError:  # its creator failed and took it away
            raise MedLMError(f"--study {options.study!r} was removed by the process that "
                             "created it, which failed: expected the command again") from None
        if not (missing := [attr for attr in (SETTINGS_ATTR, PARENT_ATTR)
                            if attr not in study.user_attrs]):
            break
        time.sleep(2)
    else:
        raise MedLMError(f"--study {options.study!r} has no {missing[0]} after {PARENT_WAIT_SEC} "
                         "s: expected its creator to set it (else delete it, or use a new --study)")
    theirs, ours = ({**kept["settings"], "space": kept["space"]} for kept in
                    (json.loads(study.user_attrs[SETTINGS_ATTR]), json.loads(settings)))
    if differ := sorted(name for name in {*theirs, *ours} if theirs.get(name) != ours.get(name)):
        raise MedLMError(f"--study {options.study!r} exists with other settings ("
                         f"{', '.join(differ)}; its space: {theirs['space']}): expected the same "
                         "settings as the processes that began it, or a new --study name")
    return study, False


def replayed(options: SearchOptions, settings: str) -> list[tuple[int, dict[str, Any]]]:
    """Each trial that ran (once: not one failed and queued again) in ``options.replay``."""
    if not options.replay:
        return []
    try:
        source = optuna.load_study(study_name=options.replay, storage=open_storage(options.storage))
    except KeyError:
        raise MedLMError(f"--replay {options.replay!r} is not a study in this --storage: "
                         "expected the name of an earlier search's --study") from None
    if source.user_attrs.get(SETTINGS_ATTR) != settings:
        raise MedLMError(f"--replay {options.replay!r} was run with other settings or another "
                         "space: expected the same flags as that search (only --pruner, "
                         "--sampler and --study may differ)")
    return [(trial.number, trial.params) for trial in source.get_trials(deepcopy=False) if
            trial.state.name in ("COMPLETE", "PRUNED") or "diverged" in trial.user_attrs]


def queue_first(study: optuna.Study, config: TrainConfig, space: dict[str, BaseDistribution],
                replay: list[tuple[int, dict[str, Any]]]) -> None:
    """A new study's first trials: those it replays, else the recipe, where the space holds it."""
    for number, params in replay:
        study.enqueue_trial(params, user_attrs={"replay_of": number})
    recipe = vars(resolve_lora_rank(config))  # a LoRA recipe's rank as its runs train it
    if not replay and contains(space, recipe):
        study.enqueue_trial({name: recipe[name] for name in space},
                            user_attrs={"recipe": config.recipe})


def _start_parent(study: optuna.Study, config: TrainConfig, space: dict[str, BaseDistribution],
                  options: SearchOptions, replay: list[tuple[int, dict[str, Any]]]) -> str:
    """Queue a new study's first trials and start its parent run; on failure remove the study."""
    client, run_id = MlflowClient(), None
    try:
        queue_first(study, config, space, replay)
        experiment_id = tracking.training_experiment(config.experiment)
        launcher, parent_of = launched_by(), tracking.project_parent(experiment_id)
        run_id = client.create_run(
            experiment_id, run_name=config.run_name or f"search {options.study}",
            tags={tracking.DESCRIPTION_TAG: f"Optuna search {options.study!r}: "
                  f"{options.trials} trials of {config.model}, recipe {config.recipe}, "
                  f"varying {describe(space)}", "medlm.search_study": options.study,
                  **({"mlflow.parentRunId": parent_of} if parent_of else {}),  # mlflow run
                  **({"medlm.launched_by_run": launcher} if launcher else {})}).info.run_id
        if launcher:  # each run names the other
            client.set_tag(launcher, "medlm.run_id", run_id)
        params = {name: value for name, value in config.to_params().items() if name not in space}
        params.update(search_space=describe(space), search_study=options.study,
                      search_storage=without_password(options.storage or LOCAL_STORAGE),
                      **{f"search_{name}": getattr(options, name) for name in
                         ("sampler", "pruner", "trials", "replay") if getattr(options, name)})
        client.log_batch(run_id, params=[Param(name, str(tracking.param_value(value))[:6000])
                                         for name, value in params.items()])
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    except BaseException:
        optuna.delete_study(study_name=options.study, storage=study._storage)
        if run_id:
            try:  # the store is down: its error is the one raised
                client.set_terminated(run_id, "FAILED")
            except Exception as error:  # noqa: BLE001
                log.warning("could not mark the search's parent run FAILED: %s", error)
        raise


class Pruning(Logger):
    """Tells Optuna each epoch's value; a pruned trial's run ends KILLED (``RunStopped``)."""

    def __init__(self, trial: optuna.Trial, select_by: str):
        self.trial, self.select_by, self.pruned_after = trial, select_by, None

    def on_epoch_end(self, model, result: EpochResult) -> None:
        self.trial.report(result.validation_loss if self.select_by == "validation_loss"
                          else result.scores.get(self.select_by, math.nan), result.epoch)
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
    """Trials that used or use the budget: not those queued, nor those failed and queued again."""
    return sum(1 for trial in study.get_trials(deepcopy=False) if trial.state not in
               (TrialState.FAIL, TrialState.WAITING) or "diverged" in trial.user_attrs)


class _Trials:
    """The objective (each trial a child run of the parent) and the callback after a trial."""

    def __init__(self, config: TrainConfig, space: dict[str, BaseDistribution], run: Run,
                 parent_id: str, total: int):
        self.config, self.space, self.run, self.parent_id, self.total = (
            config, space, run, parent_id, total)

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        drawn = {name: suggest(trial, name, value) for name, value in self.space.items()}
        config = replace(self.config, **drawn, run_name=f"trial {trial.number}")
        log.info("--- trial %d: %s", trial.number,
                 " ".join(f"{name}={sweep_value(value)}" for name, value in drawn.items()))
        pruning = Pruning(trial, config.select_by)
        def forget(tag: str, value: Any, ended: str) -> None:  # nothing resumes a stopped trial
            if run_id := trial.user_attrs.get("run_id"):
                shutil.rmtree(Path(config.checkpoint_dir) / run_id, ignore_errors=True)
                described = run_description(config).removesuffix(": training")
                try:  # the store is down: the trial's end stands
                    MlflowClient().log_batch(run_id, tags=[RunTag(tag, str(value)), RunTag(
                        tracking.DESCRIPTION_TAG, f"{described}: trial {trial.number}, {ended}")])
                except Exception as error:  # noqa: BLE001
                    log.warning("could not tag trial %d's run: %s", trial.number, error)
        try:
            self.run = self.run.next(config)  # each trial from the untouched base
            result = self.run.execute(parent_run_id=self.parent_id, loggers=[pruning], started=(
                lambda run_id: trial.set_user_attr("run_id", run_id)))
        except RunStopped:
            ended = f"pruned after epoch {pruning.pruned_after}"
            forget("medlm.pruned_after_epoch", pruning.pruned_after, ended)
            raise optuna.TrialPruned(ended) from None
        except NonFiniteLossError as error:  # marked, and the search goes on
            trial.set_user_attr("diverged", str(error))
            forget("medlm.diverged", "true", "diverged")
            log.warning("trial %d FAILED: %s", trial.number, error)
            return math.nan
        except (KeyboardInterrupt, DiskFull) as error:  # run again, from its start, on resume
            trial.study.enqueue_trial(drawn, user_attrs={"rerun_of": trial.number})
            forget("medlm.rerun_by_search", "true",
                   "interrupted; the search runs these settings again when resumed")
            if isinstance(error, DiskFull):
                raise MedLMError(f"{error.failed}: expected free space there, then the same "
                                 f"search command again (it runs trial {trial.number}'s "
                                 "settings again from the start)") from None
            raise
        for name in ("best_epoch", "validation_loss", *SUMMARY_SCORES, "version"):
            value = result.get(name)  # NaN as None: JSON has no NaN
            trial.set_user_attr(name, None if pd.isna(value) else value)
        return result[config.select_by]

    def after(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Stop once the study holds ``total`` trials; note a new best on the parent."""
        optuna.storages.fail_stale_trials(study)  # a dead process's trial counts no more
        if _counted(study) >= self.total:
            study.stop()
        if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
            attrs, select_by = trial.user_attrs, self.config.select_by
            tags = {"best_trial": trial.number, "best_run_id": attrs.get("run_id", ""),
                    "best_version": attrs.get("version") or "",
                    **{f"best_{name}": value for name, value in trial.params.items()}}
            MlflowClient().log_batch(self.parent_id, metrics=[
                Metric(f"best_{name}", attrs[name], int(time.time() * 1000), trial.number)
                for name in ("validation_loss", *SUMMARY_SCORES)
                if isinstance(attrs.get(name), int | float)],
                tags=[RunTag(name, str(value)) for name, value in tags.items()])
            log.info("best so far: trial %d (%s %s)", trial.number, select_by,
                     interval_text(attrs, select_by, 4) if select_by in attrs else trial.value)
        stop.raise_if_asked()  # a SIGTERM whose raise was lost


def search(config: TrainConfig, space: dict[str, BaseDistribution], options: SearchOptions) -> None:
    """Search ``config`` over ``space`` until the study holds ``options.trials`` trials."""
    check_comparable(space, config.select_by)
    check_output_paths(config)
    run = Run(config).setup()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # MedLM says what each trial did
    shared = {name: tracking.param_value(value) for name, value in config.to_params().items()
              if name not in space and name not in MACHINE}
    settings = json.dumps({"settings": shared, "space": describe(space)}, sort_keys=True)
    replay = replayed(options, settings)
    direction = "minimize" if config.select_by == "validation_loss" else "maximize"
    study, created = join_study(options, direction, settings)
    if created:
        parent_id = _start_parent(study, config, space, options, replay)
    else:  # the creator's, RUNNING again as this process joins or resumes it
        parent_id = study.user_attrs[PARENT_ATTR]
        MlflowClient().update_run(parent_id, status="RUNNING")
    optuna.storages.fail_stale_trials(study)
    left = options.trials - _counted(study)
    log.info("search %r (%s): %d of %d trials %s, under parent run %s%s", options.study,
             without_password(options.storage or LOCAL_STORAGE), options.trials - max(left, 0),
             options.trials, "so far" if created else "begun before", parent_id, "" if created
             or not options.replay else f"; the study exists, so --replay {options.replay} is not")
    trials, status = _Trials(config, space, run, parent_id, options.trials), RunStatus.FAILED
    try:
        if left > 0:  # until the study holds its trials, a dead process's queued again too
            study.optimize(trials, callbacks=[trials.after])
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        log.warning("search stopped; the same command again resumes it, interrupted trial first")
        raise
    except HubUnavailable as error:
        raise MedLMError(str(error)) from None
    finally:  # unless another process is running a trial: the last one ends it
        optuna.storages.fail_stale_trials(study)
        if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            MlflowClient().set_terminated(parent_id, RunStatus.to_string(status))
    _report(study, parent_id)


def _report(study: optuna.Study, parent_id: str) -> None:
    table = pd.DataFrame([
        {"trial": trial.number,
         "state": "DIVERGED" if "diverged" in trial.user_attrs else trial.state.name,
         **trial.params, "value": trial.value, "best_epoch": trial.user_attrs.get("best_epoch"),
         **{name: trial.user_attrs.get(name) for name in SUMMARY_SCORES},
         "epochs_run": max(trial.intermediate_values, default=None),
         "seconds": trial.duration.total_seconds() if trial.duration else None,
         **{name: trial.user_attrs.get(name) for name in ("host", "run_id", "version")}}
        for trial in study.get_trials(deepcopy=False)])
    table = table.sort_values("value", ascending=study.direction.name == "MINIMIZE").sort_values(
        "state", key=lambda state: state.map({"COMPLETE": 0, "PRUNED": 1}).fillna(2),
        kind="stable").reset_index(drop=True)
    MlflowClient().log_text(parent_id, table.to_csv(index=False), "search_trials.csv")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    ran = table.groupby("state")["seconds"].agg(["size", "mean"])  # what pruning saved
    log.info("trials: %s", ", ".join(
        f"{size} {state.lower()}" + (f" ({mean:.0f} s on average)" if pd.notna(mean) else "")
        for state, size, mean in ran.itertuples()))


def _value(name: str, kind: type, text: str) -> Any:
    """One bound or choice of ``name``, parsed as its setting's type and checked by its rule."""
    try:
        value = ({"true": True, "false": False}[text.lower()] if kind is bool
                 else float(text) if kind in (int, float) else text)
    except (KeyError, ValueError):
        expected = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected {expected}") from None
    if kind in (int, float) and not (math.isfinite(value) and (kind is float or value % 1 == 0)):
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected "
                         + ("a whole number" if math.isfinite(value) else "a finite number"))
    value = int(value) if kind is int else value
    spec = next(item.metadata for item in fields(TrainConfig) if item.name == name)
    if spec["choices"] and value not in spec["choices"]:
        expected = f"one of {', '.join(spec['choices'])}"
    elif spec["rule"] is not None and not spec["rule"].ok(value):
        expected = spec["rule"].expected
    else:
        return value
    raise MedLMError(f"--param {name}: {value!r} is invalid: expected {expected}")


def search_space(specs: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The space of ``specs`` (strings, or a file's lists of choices; else the default)."""
    kinds = {setting: kind for setting, kind in setting_kinds().items()
             if setting not in NOT_SEARCHABLE and kind in (int, float, str, bool)}
    space: dict[str, BaseDistribution] = {}
    for name, spec in (specs or DEFAULT_SPACE).items():
        if (kind := kinds.get(name)) is None:
            raise MedLMError(f"--param {name!r} is invalid: expected one of "
                             f"{', '.join(sorted(kinds))}")
        spec = ",".join(map(str, spec)) if isinstance(spec, list) else str(spec).strip()
        bounds, _, scale = spec.partition(":")
        if ".." not in spec:
            choices = [_value(name, kind, item) for item in map(str.strip, spec.split(",")) if item]
            if not choices:
                raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW..HIGH, "
                                 "LOW..HIGH:log or A,B,C")
            space[name] = CategoricalDistribution(list(dict.fromkeys(choices)))
            continue
        if kind not in (int, float) or scale not in ("", "log"):
            raise MedLMError(f"--param {name}={spec!r} is invalid: expected " + (
                "A,B,C (it is not a number)" if kind not in (int, float)
                else "LOW..HIGH or LOW..HIGH:log"))
        low, high = (_value(name, kind, text.strip()) for text in bounds.split("..", 1))
        if not low < high or (scale and low <= 0):
            raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW < HIGH"
                             + (", both > 0 on a log scale" if scale else ""))
        numbers = optuna.distributions.IntDistribution if kind is int else FloatDistribution
        space[name] = numbers(low, high, log=bool(scale))
    return space


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
    if len(named := {name.replace("-", "_"): spec for name, spec in specs.items()}) < len(specs):
        raise MedLMError(f"--space {path!r} names a setting twice (as NAME and its flag "
                         "spelling): expected one range per setting")
    return named


def contains(space: dict[str, BaseDistribution], values: dict[str, Any]) -> bool:
    return all(values.get(name) in drawn.choices if isinstance(drawn, CategoricalDistribution)
               else values.get(name) is not None and drawn.low <= values[name] <= drawn.high
               for name, drawn in space.items())


def describe(space: dict[str, BaseDistribution]) -> str:
    """The space in the specs' own words: ``lr=0.0001..0.003:log lora_rank=8,16,32``."""
    return " ".join(f"{name}={','.join(map(str, drawn.choices))}"
                    if isinstance(drawn, CategoricalDistribution)
                    else f"{name}={drawn.low:g}..{drawn.high:g}{':log' if drawn.log else ''}"
                    for name, drawn in space.items())
