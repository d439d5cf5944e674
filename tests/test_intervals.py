"""The intervals beside every held-out score: they cover the true value as often as they say,
resample whole name groups, and reach the scores a run logs and prints."""

import math

import numpy as np
import pytest

from medlm import scores as intervals
from medlm.data import load_disease_data
from medlm.scores import baseline_scores, interval_text, score_answers
from medlm.split import split_by_disease


def population(size: int, seed: int) -> np.ndarray:
    """Counts (matched, generated, reference) of ``size`` synthetic answers: between 1 and 8
    phrases written, 3 to 10 in the reference, each written phrase right with a probability
    of its own answer's (a mix of good and bad answers, as a model's are)."""
    rng = np.random.default_rng(seed)
    generated = rng.integers(1, 9, size)
    reference = rng.integers(3, 11, size)
    right = rng.beta(1.0, 3.0, size)
    matched = rng.binomial(np.minimum(generated, reference), right)
    return np.stack([matched, generated, reference], axis=1).astype(float)


@pytest.mark.parametrize("statistic", ["f1", "precision"])
def test_the_95_percent_interval_covers_the_true_score_95_percent_of_the_time(statistic):
    """Samples of 60 answers (a held-out set's size) from a population whose micro-averaged
    score is known: 200 intervals, each covering it or not."""
    whole = population(100_000, seed=1)
    truth = float(intervals.STATISTICS[statistic](*whole.T))
    rng = np.random.default_rng(2)
    covered, widths = 0, []
    for _ in range(200):
        sample = whole[rng.choice(len(whole), 60, replace=False)]
        low, high = intervals.interval(sample, statistic)
        covered += low <= truth <= high
        widths.append(high - low)
    assert 0.89 <= covered / 200 <= 0.99, (covered, truth)
    assert 0.05 < float(np.mean(widths)) < 0.4  # an interval, not a point or everything


def test_groups_of_copies_give_the_interval_of_one_disease_per_group():
    """Ten diseases, each with four variants answered alike (one name group each): resampled
    by group, the interval is that of the ten alone; resampled by disease it would be about
    half as wide, claiming a precision forty draws do not have."""
    ten = population(10, seed=3)
    copies = np.repeat(ten, 4, axis=0)
    groups = np.repeat(np.arange(10), 4)
    by_group = intervals.interval(intervals.group_sums(copies, groups), "f1")
    assert by_group == pytest.approx(intervals.interval(ten, "f1"), abs=1e-9)
    by_disease = intervals.interval(copies, "f1")
    assert by_disease[1] - by_disease[0] < 0.7 * (by_group[1] - by_group[0])


def test_answers_that_score_alike_have_a_point_and_one_group_none():
    nothing = np.array([[0, 3, 5], [0, 2, 4], [0, 4, 4]], dtype=float)
    assert intervals.interval(nothing, "f1") == (0.0, 0.0)
    low, high = intervals.interval(nothing[:1], "f1")
    assert math.isnan(low) and math.isnan(high)


def test_held_out_scores_carry_their_intervals_and_groups(dataset_csv):
    frame = load_disease_data(str(dataset_csv)).frame
    split = split_by_disease(frame, 0.2, 42)
    (table, lookup), = [baseline_scores(split.train, split.validation)["lookup"]]
    metrics = lookup.as_metrics("baseline_lookup_")
    for name in ("symptom_precision", "symptom_recall", "symptom_f1", "word_f1"):
        value = metrics[f"baseline_lookup_{name}"]
        low = metrics[f"baseline_lookup_{name}_ci_low"]
        high = metrics[f"baseline_lookup_{name}_ci_high"]
        assert 0 <= low < value < high <= 1, (name, low, value, high)
    # the table says which group each disease was resampled in; related names share one
    assert table["group"].nunique() < len(table)
    shared = table.groupby("group")["disease"].apply(list)
    assert any(len(names) > 1 for names in shared)
    # the same answers, the same interval
    _, again = score_answers(table["generated"].tolist(), split.validation)
    assert again.intervals == lookup.intervals


def test_a_score_is_shown_with_its_interval():
    assert interval_text({"symptom_f1": 0.25691, "symptom_f1_ci_low": 0.2112,
                          "symptom_f1_ci_high": 0.30312}, "symptom_f1") == "0.257 [0.211-0.303]"
    assert interval_text({"symptom_f1": 0.25691}, "symptom_f1") == "0.257"
    assert interval_text({"symptom_f1": 0.2, "symptom_f1_ci_low": math.nan,
                          "symptom_f1_ci_high": math.nan}, "symptom_f1") == "0.200"


def test_a_run_logs_prints_and_registers_each_score_with_its_interval(
        tiny_model_dir, dataset_csv, mlflow_home, caplog):
    import logging

    from mlflow import MlflowClient

    from medlm.config import TrainConfig
    from medlm.recipe import Run

    caplog.set_level(logging.INFO, logger="medlm")
    config = TrainConfig.from_recipe(
        "default", model=str(tiny_model_dir), dataset=str(dataset_csv), max_samples=60,
        epochs=1, lr=3e-3, max_new_tokens=8, system_metrics=False, progress=False,
        sample_prompts=[], num_validation_samples=0)
    result = Run(config).setup().execute()
    client = MlflowClient()
    metrics = client.get_run(result["run_id"]).data.metrics
    for prefix in ("best_", "untuned_", "baseline_lookup_"):
        for name in ("symptom_precision", "symptom_recall", "symptom_f1", "word_f1"):
            low, high = metrics[f"{prefix}{name}_ci_low"], metrics[f"{prefix}{name}_ci_high"]
            assert low <= metrics[f"{prefix}{name}"] <= high, (prefix, name)
    assert result["symptom_f1_ci_low"] == metrics["best_symptom_f1_ci_low"]  # a sweep's row
    (summary,) = [r.message for r in caplog.records if r.message.startswith("best epoch")]
    assert f"symptom F1 {interval_text(metrics, 'best_symptom_f1')}" in summary, summary
    assert "]" in interval_text(metrics, "best_word_f1")
    description = client.get_model_version("medlm", result["version"]).description
    assert f"symptom_f1 {interval_text(metrics, 'best_symptom_f1', 4)}" in description
    assert "95% intervals over the held-out name groups" in description


