"""The champion rule: ``@champion`` moves to a new version only when it is better than the
champion with confidence, on the same evaluation key and paired on the same evidence: each
validation row's loss for ``validation_loss`` (``VALIDATION_LOSSES``, logged at registration),
each held-out disease's kept-epoch answer for ``symptom_f1`` (``symptom_scores.json``). The
threshold: the ``CONFIDENCE`` bootstrap interval of the paired difference, name groups
resampled together, lies wholly on the better side of 0.

The rule compares two models, not two recipes: the same recipe with another training seed is
another model, and takes the alias when it is better with confidence on these diseases. Whether
a recipe is better is a question for several seeds (``medlm.repeats``, ``experiments.compare
A1,A2 B1,B2``)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medlm.compare import Side, kept_answers, paired_difference, paired_score
from medlm.errors import MedLMError
from medlm.heldout import row_group_numbers
from medlm.intervals import CONFIDENCE, group_sums
from medlm.registry import CHAMPION_ALIAS, KEY_PARAMS_BY_SELECTION, KEY_PARAMS_LEFT_OUT_AT
from medlm.tracking import VALIDATION_LOSSES, MlflowTracker, logged_row_losses

_PROMOTE_HINT = " (--promote makes it the champion anyway)"


def validation_loss_table(losses: np.ndarray, frame: pd.DataFrame) -> pd.DataFrame:
    """``train.row_losses`` of the validation rows ``frame``, with each row's disease and name
    group: the evidence a loss comparison pairs."""
    if len(losses) != len(frame):
        raise ValueError(f"{len(losses)} row losses for {len(frame)} validation rows")
    return pd.DataFrame({"row": range(len(frame)), "disease": frame["Name"].tolist(),
                         "group": row_group_numbers(frame), "loss_sum": losses[:, 0],
                         "tokens": losses[:, 1].astype(int)})


def loss_evidence(champion: ModelVersion, version: ModelVersion) -> dict[str, float] | str:
    """The paired difference (``version`` minus ``champion``) of the validation loss per token
    on the same rows, each at its version's kept epoch, with its interval; or why there is
    none."""
    try:
        theirs, ours = (logged_row_losses(side.run_id, int(side.tags["best_epoch"]))
                        for side in (champion, version))
    except (MlflowException, KeyError, ValueError) as error:  # a deleted run, an old version
        return f"the versions' per-row validation losses cannot be read ({error})"
    if theirs is None or ours is None:
        which = "the champion's run" if theirs is None else "this run"
        return (f"{which} has no per-row validation losses ({VALIDATION_LOSSES}; logged by "
                "MedLM since its champion rule pairs them)")
    same_rows = (theirs["disease"].tolist() == ours["disease"].tolist()
                 and theirs["tokens"].tolist() == ours["tokens"].tolist())
    if not same_rows:
        return "their validation rows differ (diseases or token counts)"
    grouped = [group_sums(table[["loss_sum", "tokens"]].to_numpy(float), ours["group"])
               for table in (theirs, ours)]
    try:
        return paired_difference(*grouped, "mean", p_value=False)
    except MedLMError as error:  # one name group held out: nothing to resample
        return str(error)


def score_evidence(champion: ModelVersion, version: ModelVersion,
                   score: str) -> dict[str, float] | str:
    """The paired difference (``version`` minus ``champion``) of ``score`` on the same held-out
    diseases, from each version's kept-epoch answers, with its interval; or why there is
    none."""
    try:
        a, b = (Side(f"version {side.version}", [run := MlflowClient().get_run(side.run_id)],
                     [kept_answers(run, f"version {side.version}",
                                   int(side.tags["best_epoch"]))])
                for side in (champion, version))
        return paired_score(a, b, score)
    except (MedLMError, MlflowException, KeyError, ValueError) as error:
        return str(error)


def _not_comparable(champion_tags: dict[str, str], tags: dict[str, str],
                    select_by: str) -> str | None:
    """Why the champion and a new version cannot be compared on ``select_by``; None if they can."""
    if "evaluation_key_json" not in champion_tags:
        return ("not compared: the champion has no evaluation key (registered before MedLM "
                "recorded one)" + _PROMOTE_HINT)
    # a version registered before select_by was tagged was selected by the validation loss
    champion_rule = champion_tags.get("select_by", "validation_loss")
    if champion_rule != select_by:
        return (f"not compared: the champion was selected by {champion_rule}, this version by "
                f"{select_by}" + _PROMOTE_HINT)
    theirs = json.loads(champion_tags["evaluation_key_json"])
    ours = json.loads(tags["evaluation_key_json"])
    differences = "; ".join(
        f"{'split_seed' if name == 'seed' else name} "
        f"{_short(theirs.get(name, KEY_PARAMS_LEFT_OUT_AT.get(name)))} vs "
        f"{_short(ours.get(name, KEY_PARAMS_LEFT_OUT_AT.get(name)))}"
        for name in KEY_PARAMS_BY_SELECTION[select_by] if theirs.get(name) != ours.get(name))
    if differences:
        return f"not compared: a different evaluation ({differences})" + _PROMOTE_HINT
    if select_by not in champion_tags or select_by not in tags:
        return f"not compared: {select_by} is missing on one of the two versions" + _PROMOTE_HINT
    return None


def _short(value: str | None) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "all"
    return value[:12] if len(value) == 64 else value


def _versus(current: ModelVersion, tracker: MlflowTracker, version: str, label: str,
            shown: str, select_by: str) -> tuple[str | None, str | None]:
    """(what crowns ``label``, or why not) against the comparable champion ``current``."""
    new = MlflowClient().get_model_version(tracker.registered_model, version)
    if select_by == "validation_loss":
        evidence, rows = loss_evidence(current, new), "validation rows"
    else:
        evidence, rows = score_evidence(current, new, select_by), "held-out diseases"
    if isinstance(evidence, str):
        return None, f"not compared with confidence: {evidence}" + _PROMOTE_HINT
    low, high = evidence["ci_low"], evidence["ci_high"]
    better = high < 0 if select_by == "validation_loss" else low > 0
    theirs = f"version {current.version}'s {float(current.tags[select_by]):.4f}"
    detail = (f"{evidence['difference']:+.4f}, {CONFIDENCE:.0%} CI {low:+.4f}..{high:+.4f}, "
              f"paired on the same {rows}")
    if better:
        return (f"{label} is the new champion: {shown} beats {theirs} with confidence "
                f"({detail}; same evaluation key)"), None
    return None, f"{label}'s {shown} is not better than {theirs} with confidence ({detail})"


def maybe_crown(tracker: MlflowTracker, version: str, tags: dict[str, str], select_by: str,
                promote: bool, fold: bool = False) -> str:
    """Move ``@champion`` to ``version`` when no version holds it yet, when ``promote``, or
    when it is better than the champion with confidence (module docstring); say which, or
    why not. A ``fold`` of a cross-validation (trained without one of its folds, and held out
    on diseases no other run is) moves it only when ``promote``. The run's tag ``champion``
    records the outcome."""
    client = MlflowClient()
    name = tracker.registered_model
    if fold and not promote:
        mlflow.set_tag("champion", "false")
        return (f"{name} version {version} is not made the champion: a cross-validation fold"
                + _PROMOTE_HINT)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    label = f"{name} version {version}"
    value = float(tags[select_by]) if select_by in tags else None
    shown = f"{select_by} {value:.4f}" if value is not None else f"no {select_by}"
    reason = None
    if current is not None and current.version == version:  # crowned before a kill
        return f"{label} is the champion ({shown})"
    if current is None:
        crowned = f"{label} is the first champion ({shown})"
    elif promote:
        crowned = f"{label} is the champion by --promote ({shown}), replacing version " \
                  f"{current.version} without comparing"
    else:
        crowned, reason = None, _not_comparable(current.tags, tags, select_by)
        if reason is None:
            crowned, reason = _versus(current, tracker, version, label, shown, select_by)
    if crowned:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
        mlflow.set_tag("champion", "true")
        return crowned
    mlflow.set_tag("champion", "false")
    return f"champion stays at version {current.version}: {reason}"
