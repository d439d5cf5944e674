import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medlm import compare as champion
from medlm import registry
from medlm.config import TrainConfig
from medlm.errors import MedLMError
from medlm.inference import resolve_model_uri
from medlm.registry import CHAMPION_ALIAS
from medlm.tracking import MlflowTracker
from medlm.train import EpochResult


def epoch(number, validation_loss):
    return EpochResult(epoch=number, training_loss=validation_loss + 0.1,
                       validation_loss=validation_loss, validation_perplexity=1.0,
                       epoch_duration_sec=1.0, train_samples_per_sec=1.0,
                       train_tokens_per_sec=1.0, learning_rate=1e-3)


FULL_DATA = {"dataset_content_sha256": "a" * 64, "max_samples": None, "seed": 42,
             "validation_fraction": 0.2, "loss_on": "full", "tokenizer_sha256": "b" * 64,
             "metric_version": "2", "max_new_tokens": 40}


DISEASES = ["Asthma", "Gout", "Mumps", "Rabies", "Scurvy", "Tetanus", "Anthrax", "Cholera",
            "Leprosy", "Malaria", "Measles", "Rickets", "Typhus", "Yaws", "Croup", "Pertussis",
            "Shingles", "Lupus", "Psoriasis", "Glaucoma"]


def evidence_tables(validation_loss, symptom_f1, spread=0.0, noise_seed=0, diseases=DISEASES):
    """What a run logs for the champion rule to pair: each validation row's loss (mean
    ``validation_loss``, each row's off by up to ``spread``) and the kept epoch's answers (the
    first ``symptom_f1`` share of the diseases answered right, the rest wrong)."""
    rng = np.random.default_rng(noise_seed)
    losses = validation_loss + spread * rng.uniform(-1, 1, len(diseases))
    frame = pd.DataFrame({"Name": diseases, "Symptoms": [f"{name} ache, {name} rash"
                                                         for name in diseases]})
    rows = champion.validation_loss_table(
        np.column_stack([10 * losses, np.full(len(diseases), 10)]), frame)
    right = round(symptom_f1 * len(diseases))
    answers = pd.DataFrame({"disease": diseases, "reference": frame["Symptoms"],
                            "generated": [reference if number < right else "fever, cough"
                                          for number, reference in enumerate(frame["Symptoms"])]})
    return rows, answers


def tracker_of(**settings) -> MlflowTracker:
    """A tracker for a run of the tiny model, as a run's config makes it."""
    return MlflowTracker(TrainConfig(**{"experiment": "medlm-test", "model": "tiny",
                                        "system_metrics": False, **settings}), "cpu")


def register(tiny_model, validation_loss, symptom_f1=0.2, promote=False,
             select_by="validation_loss", spread=0.0, noise_seed=0, row_losses=True,
             diseases=DISEASES, fold=False, **params):
    tokenizer, model = tiny_model
    tracker = tracker_of(select_by=select_by)
    with tracker.run({"lr": 1e-3}):
        result = epoch(1, validation_loss)
        result.scores = {"symptom_f1": symptom_f1, "word_f1": symptom_f1}
        tracker.on_epoch_end(model, result)
        rows, answers = evidence_tables(validation_loss, symptom_f1, spread, noise_seed,
                                        diseases)
        tracker.log_symptom_scores(1, answers, {})
        if row_losses:
            tracker.log_row_losses(rows, 1)
        version, tags = registry.register(tracker, model, tokenizer, result,
                                          {**FULL_DATA, **params})
        return version, champion.maybe_crown(tracker, version, tags, select_by, promote,
                                             fold=fold)


def champion_version():
    return str(MlflowClient().get_model_version_by_alias("medlm", CHAMPION_ALIAS).version)


