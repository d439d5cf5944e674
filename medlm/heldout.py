"""A set of answers scored on held-out diseases: the per-disease table, the micro-averaged scores
(``medlm.metrics``) with their bootstrap intervals over name groups (``medlm.intervals``), and
the answers that need no model scored the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medlm import intervals
from medlm.metrics import (
    SymptomScore,
    constant_answer,
    micro_average,
    nearest_name_answers,
    references_by_disease,
    score_symptoms,
    score_words,
)
from medlm.split import group_diseases

# a run's scores in its summary row (a sweep's table): the kept epoch's F1s and their intervals
SUMMARY_SCORES = ("symptom_f1", "symptom_f1_ci_low", "symptom_f1_ci_high",
                  "word_f1", "word_f1_ci_low", "word_f1_ci_high")
# each score with an interval: (its name, the counts it is made of, the statistic)
SCORES = (("symptom_precision", "symptom", "precision"), ("symptom_recall", "symptom", "recall"),
          ("symptom_f1", "symptom", "f1"), ("word_f1", "word", "f1"))


@dataclass(frozen=True)
class AnswerScores:
    """Micro-averaged scores of a set of answers: phrase level and whole-answer word level,
    and each score's ``intervals.CONFIDENCE`` interval (low, high)."""

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
        text += f" ([low-high]: {intervals.CONFIDENCE:.0%} intervals over the held-out name groups)"
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
    counts = {kind: intervals.group_sums(count_rows(scores), groups)
              for kind, scores in (("symptom", symptom), ("word", word))}
    return {name: intervals.interval(counts[kind], statistic)
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
