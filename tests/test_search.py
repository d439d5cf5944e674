"""experiments.search: the space a user writes, the pruner, and searches run as a user runs
them (trials nested under one parent run, pruned, resumed, registered by the champion rule)."""

import math
import os
import signal
import sqlite3
import subprocess
import sys

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from experiments import search as search_entry_point
from medlm.errors import MedLMError
from medlm.search import (
    DEFAULT_SPACE,
    Pruning,
    SearchOptions,
    _counted,
    contains,
    join_study,
    open_storage,
    parse_params,
    queue_first,
    read_space_file,
    search_space,
    suggest,
)
from medlm.store import without_password
from medlm.train import EpochResult, RunStopped
from tests.conftest import run_module
from tests.test_bad_input import refused


def test_specs_become_the_distributions_they_say():
    space = search_space(parse_params(["lr=1e-4..3e-3:log", "lora_rank=8,16,32",
                                       "warmup-steps=0..30", "loss_on=full,completion",
                                       "weight_decay=0..0.1"]))
    assert space["lr"] == FloatDistribution(1e-4, 3e-3, log=True)
    assert space["lora_rank"] == CategoricalDistribution([8, 16, 32])
    assert space["warmup_steps"] == IntDistribution(0, 30)  # a whole-number setting
    assert space["loss_on"] == CategoricalDistribution(["full", "completion"])
    assert space["weight_decay"] == FloatDistribution(0.0, 0.1)


def test_the_default_space_holds_the_default_recipe(tmp_path):
    """So a plain search starts from the recipe it must beat."""
    from medlm.config import TrainConfig

    space = search_space({})
    assert set(space) == set(DEFAULT_SPACE)
    assert contains(space, {**vars(TrainConfig()), "lora_rank": 16})
    assert not contains(space, {**vars(TrainConfig()), "lora_rank": 16, "lr": 1e-2})


def test_a_new_search_draws_the_recipe_first_with_the_lora_rank_its_runs_train():
    """The default recipe leaves the LoRA rank to the base (a pretrained one: 16); the first
    trial must draw that rank, not the recipe's unset one."""
    from medlm.config import TrainConfig
    from medlm.recipe import resolve_lora_rank

    config = TrainConfig(model="distilgpt2")
    assert config.lora_rank is None
    study, space = optuna.create_study(), search_space({})
    queue_first(study, config, space, replay=[])
    trial = study.ask()
    drawn = {name: suggest(trial, name, value) for name, value in space.items()}
    assert drawn == {name: getattr(resolve_lora_rank(config), name) for name in space}