@pytest.mark.slow
def test_champion_moves_only_to_a_better_version_with_the_same_evaluation_key(mlflow_home,
                                                                              tiny_model):
    version, message = register(tiny_model, 2.0)
    assert champion_version() == version == "1" and "first champion" in message
    version, message = register(tiny_model, 3.0)
    assert champion_version() == "1" and version == "2" and "stays at version 1" in message
    version, message = register(tiny_model, 1.5)
    assert champion_version() == "3" and "new champion" in message and "beats" in message
    # A smoke run on 32 rows has a far lower loss, but on other data: not compared.
    version, message = register(tiny_model, 0.1, max_samples=32,
                                dataset_content_sha256="c" * 64)
    assert champion_version() == "3"
    assert "not compared" in message and "max_samples all vs 32" in message
    assert "dataset_content_sha256 aaaaaaaaaaaa vs cccccccccccc" in message
    assert "--promote" in message
    tags = MlflowClient().get_model_version("medlm", version).tags
    assert tags["evaluation_key"] != MlflowClient().get_model_version("medlm", "3").tags[
        "evaluation_key"]
    version, message = register(tiny_model, 9.0, max_samples=32, promote=True)
    assert champion_version() == version == "5" and "--promote" in message


@pytest.mark.slow
def test_champion_by_symptom_f1_wants_a_higher_f1_with_confidence(mlflow_home, tiny_model):
    register(tiny_model, 2.0, symptom_f1=0.30, select_by="symptom_f1")
    _, message = register(tiny_model, 1.0, symptom_f1=0.25, select_by="symptom_f1")
    assert champion_version() == "1" and "not better than version 1's 0.3000" in message
    # one more disease of 20 answered right: better, but on one name group alone
    _, message = register(tiny_model, 3.0, symptom_f1=0.35, select_by="symptom_f1")
    assert champion_version() == "1"
    assert "symptom_f1 0.3500 is not better than version 1's 0.3000 with confidence" in message
    assert "(+0.0500, 95% CI +0.0000..+0.1" in message and "same held-out diseases" in message
    _, message = register(tiny_model, 3.0, symptom_f1=0.80, select_by="symptom_f1")
    assert champion_version() == "4" and "symptom_f1 0.8000 beats version 1's 0.3000" in message
    assert "with confidence (+0.5000, 95% CI +0." in message


@pytest.mark.slow
def test_champion_by_loss_waits_for_a_lower_loss_on_the_same_rows(mlflow_home, tiny_model):
    """A lower mean loss that is lower on some rows and higher on others does not move the
    alias; one lower on the rows as a whole does; a champion without per-row losses is not
    compared."""
    register(tiny_model, 2.0, spread=0.5)
    _, message = register(tiny_model, 1.98, spread=0.5, noise_seed=1)
    assert champion_version() == "1"
    assert "validation_loss 1.9800 is not better than version 1's 2.0000 with confidence" \
        in message and "paired on the same validation rows" in message
    _, message = register(tiny_model, 1.5, spread=0.5, noise_seed=2)
    assert champion_version() == "3" and "beats version 1's 2.0000 with confidence" in message
    register(tiny_model, 1.0, promote=True, row_losses=False)
    _, message = register(tiny_model, 0.5)
    assert champion_version() == "4"
    assert "not compared with confidence: the champion's run has no per-row validation " \
        "losses" in message and "--promote" in message


@pytest.mark.slow
def test_a_run_resumed_with_more_epochs_is_paired_on_each_versions_own_epoch(mlflow_home,
                                                                            tiny_model):
    """Killed after registering epoch 1, resumed with more epochs, a run registers its new best
    epoch as a second version: compared on that epoch's rows, not its first version's."""
    tokenizer, model = tiny_model
    tracker = tracker_of()
    with tracker.run({"lr": 1e-3}):
        messages = []
        for number, loss in ((1, 2.0), (2, 1.0)):
            result = epoch(number, loss)
            tracker.on_epoch_end(model, result)
            tracker.log_row_losses(evidence_tables(loss, 0.2)[0], number)
            version, tags = registry.register(tracker, model, tokenizer, result, FULL_DATA)
            messages.append(champion.maybe_crown(tracker, version, tags, "validation_loss",
                                                 False))
    assert champion_version() == "2", messages
    assert "(-1.0000, 95% CI -1.0000..-1.0000" in messages[1]


