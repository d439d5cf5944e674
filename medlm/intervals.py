"""Confidence intervals of held-out scores: a bootstrap over the held-out diseases that
resamples whole name groups, with SciPy's ``scipy.stats.bootstrap`` (BCa).

The split keeps each group of related names (``medlm.split.group_diseases``) on one side, so
the unit a score is a sample of is the group: resampling single diseases would treat "type 1
diabetes" and "type 2 diabetes" as independent draws and make the interval too narrow. The
scores are micro-averages (matched / written and matched / reference phrases summed over
diseases), so each resample sums its groups' counts before dividing, as the score itself does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
