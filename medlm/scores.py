"""Confidence intervals of held-out scores: a bootstrap over the held-out diseases that
resamples whole name groups, with SciPy's ``scipy.stats.bootstrap`` (BCa).

The split keeps each group of related names (``medlm.split.group_diseases``) on one side, so
the unit a score is a sample of is the group: resampling single diseases would treat "type 1
diabetes" and "type 2 diabetes" as independent draws and make the interval too narrow. The
scores are micro-averages (matched / written and matched / reference phrases summed over
diseases), so each resample sums its groups' counts before dividing, as the score itself does.

Several runs of one recipe as one figure: a sweep's children that differ only by their
training ``seed``, or only by their cross-validation ``fold``; each score's mean over them,
its standard deviation and its Student-t interval (the runs are the sample: a few, so t rather
than a bootstrap; one finished run has no interval; folds share training rows, so their
interval is the usual cross-validation approximation, a little narrow).

A set of answers scored on held-out diseases: the per-disease table, the micro-averaged scores
(``medlm.metrics``) with their bootstrap intervals over name groups (``medlm.scores``), and
the answers that need no model scored the same way.

A model's held-out score: its greedy answers for every validation disease
(``medlm.generate``), scored by ``medlm.metrics``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medlm.generate import GenerationSettings, generate
from medlm.metrics import (
    SCORING_REPETITION_PENALTY,
    SymptomScore,
    constant_answer,
    micro_average,
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


def _precision(matched, generated, reference, axis=-1):
    return _ratio(matched.sum(axis=axis), generated.sum(axis=axis))


def _recall(matched, generated, reference, axis=-1):
    return _ratio(matched.sum(axis=axis), reference.sum(axis=axis))


def _f1(matched, generated, reference, axis=-1):
    """2PR / (P + R) of the summed counts, which is 2 matched / (generated + reference)."""
    return _ratio(2 * matched.sum(axis=axis), generated.sum(axis=axis) + reference.sum(axis=axis))


def _mean(total, count, axis=-1):
    """A per-token mean of summed rows (loss sum, tokens): the validation loss."""
    return _ratio(total.sum(axis=axis), count.sum(axis=axis))


# each a function of the columns of summed rows (counts: matched, generated, reference)
STATISTICS = {"precision": _precision, "recall": _recall, "f1": _f1, "mean": _mean}


def group_sums(counts: np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """``counts`` (one row per disease or validation row: matched, generated, reference; or
    loss sum, tokens) summed per group
    (``groups[i]`` is disease i's group number): one row per group."""
    groups = np.asarray(groups)
    sums = np.zeros((groups.max(initial=-1) + 1, counts.shape[1]))
    np.add.at(sums, groups, counts)
    return sums


def interval(counts: np.ndarray, statistic: str,
             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The ``confidence`` interval of the micro-averaged ``statistic`` ("precision", "recall",
    "f1") of ``counts`` (one row per resampling unit: matched, generated, reference): BCa, or
    the percentile interval where BCa is undefined. NaN for fewer than two units."""
    if len(counts) < 2:
        return math.nan, math.nan
    function = STATISTICS[statistic]
    value = float(function(*counts.T))
    columns = tuple(counts.T)
    jackknife = [float(function(*np.delete(counts, i, axis=0).T)) for i in range(len(counts))]
    if max(jackknife) == min(jackknife) == value:  # every resample scores the same
        return value, value
    # deferred: importing scipy.stats takes ~1.7 s, paid only where an interval is computed
    # (not by the commands that read CONFIDENCE before their --help or their first score)
    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        result = bootstrap(columns, function, paired=True, vectorized=True, axis=-1,
                           n_resamples=RESAMPLES, confidence_level=confidence, method=method,
                           rng=np.random.default_rng(SEED))
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(low), float(high)
    return math.nan, math.nan


REPEAT_SCORES = ("validation_loss", "symptom_f1", "word_f1")
# beside a cross-validated score, what each fold's held-out diseases give without training:
# the answers that need no model and the untuned base
REFERENCE_SCORES = tuple(f"{answers}_{score}" for answers in
                         ("baseline_constant", "baseline_lookup", "untuned")
                         for score in ("symptom_f1", "word_f1"))


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float,
                                                                                float, float]:
    """(mean, standard deviation, low, high) of ``values`` (NaNs left out); NaN where there
    are too few."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    # deferred: importing scipy.stats takes ~1.7 s, and only a sweep over seeds or folds needs it
    from scipy.stats import t

    spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * spread / math.sqrt(len(values))
    return mean, spread, mean - half, mean + half


def over(table: pd.DataFrame, axes: tuple[str, ...], axis: str,
         pooled: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """One row per recipe (the values of ``axes`` other than ``axis``, "seed" or "fold", and
    ``pooled``) of a sweep's finished children: which values of ``axis`` finished (column
    ``seeds`` or ``folds``), and each of ``REPEAT_SCORES`` (and the ``REFERENCE_SCORES`` the
    table has) as its mean with ``_std``, ``_ci_low`` and ``_ci_high`` over them; the runs of
    one value of ``axis`` that differ by ``pooled`` ("seed", over folds) are averaged first.
    None when no recipe has two."""
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
             row[f"{score}_ci_high"]) = mean_interval(by_value[score].astype(float).tolist())
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
    """Micro-averaged scores of a set of answers: phrase level and whole-answer word level,
    and each score's ``CONFIDENCE`` interval (low, high)."""

    symptom: SymptomScore
    word: SymptomScore
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """``symptom_f1`` and the others, each followed by ``symptom_f1_ci_low`` and
        ``symptom_f1_ci_high`` where it has an interval."""
        metrics = {}
        for name, counts, statistic in SCORES:
            score = getattr(self, counts)
            metrics[f"{prefix}{name}"] = getattr(score, statistic)
            if name in self.intervals:
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


def _group_of(frame: pd.DataFrame) -> dict[str, int]:
    return {name: number for number, group in enumerate(group_diseases(frame)) for name in group}


def group_numbers(frame: pd.DataFrame) -> list[int]:
    """For each distinct disease of ``frame`` (in ``references_by_disease`` order), the number
    of its name group: the unit the intervals resample."""
    group_of = _group_of(frame)
    return [group_of[key] for key in references_by_disease(frame)]


def row_group_numbers(frame: pd.DataFrame) -> list[int]:
    """``group_numbers`` for each row of ``frame`` (a disease's rows share its group)."""
    group_of = _group_of(frame)
    return [group_of[name.casefold()] for name in frame["Name"]]


def count_rows(scores: Sequence[SymptomScore]) -> np.ndarray:
    """One row per answer: (matched, generated, reference), what the intervals resample."""
    return np.array([(s.matched, s.generated, s.reference) for s in scores], dtype=float)


def answer_counts(answers: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """``count_rows`` of each answer's symptom and word score against its reference."""
    return {kind: count_rows([score(answer, reference) for answer, reference
                              in zip(answers, references, strict=True)])
            for kind, score in (("symptom", score_symptoms), ("word", score_words))}


def score_intervals(symptom: list[SymptomScore], word: list[SymptomScore],
                    groups: list[int]) -> dict[str, tuple[float, float]]:
    counts = {kind: group_sums(count_rows(scores), groups)
              for kind, scores in (("symptom", symptom), ("word", word))}
    return {name: interval(counts[kind], statistic)
            for name, kind, statistic in SCORES}


def score_answers(answers: Sequence[str], frame: pd.DataFrame):
    """Score one answer per distinct disease of ``frame`` (in ``references_by_disease`` order).

    Returns (per-disease table as a DataFrame, micro-averaged ``AnswerScores`` with their
    intervals).
    """
    references = list(references_by_disease(frame).values())
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} diseases")
    rows, symptom_scores, word_scores = [], [], []
    for (name, reference), answer in zip(references, answers, strict=True):
        symptom, word = score_symptoms(answer, reference), score_words(answer, reference)
        symptom_scores.append(symptom)
        word_scores.append(word)
        rows.append({"disease": name, "symptom_precision": symptom.precision,
                     "symptom_recall": symptom.recall, "symptom_f1": symptom.f1,
                     "word_f1": word.f1, "generated": answer, "reference": reference})
    groups = group_numbers(frame)
    scores = AnswerScores(micro_average(symptom_scores), micro_average(word_scores),
                          score_intervals(symptom_scores, word_scores, groups))
    return pd.DataFrame(rows).assign(group=groups), scores


def baseline_scores(train_frame: pd.DataFrame, validation_frame: pd.DataFrame) -> dict[str, tuple]:
    """``{"constant": (table, AnswerScores), "lookup": (...)}`` on the validation diseases,
    built from the training rows only."""
    names = [name for name, _ in references_by_disease(validation_frame).values()]
    constant = constant_answer(train_frame)
    return {
        "constant": score_answers([constant] * len(names), validation_frame),
        "lookup": score_answers(nearest_name_answers(train_frame, names, constant),
                                validation_frame),
    }


def evaluate_symptoms(model, tokenizer, frame, max_new_tokens: int = 40, *,
                      repetition_penalty: float = SCORING_REPETITION_PENALTY,
                      num_beams: int = 1):
    """Greedy-decode (or, with ``num_beams`` > 1, beam-search) every distinct disease of
    ``frame`` and score it against its symptoms.

    The names go to ``generate`` together, which decodes them in as few batches as its bound
    allows: a decoding step of SmolLM2-135M costs a fixed ~70 ms plus ~2.5 ms per sequence
    (2-core AVX512-BF16 CPU, fp32), so 40 names take 6.9 s in one batch against 11.8 s in
    batches of 16, and 78 names 10.2 s in one against 13.6 s in two.

    Returns (per-disease table as a DataFrame, micro-averaged ``AnswerScores``).
    """
    names = [name for name, _ in references_by_disease(frame).values()]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=repetition_penalty, num_beams=num_beams)
    answers = [texts[0] for texts in generate(model, tokenizer, names, settings)]
    return score_answers(answers, frame)