@pytest.mark.slow
def test_a_cross_validation_folds_version_is_crowned_only_by_promote(mlflow_home, tiny_model):
    _, message = register(tiny_model, 2.0, fold=True)
    assert "is not made the champion: a cross-validation fold" in message
    with pytest.raises(MlflowException):
        champion_version()
    register(tiny_model, 2.0, fold=True, promote=True)
    assert champion_version() == "2"


@pytest.mark.slow
def test_one_held_out_name_group_is_not_compared_and_fails_nothing(mlflow_home, tiny_model):
    variants = ["Asthma", "Childhood asthma", "Severe asthma"]  # one name group
    register(tiny_model, 2.0, diseases=variants)
    _, message = register(tiny_model, 1.0, diseases=variants)
    assert champion_version() == "1"
    assert "not compared with confidence: 1 name group held out" in message


@pytest.mark.slow
def test_a_champion_registered_before_evaluation_keys_is_not_compared(mlflow_home, tiny_model):
    register(tiny_model, 2.0)
    client = MlflowClient()
    for tag in ("evaluation_key", "evaluation_key_json"):
        client.delete_model_version_tag("medlm", "1", tag)
    _, message = register(tiny_model, 1.0)
    assert champion_version() == "1" and "has no evaluation key" in message


def test_a_failing_run_is_marked_failed_not_left_running(mlflow_home):
    tracker = tracker_of(run_name="boom")
    with pytest.raises(RuntimeError), tracker.run({"lr": 1e-3}):
        raise RuntimeError("bug")
    assert mlflow.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracker.run({"lr": 1e-3}):
        raise KeyboardInterrupt
    assert mlflow.get_run(tracker.run_id).info.status == "KILLED"


@pytest.mark.parametrize(("error", "status", "says"), [
    (RuntimeError, "FAILED", "failed"), (KeyboardInterrupt, "KILLED", "stopped")])
def test_a_run_that_did_not_finish_does_not_say_training(mlflow_home, error, status, says):
    tracker = tracker_of(run_name="boom")
    with pytest.raises(error), tracker.run({"lr": 1e-3}, description="tiny, lr 1: training"):
        raise error
    run = mlflow.get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["mlflow.note.content"] == f"tiny, lr 1: {says}"


def test_the_compare_hint_shows_no_password_and_survives_a_server_gone(monkeypatch):
    from medlm.store import compare_runs_hint

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri("http://alice:secret@127.0.0.1:9")  # nothing listens on port 9
    try:
        assert compare_runs_hint("medlm") == "http://127.0.0.1:9"
    finally:
        mlflow.set_tracking_uri(None)


def test_results_csv_has_the_seed_notebooks_columns(mlflow_home, tiny_model):
    tracker = tracker_of()
    with tracker.run({}):
        tracker.on_epoch_end(None, epoch(1, 2.0))
        tracker.on_epoch_end(None, epoch(2, 1.5))
    frame = tracker.results_frame()
    assert list(frame.columns) == ["epoch", "transformer", "batch_size", "gpu", "training_loss",
                                   "validation_loss", "epoch_duration_sec"]
    assert frame["validation_loss"].tolist() == [2.0, 1.5]


def test_unknown_registry_uris_list_what_exists(mlflow_home):
    with pytest.raises(MedLMError, match=r"no registered model 'medlm'.*registered models: none"):
        resolve_model_uri("models:/medlm@champion")
    MlflowClient().create_registered_model("medlm")
    with pytest.raises(MedLMError, match=r"has no alias @best .*versions: none"):
        resolve_model_uri("models:/medlm@best")
    with pytest.raises(MedLMError, match="has no version 4"):
        resolve_model_uri("4")
    with pytest.raises(MedLMError, match="is not a directory or URI"):
        resolve_model_uri("no/such/dir")


