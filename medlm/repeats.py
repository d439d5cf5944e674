"""Several runs of one recipe as one figure: a sweep's children that differ only by their
training ``seed``, or only by their cross-validation ``fold``; each score's mean over them,
its standard deviation and its Student-t interval (the runs are the sample: a few, so t rather
than a bootstrap; one finished run has no interval; folds share training rows, so their
interval is the usual cross-validation approximation, a little narrow)."""

from __future__ import annotations

import math

import pandas as pd

from medlm.intervals import CONFIDENCE

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
