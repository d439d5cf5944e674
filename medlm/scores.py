"""Held-out scores beside the answers that need no model, each with its bootstrap interval over
name groups; several runs of one recipe as one figure (medlm/README.md, "Intervals")."""

import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import pandas as pd

from medlm.generate import GenerationSettings, generate
from medlm.metrics import (
    SCORING_REPETITION_PENALTY,
    SymptomScore,
    constant_answer,
    nearest_name_answers,
    references_by_disease,
    score_symptoms,
    score_words,
)
from medlm.split import group_diseases

CONFIDENCE = 0.95  # the level of every interval MedLM shows
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by ~0.002 F1 between seeds
SEED = 0  # the same answers always get the same interval


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator)
                                                          .shape), where=denominator > 0)


# micro-averages of the columns of summed rows: m, g, r = matched, generated, reference counts
# (F1 = 2PR / (P + R) = 2m / (g + r)); or the validation loss's loss sum and tokens
STATISTICS = {
    "precision": lambda m, g, r, axis=-1: _ratio(m.sum(axis=axis), g.sum(axis=axis)),
    "recall": lambda m, g, r, axis=-1: _ratio(m.sum(axis=axis), r.sum(axis=axis)),
    "f1": lambda m, g, r, axis=-1: _ratio(2 * m.sum(axis=axis), (g + r).sum(axis=axis)),
    "mean": lambda total, count, axis=-1: _ratio(total.sum(axis=axis), count.sum(axis=axis)),
}


def group_sums(counts: np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """``counts`` summed per group (``groups[i]``: row i's group): one row per group, in order."""
    return pd.DataFrame(counts).groupby(np.asarray(groups)).sum().to_numpy(float)


def interval(counts: np.ndarray, statistic: str) -> tuple[float, float]:
    """The bootstrap interval of ``STATISTICS[statistic]`` over the rows of ``counts``: BCa, or
    percentile where BCa is undefined; NaN for fewer than two rows."""
    if len(counts) < 2:
        return math.nan, math.nan
    function = STATISTICS[statistic]
    value = float(function(*counts.T))
    jackknife = [float(function(*np.delete(counts, i, axis=0).T)) for i in range(len(counts))]
    if max(jackknife) == min(jackknife) == value:  # every resample scores the same
        return value, value
    from scipy.stats import bootstrap  # deferred: ~1.7 s to import, paid only here

    for method in ("BCa", "percentile"):
        result = bootstrap(tuple(counts.T), function, paired=True, vectorized=True, axis=-1,
                           n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method=method,
                           rng=np.random.default_rng(SEED))
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(low), float(high)
    return math.nan, math.nan


REPEAT_SCORES = ("validation_loss", "symptom_f1", "word_f1")
# beside a cross-validated score: what each fold's held-out diseases give without training
REFERENCE_SCORES = tuple(f"{answers}_{score}" for answers in
                         ("baseline_constant", "baseline_lookup", "untuned")
                         for score in ("symptom_f1", "word_f1"))


def mean_interval(values: pd.Series) -> tuple[float, ...]:
    """(mean, standard deviation, Student-t low and high) of ``values`` less NaNs, or NaNs."""
    values = values.dropna()
    if len(values) < 2:
        return values.mean(), math.nan, math.nan, math.nan  # the mean of none: NaN
    from scipy.stats import t  # deferred: ~1.7 s to import, and only seeds or folds need it

    mean, spread = values.mean(), values.std()
    half = t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * spread / math.sqrt(len(values))
    return mean, spread, mean - half, mean + half


def over(table: pd.DataFrame, axes: tuple[str, ...], axis: str,
         pooled: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """One row per recipe of a sweep's finished children, over ``axis`` ("seed" or "fold"; runs
    differing by ``pooled`` averaged first): the values that finished, and each score's mean,
    ``_std``, ``_ci_low`` and ``_ci_high``. None when no recipe has two."""
    finished = table[table["status"] == "FINISHED"]
    recipe = [name for name in axes if name != axis and name not in pooled]
    if finished.empty or finished.groupby(recipe)[axis].nunique().max() < 2:
        return None
    scores = [name for name in (*REPEAT_SCORES, *REFERENCE_SCORES) if name in table]
    rows = []
    for values, children in finished.groupby(recipe, sort=False):
        by_value = children.astype(dict.fromkeys(scores, float)).groupby(axis)[scores].mean()
        row = dict(zip(recipe, values, strict=True))
        row[f"{axis}s"] = " ".join(str(value) for value in by_value.index)
        for name in pooled:
            row[f"{name}s"] = " ".join(str(value) for value in sorted(set(children[name])))
        for score in scores:
            (row[score], row[f"{score}_std"], row[f"{score}_ci_low"],
             row[f"{score}_ci_high"]) = mean_interval(by_value[score])
        rows.append(row)
    return pd.DataFrame(rows)


# a run's scores in its summary row (a sweep's table): the kept epoch's F1s and their intervals
SUMMARY_SCORES = ("symptom_f1", "symptom_f1_ci_low", "symptom_f1_ci_high",
                  "word_f1", "word_f1_ci_low", "word_f1_ci_high")
# each score with an interval: (its name, the counts it is made of, the statistic)
SCORES = (("symptom_precision", "symptom", "precision"), ("symptom_recall", "symptom", "recall"),
          ("symptom_f1", "symptom", "f1"), ("word_f1", "word", "f1"))


@dataclass(frozen=True)
class AnswerScores:
    """Micro-averaged phrase and word scores of a set of answers, with their intervals."""

    symptom: SymptomScore
    word: SymptomScore
    intervals: dict[str, tuple[float, float]]  # of each of ``SCORES``

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """``symptom_f1`` and the others, each followed by its ``_ci_low`` and ``_ci_high``."""
        metrics = {}
        for name, counts, statistic in SCORES:
            metrics[f"{prefix}{name}"] = getattr(getattr(self, counts), statistic)
            metrics[f"{prefix}{name}_ci_low"], metrics[f"{prefix}{name}_ci_high"] = \
                self.intervals[name]
        return metrics


def interval_text(metrics: dict[str, float], name: str, digits: int = 3) -> str:
    """"0.312 [0.251-0.372]" (the score and its interval), or the score alone without one."""
    text = f"{metrics[name]:.{digits}f}"
    low, high = metrics.get(f"{name}_ci_low", math.nan), metrics.get(f"{name}_ci_high", math.nan)
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{digits}f}-{high:.{digits}f}]"
    return text