@pytest.mark.slow
def test_the_champion_rule_compares_what_its_selection_depends_on(mlflow_home, tiny_model):
    """Versions selected by different --select-by rules are not compared; a field the rule's
    score does not depend on (the metric version, for the validation loss) does not stop it."""
    register(tiny_model, 2.0, symptom_f1=0.30, select_by="symptom_f1")
    _, message = register(tiny_model, 1.0, symptom_f1=0.10)  # by validation_loss
    assert champion_version() == "1"
    assert "the champion was selected by symptom_f1, this version by validation_loss" in message
    register(tiny_model, 2.0, promote=True)  # version 3, by validation loss
    _, message = register(tiny_model, 1.5, metric_version="9", max_new_tokens=20)
    assert champion_version() == "4" and "new champion" in message
    _, message = register(tiny_model, 1.0, loss_on="completion")
    assert champion_version() == "4" and "loss_on full vs completion" in message


def test_a_run_is_named_by_what_it_is_unless_a_name_is_given(tmp_path):
    """Before: MLflow's random name ("colorful-whale-549") in the runs table."""
    from types import SimpleNamespace

    from medlm.recipe import Run

    def named(config: TrainConfig) -> str:  # as setup() decides it, on a tokenizer with a template
        run = Run(config)
        run.tokenizer = SimpleNamespace(chat_template="{{ messages }}")
        return run._decide(config).run_name

    random_base = tmp_path / "my-base"
    random_base.mkdir()
    (random_base / "config.json").write_text('{"medlm_random_weights": true}')
    assert named(TrainConfig()) == "distilgpt2 lora16 lr5e-4"
    assert named(TrainConfig(lora_rank=0, lr=3e-3)) == "distilgpt2 full lr3e-3"
    assert named(TrainConfig(model=f"{random_base}/", lr=1.5e-4)) == "my-base full lr1.5e-4"
    assert named(TrainConfig.from_recipe("seed-notebook")) == "distilgpt2 seed-notebook full lr5e-4"
    assert named(TrainConfig.from_recipe("chat-template", lora_rank=8)) == (
        "smollm2-135m-instruct chat-template chat lora8 lr5e-4")
    assert named(TrainConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt_format="auto",
                             folds=5, fold=2)) == (
        "SmolLM2-135M-Instruct chat lora16 lr5e-4 fold 2 of 5")
    assert named(TrainConfig(run_name="mine")) == "mine"  # --run-name, a sweep's or search's


def test_a_resumed_run_keeps_its_name_and_draws_loss_and_f1_first(mlflow_home):
    """The loss curve's title is the run's MLflow name; the headline curves are logged again
    under epoch/, the section MLflow's run page draws first (tests/test_mlflow_ui.py)."""
    tracker = tracker_of(run_name="tiny full lr1e-3")
    with tracker.run({}):
        tracker.on_epoch_end(None, epoch(1, 2.0))
        tracker.log_symptom_scores(1, pd.DataFrame({"disease": ["Gout"]}),
                                   {"symptom_f1": 0.25, "symptom_recall": 0.5})
    again = tracker_of(run_name="another name")
    with again.run({}, resume_run_id=tracker.run_id):
        again.on_epoch_end(None, epoch(2, 1.5))
    run = mlflow.get_run(tracker.run_id)
    assert run.info.run_name == again.run_name == "tiny full lr1e-3"
    assert again.loss_figure().axes[0].get_title() == "tiny full lr1e-3"
    history = {name: sorted((point.step, point.value) for point in
                            MlflowClient().get_metric_history(tracker.run_id, name))
               for name in ("epoch/validation_loss", "validation_loss", "epoch/symptom_f1")}
    assert history == {"epoch/validation_loss": [(1, 2.0), (2, 1.5)],
                       "validation_loss": [(1, 2.0), (2, 1.5)], "epoch/symptom_f1": [(1, 0.25)]}
    assert "epoch/training_loss" in run.data.metrics
    assert "epoch/symptom_recall" not in run.data.metrics
