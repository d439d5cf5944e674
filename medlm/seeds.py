"""Several training seeds of one recipe as one figure: a sweep's children that differ only by
``--seed``, each score's mean over those seeds with its Student-t interval (the seeds are the
sample: a few runs, so t rather than a bootstrap; one finished seed has no interval)."""

from __future__ import annotations

import math

import pandas as pd

from medlm.intervals import CONFIDENCE

SEED_SCORES = ("validation_loss", "symptom_f1", "word_f1")


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float,
                                                                                float]:
    """(mean, low, high) of ``values`` (NaNs left out); NaN ends for fewer than two."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    # deferred: importing scipy.stats takes ~1.7 s, and only a sweep over seeds needs it
    from scipy.stats import t

    spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * spread / math.sqrt(len(values))
    return mean, mean - half, mean + half


def over_seeds(table: pd.DataFrame, sweepable: tuple[str, ...]) -> pd.DataFrame | None:
    """One row per recipe (the swept values other than ``seed``) of a sweep's finished
    children: how many seeds finished, and each of ``SEED_SCORES`` as its mean with
    ``_ci_low`` / ``_ci_high``. None when no recipe has two seeds."""
    finished = table[table["status"] == "FINISHED"]
    recipe = [name for name in sweepable if name != "seed"]
    if finished.empty or finished.groupby(recipe).size().max() < 2:
        return None
    rows = []
    for values, children in finished.groupby(recipe, sort=False):
        children = children.sort_values("seed")
        row = dict(zip(recipe, values, strict=True))
        row["seeds"] = " ".join(str(seed) for seed in children["seed"])
        for score in SEED_SCORES:
            row[score], row[f"{score}_ci_low"], row[f"{score}_ci_high"] = mean_interval(
                children[score].astype(float).tolist())
        rows.append(row)
    return pd.DataFrame(rows)
