"""experiments.compare: two runs' answers on the same held-out diseases, paired per disease."""

import math

import mlflow
import pandas as pd
import pytest

from experiments import compare as compare_command
from experiments._cli import run_cli
from medlm.data import load_disease_data
from medlm.metrics import references_by_disease
from medlm.scores import baseline_scores, score_answers
from medlm.split import split_by_disease

KEY = {"dataset_content_sha256": "abc", "max_samples": "None", "split_seed": "42",
       "validation_fraction": "0.2", "split_validation_sha256": "def", "metric_version": "4",
       "max_new_tokens": "40"}


@pytest.fixture(scope="module")
def split(dataset_csv):
    return split_by_disease(load_disease_data(str(dataset_csv)).frame, 0.2, 42)


def logged_run(answers, split, **params) -> str:
    """A finished run as a training run logs it: params, its kept epoch and that epoch's
    scored answers."""
    table, scores = score_answers(answers, split.validation)
    with mlflow.start_run() as run:
        mlflow.log_params({**KEY, "model": "test", **params})
        mlflow.log_metrics({"best_epoch": 2, **scores.as_metrics("best_")})
        mlflow.log_table(table.assign(epoch=1), "symptom_scores.json")  # an earlier epoch
        mlflow.log_table(table.assign(epoch=2), "symptom_scores.json")
    return run.info.run_id


def compared(capsys, *argv):
    status = run_cli(compare_command.main, list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def score_row(out: str, score: str) -> list[str]:
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith(score)]
    return row  # score, A, B, B - A, interval, p


def test_a_better_model_is_better_with_confidence(mlflow_home, split, capsys, tmp_path):
    references = [reference for _, reference in references_by_disease(split.validation).values()]
    (constant, _), = [baseline_scores(split.train, split.validation)["constant"]]
    worse = logged_run(constant["generated"].tolist(), split)
    better = logged_run(references, split)  # every answer its reference: F1 1
    status, out, err = compared(capsys, worse, better, "--output", str(tmp_path / "t.csv"))
    assert status == 0, err
    name, a, b, difference, interval, p = score_row(out, "symptom_f1")
    assert float(b) == 1.0 and float(difference) == pytest.approx(1.0 - float(a), abs=1e-4)
    low, high = (float(end) for end in interval.split(".."))
    assert 0 < low < float(difference) < high and float(p) < 0.001
    assert f"{len(references)} held-out diseases in" in out
    assert (tmp_path / "t.csv").read_text().startswith("disease,group,symptom_f1_a")


def test_two_answers_alike_are_not_told_apart(mlflow_home, split, capsys):
    """The two answers that need no model (0.138 and 0.131 symptom F1 at split seed 42): their
    difference is noise, and the comparison says so."""
    baselines = baseline_scores(split.train, split.validation)
    constant, lookup = (logged_run(baselines[name][0]["generated"].tolist(), split)
                        for name in ("constant", "lookup"))
    status, out, err = compared(capsys, constant, lookup, "--log")
    assert status == 0, err
    _, _, _, difference, interval, p = score_row(out, "symptom_f1")
    low, high = (float(end) for end in interval.split(".."))
    assert low < 0 < high and float(p) > 0.05
    logged = mlflow.get_run(err.split("logged as run ")[1].split()[0])
    assert logged.data.params["a_run_id"] == constant
    assert math.isclose(logged.data.metrics["symptom_f1_difference"], float(difference),
                        abs_tol=1e-4)


def test_runs_scored_on_other_diseases_are_refused_with_the_reason(mlflow_home, split, capsys):
    answers = ["fever"] * len(references_by_disease(split.validation))
    first = logged_run(answers, split)
    other = logged_run(answers, split, split_seed="7")
    status, _, err = compared(capsys, first, other)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {first} and {other} were not scored on the same held-out "
                           "diseases") and "split_seed 42 vs 7" in line


def test_a_run_without_scored_answers_is_a_one_line_error(mlflow_home, split, capsys):
    with mlflow.start_run() as bare:
        mlflow.log_params(KEY)
    scored = logged_run(["fever"] * len(references_by_disease(split.validation)), split)
    status, _, err = compared(capsys, bare.info.run_id, scored)
    assert status == 2 and "has no scored answers" in err and "--symptom-eval" in err


def test_a_side_can_be_several_runs_whose_answers_are_pooled(mlflow_home, split, capsys):
    """Two training seeds of one recipe against one run: each disease's counts summed over
    the seeds, so the side's score is that of all its answers together."""
    baselines = baseline_scores(split.train, split.validation)
    answers = {name: baselines[name][0]["generated"].tolist() for name in ("constant", "lookup")}
    constant, lookup = (logged_run(answers[name], split, seed=seed)
                        for name, seed in (("constant", "1"), ("lookup", "2")))
    twice = pd.concat([split.validation,  # each disease again, under another name
                       split.validation.assign(Name=split.validation["Name"] + " (2)")])
    _, pooled = score_answers(answers["constant"] + answers["lookup"], twice)
    status, out, err = compared(capsys, f"{constant},{lookup}", constant)
    assert status == 0, err
    _, a, b, _, _, _ = score_row(out, "symptom_f1")
    assert float(a) == pytest.approx(pooled.symptom.f1, abs=1e-4)
    assert "seeds 1 2, answers pooled" in out
    status, _, err = compared(capsys, f"{constant},{constant}", lookup)
    assert status == 2 and "names a run twice" in err


def test_a_side_of_more_runs_is_tested_like_for_like(mlflow_home, split, capsys):
    """Two runs with the same answers are one model: A1,A2 against B gives what A1 against B
    gives, p-value included (counts summed over a side's runs would weigh its groups double
    in the permutations and move p)."""
    baselines = baseline_scores(split.train, split.validation)
    constant, lookup = (baselines[name][0]["generated"].tolist() for name in ("constant",
                                                                              "lookup"))
    one, two = (logged_run(constant, split, seed=seed) for seed in ("1", "2"))
    other = logged_run(lookup, split, seed="3")
    _, single, _ = compared(capsys, one, other)
    _, pooled, _ = compared(capsys, f"{one},{two}", other)
    for score in ("symptom_f1", "word_f1"):
        assert score_row(pooled, score)[1:] == score_row(single, score)[1:]