def test_a_sweep_over_seeds_gives_each_recipe_its_mean_and_interval_over_the_seeds():
    import pandas as pd
    from scipy import stats

    from medlm.config import SWEEPABLE
    from medlm.scores import over

    rows = [{"lr": lr, "batch_size": 8, "epochs": 3, "weight_decay": 0.0, "seed": seed,
             "validation_loss": 2.0 + lr * 1000 + seed / 100, "symptom_f1": 0.2 + seed / 100,
             "word_f1": 0.3, "status": "FINISHED"}
            for lr in (5e-4, 1e-4) for seed in (3, 1, 2)]  # ranked, not in seed order
    rows.append({**rows[1], "seed": 4, "symptom_f1": float("nan"),
                 "validation_loss": float("nan"), "status": "FAILED: loss diverged"})
    table = over(pd.DataFrame(rows), SWEEPABLE, "seed")
    assert table["lr"].tolist() == [5e-4, 1e-4] and table["seeds"].tolist() == ["1 2 3"] * 2
    first = table.iloc[0]
    f1s = [0.21, 0.22, 0.23]
    low, high = stats.t.interval(0.95, 2, loc=0.22, scale=stats.sem(f1s))
    assert first["symptom_f1"] == pytest.approx(0.22)
    assert (first["symptom_f1_ci_low"], first["symptom_f1_ci_high"]) == pytest.approx((low, high))
    assert first["word_f1_ci_low"] == first["word_f1_ci_high"] == pytest.approx(0.3)
    assert first["symptom_f1_std"] == pytest.approx(0.01)
    # one seed per recipe: nothing to aggregate
    assert over(pd.DataFrame([rows[0], rows[3]]), SWEEPABLE, "seed") is None


def test_folds_rank_recipes_that_finished_every_fold_first_with_seeds_averaged_per_fold():
    import pandas as pd

    from medlm.config import SWEEPABLE, TrainConfig
    from medlm.scores import over
    from medlm.sweep import _ranked

    def child(lr, seed, fold, loss, status="FINISHED"):
        return {"lr": lr, "batch_size": 8, "epochs": 3, "weight_decay": 0.0, "seed": seed,
                "fold": fold, "validation_loss": loss, "symptom_f1": 0.3 - loss / 10,
                "word_f1": 0.3, "status": status}

    rows = [child(1e-4, seed, fold, 2.0 + fold / 10 + seed / 100)
            for seed in (1, 2) for fold in range(3)]
    rows += [child(1e-3, 1, 0, 1.0), child(1e-3, 1, 1, 0.9),  # lower, but on two folds
             child(1e-3, 1, 2, float("nan"), "FAILED: loss diverged")]
    ranked = _ranked(over(pd.DataFrame(rows), (*SWEEPABLE, "fold"), "fold", pooled=("seed",)),
                     TrainConfig(folds=3))
    assert ranked["lr"].tolist() == [1e-4, 1e-3] and ranked["complete"].tolist() == [True, False]
    top = ranked.iloc[0]
    assert top["folds"] == "0 1 2" and top["seeds"] == "1 2"
    # each fold's two seeds averaged (2.015, 2.115, 2.215), then the mean and sd over the folds
    assert top["validation_loss"] == pytest.approx(2.115)
    assert top["validation_loss_std"] == pytest.approx(0.1)


def test_a_cross_validations_table_ranks_recipes_and_says_its_figure_without_references(caplog):
    import logging

    import pandas as pd

    from medlm.config import SWEEPABLE, TrainConfig
    from medlm.scores import over
    from medlm.sweep import _by_recipe, _cross_validated, _print_table, _ranked

    caplog.set_level(logging.INFO, logger="medlm")
    axes = (*SWEEPABLE, "fold")
    rows = [{"run_id": f"r{lr}{fold}", "lr": lr, "batch_size": 8, "epochs": 3,
             "weight_decay": 0.0, "seed": 42, "fold": fold, "validation_loss": 2 + lr * 100,
             "symptom_f1": 0.2, "word_f1": 0.3, "status": "FINISHED"}
            for lr in (1e-2, 1e-3) for fold in (0, 1)]
    rows[0] = {**rows[0], "validation_loss": float("nan"), "status": "FAILED: loss diverged"}
    table = pd.DataFrame(rows)
    assert _cross_validated(table) and not _cross_validated(table[table["fold"] == 0])
    by_fold = _ranked(over(table, axes, "fold", pooled=("seed",)), TrainConfig(folds=2))
    ranked = _by_recipe(table, axes, by_fold)
    # the recipe that finished both folds first; the diverged child unranked, last
    assert ranked["lr"].tolist() == [1e-3, 1e-3, 1e-2, 1e-2]
    assert ranked["rank"].tolist() == ["1", "1", "2", "-"]
    _print_table(ranked, None, by_fold, "parent")  # rows from before reference scores
    (line,) = [r.message for r in caplog.records if r.message.startswith("cross-validated")]
    assert "over 2 folds" in line and "constant nan" in line