def scores_text(scores: dict[str, float]) -> str:
    """"validation_loss 2.4939, symptom_f1 0.2569 [0.2112-0.3031], ... ([low-high]: 95%
    intervals over the held-out name groups)"."""
    shown = [name for name in scores if not name.endswith(("_ci_low", "_ci_high"))]
    text = ", ".join(f"{name} {interval_text(scores, name, digits=4)}" for name in shown)
    if len(shown) < len(scores):
        text += f" ([low-high]: {CONFIDENCE:.0%} intervals over the held-out name groups)"
    return text


def group_numbers(frame: pd.DataFrame, per_row: bool = False) -> list[int]:
    """The name group (what intervals resample) of each distinct disease, or of each row."""
    group_of = {name: number for number, group in enumerate(group_diseases(frame))
                for name in group}
    keys = [name.casefold() for name in frame["Name"]] if per_row else references_by_disease(frame)
    return [group_of[key] for key in keys]


def per_row(counts: np.ndarray, statistic: str) -> np.ndarray:
    """``STATISTICS[statistic]`` of each row of ``counts`` on its own (one disease's score)."""
    return STATISTICS[statistic](*counts.T[:, :, None])


def answer_counts(answers: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Each answer's phrase (``"symptom"``) and ``"word"`` counts: (matched, generated, ref.)."""
    return {kind: np.array([astuple(score(answer, reference)) for answer, reference in
                            zip(answers, references, strict=True)], dtype=float).reshape(-1, 3)
            for kind, score in (("symptom", score_symptoms), ("word", score_words))}


def score_answers(answers: Sequence[str], frame: pd.DataFrame) -> tuple[pd.DataFrame, AnswerScores]:
    """(per-disease table, ``AnswerScores``) of one answer per distinct disease of ``frame``."""
    names, references = zip(*references_by_disease(frame).values(), strict=True)
    counts = answer_counts(answers, references)
    groups = group_numbers(frame)
    table = pd.DataFrame({"disease": names, **{name: per_row(counts[kind], statistic)
                                               for name, kind, statistic in SCORES},
                          "generated": list(answers), "reference": references, "group": groups})
    symptom, word = (SymptomScore(*counts[kind].sum(axis=0).astype(int).tolist())
                     for kind in ("symptom", "word"))
    intervals = {name: interval(group_sums(counts[kind], groups), statistic)
                 for name, kind, statistic in SCORES}
    return table, AnswerScores(symptom, word, intervals)


def baseline_scores(train_frame: pd.DataFrame, validation_frame: pd.DataFrame) -> dict[str, tuple]:
    """``score_answers`` of the answers that need no model, from the training rows only."""
    names = [name for name, _ in references_by_disease(validation_frame).values()]
    constant = constant_answer(train_frame)
    return {
        "constant": score_answers([constant] * len(names), validation_frame),
        "lookup": score_answers(nearest_name_answers(train_frame, names, constant),
                                validation_frame),
    }


def evaluate_symptoms(model, tokenizer, frame, max_new_tokens: int = 40, *,
                      repetition_penalty: float = SCORING_REPETITION_PENALTY,
                      num_beams: int = 1) -> tuple[pd.DataFrame, AnswerScores]:
    """``score_answers`` of greedy (or beam-search) answers, in as few batches as ``generate``
    allows (78 names: 10.2 s in one batch, 13.6 s in two)."""
    names = [name for name, _ in references_by_disease(frame).values()]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=repetition_penalty, num_beams=num_beams)
    answers = [texts[0] for texts in generate(model, tokenizer, names, settings)]
    return score_answers(answers, frame)