def test_a_space_file_reads_like_the_flags(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('lr = "1e-4..1e-3:log"\nlora-rank = [4, 8]\n')  # a flag's spelling too
    assert search_space(read_space_file(str(path))) == search_space(
        parse_params(["lr=1e-4..1e-3:log", "lora_rank=4,8"]))


def test_a_setting_that_changes_what_the_selection_measures_is_searched_only_by_the_other():
    """Completion-only losses are over fewer (easier) tokens than full ones: a search by
    validation loss would crown loss_on=completion for its yardstick, not its model."""
    from medlm.search import check_comparable

    with pytest.raises(MedLMError, match="--param loss_on with --select-by validation_loss "
                                         "is invalid.*expected --select-by symptom_f1"):
        check_comparable(search_space(parse_params(["loss_on=full,completion"])),
                         "validation_loss")
    with pytest.raises(MedLMError, match="--param max_length with"):
        check_comparable(search_space(parse_params(["max_length=64,128"])), "validation_loss")
    check_comparable(search_space(parse_params(["loss_on=full,completion"])), "symptom_f1")
    check_comparable(search_space({}), "validation_loss")  # the default space: comparable


@pytest.mark.parametrize(("spec", "message"), [
    ("lr", "expected NAME=SPEC"),
    ("learning_rate=1..2", "'learning_rate' is invalid: expected one of"),
    ("dataset=a,b", "'dataset' is invalid"),  # every trial must hold out the same diseases
    ("lr=-1e-3..1e-3", "-0.001 is invalid: expected a number > 0"),
    ("lr=1e-3..1e-4", "expected LOW < HIGH"),
    ("weight_decay=0..0.1:log", "both > 0 on a log scale"),
    ("epochs=1.5..3", "expected a whole number"),
    ("loss_on=full,everything", "'everything' is invalid: expected one of full, completion"),
    ("scheduler=a..b", "expected A,B,C"),
    ("lr=1e-4..1e-3:sqrt", "expected LOW..HIGH or LOW..HIGH:log"),
    ("epochs=1..inf", "'inf' is invalid: expected a finite number"),
    ("lr=nan..1e-3", "'nan' is invalid: expected a finite number"),
])
def test_a_bad_spec_names_what_is_wrong(spec, message):
    with pytest.raises(MedLMError, match=None) as raised:
        search_space(parse_params([spec]))
    assert message in str(raised.value)


def test_a_setting_given_twice_is_refused():
    with pytest.raises(MedLMError, match="given twice"):
        parse_params(["lr=1e-4..1e-3", "lr=1e-3..1e-2"])


def test_the_storage_password_never_reaches_a_log():
    assert (without_password("postgresql://medlm:secret@db:5432/optuna")
            == "postgresql://medlm:***@db:5432/optuna")
    assert without_password("medlm-search.db") == "medlm-search.db"


def running(study: optuna.Study, heartbeat_age_sec: int) -> optuna.Trial:
    """A trial RUNNING as a process leaves it, its last heartbeat that long ago (a process that
    died mid-trial sends no more)."""
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    study._storage.record_heartbeat(trial._trial_id)
    database = sqlite3.connect(study._storage._backend.url.removeprefix("sqlite:///"))
    with database:
        database.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) "
                         "WHERE trial_id = ?", (f"-{heartbeat_age_sec} seconds", trial._trial_id))
    database.close()
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_process_died_runs_again_and_one_alive_is_left(tmp_path, mlflow_home):
    """A process killed mid-trial (SIGKILL, its machine gone) stops its trial's heartbeat; else
    the trial would stay RUNNING (and count against the budget) forever."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("medlm")).info.run_id
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.db")))
    dead, _ = running(study, heartbeat_age_sec=600), running(study, heartbeat_age_sec=0)
    dead.set_user_attr("run_id", run_id)
    fail_stale_trials(study)
    fail_stale_trials(study)  # a second process doing the same at once: nothing more
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [
        TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].params == trials[0].params  # the dead trial's settings, queued
    assert _counted(study) == 1  # the live trial: the dead one is not counted twice
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_process_dies_twice_is_not_run_a_third_time(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.db")))
    first = running(study, heartbeat_age_sec=600)
    fail_stale_trials(study)
    rerun = running(study, heartbeat_age_sec=600)  # the queued copy, its process killed too
    assert rerun.params == first.params
    fail_stale_trials(study)
    assert [trial.state for trial in study.get_trials()] == [TrialState.FAIL] * 2


def test_a_journal_file_is_refused_for_a_storage_with_heartbeats(tmp_path, monkeypatch):
    with pytest.raises(MedLMError, match="--storage 'old.journal' is an Optuna journal file "
                                         ".*: expected a SQLite file"):
        open_storage("old.journal")
    # an older MedLM's default study in this directory: named, not silently started anew
    monkeypatch.chdir(tmp_path)
    (tmp_path / "medlm-search.journal").write_text("")
    with pytest.raises(MedLMError, match="'medlm-search.journal' is an Optuna journal file"):
        open_storage(None)
    assert not (tmp_path / "medlm-search.db").exists()


def test_a_process_joining_before_the_study_has_its_settings_waits_then_gives_up(
        tmp_path, monkeypatch):
    monkeypatch.setattr("medlm.search.PARENT_WAIT_SEC", 0)
    storage = str(tmp_path / "s.db")
    optuna.create_study(study_name="s", storage=open_storage(storage))  # no settings yet
    with pytest.raises(MedLMError, match="--study 's' has no medlm_settings after 0 s"):
        join_study(SearchOptions(study="s", storage=storage), "minimize", "{}")


def epoch(number: int, loss: float) -> EpochResult:
    return EpochResult(epoch=number, training_loss=loss, validation_loss=loss,
                       validation_perplexity=math.exp(loss), epoch_duration_sec=1.0,
                       train_samples_per_sec=1.0, train_tokens_per_sec=1.0, learning_rate=1e-3)


def test_the_pruner_stops_a_trial_worse_than_the_median_and_lets_a_better_one_go_on():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                    n_warmup_steps=0))
    for loss in (2.0, 2.2):  # two finished trials: 2.0 and 2.2 after epoch 1
        trial = study.ask()
        trial.report(loss, 1)
        study.tell(trial, loss)
    better = Pruning(study.ask(), "validation_loss")
    better.on_epoch_end(None, epoch(1, 1.9))  # below the median: goes on
    assert better.pruned_after is None
    worse = Pruning(study.ask(), "validation_loss")
    with pytest.raises(RunStopped):
        worse.on_epoch_end(None, epoch(1, 3.0))
    assert worse.pruned_after == 1


def runs_of(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.search_runs([client.get_experiment_by_name("medlm").experiment_id])


TINY = ("--max-samples", "40", "--num-validation-samples", "0", "--max-new-tokens", "4",
        "--no-system-metrics", "--no-progress")


@pytest.mark.slow
def test_a_search_nests_its_trials_prunes_the_bad_ones_and_registers_the_rest(
        tmp_path, tiny_model_dir, dataset_csv, monkeypatch, capsys):
    """lr 5e-4 (the recipe's own, so the first trial) or 1e-7 on the tiny model: once the
    5e-4 trial has finished, a 1e-7 trial is clearly worse after its first epoch and is
    pruned."""
    result = run_module(
        "experiments.search", "--model", str(tiny_model_dir), "--dataset", str(dataset_csv),
        *TINY, "--epochs", "2", "--warmup-steps", "0", "--no-symptom-eval", "--param",
        "lr=5e-4,1e-7", "--trials", "4", "--sampler", "random", "--startup-trials", "1",
        cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="medlm-search",
                              storage=f"sqlite:///{tmp_path / 'medlm-search.db'}")
    trials = study.get_trials()
    assert len(trials) == 4 and trials[0].params["lr"] == 5e-4  # the recipe first
    client, runs = runs_of(tmp_path)
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = {run.info.run_id: run for run in runs
                if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {trial.user_attrs["run_id"] for trial in trials} == set(children)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search_space"] == "lr=0.0005,1e-07"
    bad = [trial for trial in trials if trial.params["lr"] == 1e-7]
    assert bad, "the sampler's seed must draw lr 1e-7 at least once"
    for trial in bad:
        run = children[trial.user_attrs["run_id"]]
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert run.info.status == "KILLED" and run.data.tags["medlm.pruned_after_epoch"] == "1"
    assert not any((tmp_path / "checkpoints").glob("*/state*"))  # nothing left to resume

    best = study.best_trial
    assert parent.data.tags["best_run_id"] == best.user_attrs["run_id"]
    assert parent.data.metrics["best_validation_loss"] == pytest.approx(best.value)
    versions = client.search_model_versions("name = 'medlm'")
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(versions) == len(finished)  # each finished trial registered, as a run is
    champion = client.get_model_version_by_alias("medlm", "champion")
    assert champion.run_id in {t.user_attrs["run_id"] for t in finished}
    description = children[best.user_attrs["run_id"]].data.tags["mlflow.note.content"]
    assert description.startswith(f"{tiny_model_dir}, recipe default (full fine-tuning")
    assert f"best epoch {best.user_attrs['best_epoch']} of 2 by validation_loss" in description
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["trial", "state"]
    assert table[1].split()[:2] == [str(best.number), "COMPLETE"]  # the best first
    assert "?workflowType=machine_learning" in result.stderr

    # the same trials again without pruning: each runs its 2 epochs
    flags = ["experiments.search", "--model", str(tiny_model_dir), "--dataset",
             str(dataset_csv), *TINY, "--epochs", "2", "--warmup-steps", "0",
             "--no-symptom-eval", "--param", "lr=5e-4,1e-7", "--trials", "4",
             "--study", "replayed", "--replay", "medlm-search", "--pruner", "none"]
    with monkeypatch.context() as inside:  # in this process, as a command started there
        inside.chdir(tmp_path)
        inside.setenv("MLFLOW_TRACKING_URI", "")
        status, err = refused(search_entry_point.main,
                              [*flags[1:-6], "--epochs", "3", *flags[-6:]], capsys)
        mlflow.set_tracking_uri(None)
    assert status == 2 and "--replay 'medlm-search' was run with other" in err  # --epochs twice
    replay = run_module(*flags, cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": ""})
    assert replay.returncode == 0, replay.stderr[-3000:]
    replayed = optuna.load_study(study_name="replayed", storage=study._storage).get_trials()
    assert [t.params for t in replayed] == [t.params for t in trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and max(t.intermediate_values) == 2
               for t in replayed)


@pytest.mark.slow
def test_an_interrupted_search_resumes_with_the_interrupted_trial(tmp_path, tiny_model_dir,
                                                                  dataset_csv):
    """SIGTERM mid-trial: the trial's run is KILLED, the parent too; the same command again
    runs the interrupted settings first and completes the study."""
    command = [sys.executable, "-m", "experiments.search", "--model", str(tiny_model_dir),
               "--dataset", str(dataset_csv), *TINY, "--epochs", "3", "--patience", "0",
               "--param", "lr=1e-4..1e-2:log", "--trials", "2", "--pruner", "none"]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env=environment)
    for line in process.stderr:  # the first trial's first epoch has ended
        if line.startswith("epoch 1:"):
            break
    process.send_signal(signal.SIGTERM)
    _, said = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "search stopped; the same command again resumes it" in said
    assert "--resume" not in said  # not the hint of a single run
    _, runs = runs_of(tmp_path)
    assert sorted(run.info.status for run in runs) == ["KILLED", "KILLED"]  # parent, trial
    (interrupted,) = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert interrupted.data.tags["mlflow.note.content"].endswith(
        "trial 0, interrupted; the search runs these settings again when resumed")
    assert not (tmp_path / "checkpoints" / interrupted.info.run_id).exists()  # nothing resumes it

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env=environment)
    assert again.returncode == 0, again.stderr[-3000:]
    _, runs = runs_of(tmp_path)
    trials = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(trials) == 3  # the interrupted one, its re-run, one more
    rerun = [run for run in trials if run.info.run_id != interrupted.info.run_id
             and run.data.params["lr"] == interrupted.data.params["lr"]]
    assert len(rerun) == 1 and rerun[0].info.status == "FINISHED"
    assert all(run.info.status == "FINISHED" for run in runs
               if run.info.run_id != interrupted.info.run_id)  # the parent too
