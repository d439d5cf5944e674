"""Two models compared on the same held-out diseases (each score's paired difference, its
interval over name groups, a permutation p-value), and the champion rule: ``@champion`` moves
only to a version whose paired difference's interval lies wholly on the better side of 0."""

import json
import re
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medlm import registry, scores
from medlm.errors import MedLMError
from medlm.inference import source_run
from medlm.tracking import VALIDATION_LOSSES, MlflowTracker, logged_row_losses, logged_table

PERMUTATIONS = 9999  # two-sided: the smallest p-value is 2 / (PERMUTATIONS + 1) = 0.0002
_PROMOTE_HINT = " (--promote makes it the champion anyway)"


@dataclass
class Side:
    """What was asked, its runs (several: seeds of one recipe) and their kept-epoch answers."""

    asked: str
    runs: list[Run]
    answers: list[pd.DataFrame]


def kept_answers(run: Run, asked: str, epoch: int | None = None) -> pd.DataFrame:
    """The run's scored answers at its kept epoch (or ``epoch``), one row per disease."""
    best = run.data.metrics.get("best_epoch") if epoch is None else epoch
    frame = None if best is None else logged_table(run.info.run_id, "symptom_scores.json")
    if frame is None:
        raise MedLMError(f"{asked!r} (run {run.info.run_id}) has no scored answers: expected "
                         "a finished run trained with --symptom-eval (the default)")
    kept = frame[frame["epoch"] == int(best)]
    if kept.empty:
        raise MedLMError(f"{asked!r} (run {run.info.run_id}): no answers logged at its kept "
                         f"epoch {int(best)}: expected a run that scored its kept epoch")
    return kept[["disease", "generated", "reference"]].reset_index(drop=True)


def load_side(asked: str, registered_model: str) -> Side:
    """``asked``: one run (a run id, a version number of ``registered_model``, a ``models:/`` or
    ``runs:/`` URI) or several, comma-separated."""
    parts = [part.strip() for part in asked.split(",") if part.strip()]
    runs = [source_run(f"runs:/{part}" if re.fullmatch("[0-9a-f]{32}", part) else part,
                       registered_model) for part in parts]
    for part, run in zip(parts, runs, strict=True):
        if run is None:
            raise MedLMError(f"{part!r} is not a logged model: expected a run id, a version "
                             "number or a models:/ or runs:/ URI (a local model has no "
                             "held-out diseases to compare on)")
    if len({run.info.run_id for run in runs}) < len(runs):
        raise MedLMError(f"{asked!r} names a run twice: expected each run once")
    return Side(asked, runs, [kept_answers(run, part) for run, part in
                              zip(runs, parts, strict=True)])


def _differences(theirs: dict, ours: dict, select_by: str, shown=dict.get) -> str:
    """The evaluation-key fields ``select_by`` depends on that differ: "name theirs vs ours"."""
    return "; ".join(f"{'split_seed' if name == 'seed' else name} {shown(theirs, name)} vs "
                     f"{shown(ours, name)}" for name in registry.KEY_PARAMS_BY_SELECTION[select_by]
                     if theirs.get(name) != ours.get(name))


def check_comparable(a: Side, b: Side) -> None:
    """The same held-out diseases, metric and answer length, or a refusal naming the change."""
    first = registry.evaluation_key(a.runs[0].data.params)
    for side in (a, b):
        for run in side.runs:
            key = registry.evaluation_key(run.data.params)
            if differ := _differences(first, key, "symptom_f1"):
                other = side.asked if len(side.runs) == 1 else f"run {run.info.run_id}"
                raise MedLMError(f"{a.asked} and {other} were not scored on the same held-out "
                                 f"diseases by the same metric ({differ}): expected "
                                 "runs with the same evaluation key (dataset, split, metric, "
                                 "answer length)")


def paired_difference(a: np.ndarray, b: np.ndarray, statistic: str,
                      p_value: bool = True) -> dict[str, float]:
    """B - A of the ``statistic`` of each group's summed counts, its bootstrap interval
    (groups resampled together) and a two-sided permutation p-value (sides swapped)."""
    from scipy.stats import bootstrap, permutation_test  # deferred: ~1.7 s to import

    function, both, size = scores.STATISTICS[statistic], np.concatenate([a, b]), len(a)
    if size < 2:
        raise MedLMError(f"{size} name group held out: expected at least two to compare on "
                         "(more validation rows: --validation-fraction, --max-samples)")

    def difference(on_a, on_b, axis=-1):  # indices into ``both``
        return (function(*np.moveaxis(both[on_b], -1, 0), axis=-1)
                - function(*np.moveaxis(both[on_a], -1, 0), axis=-1))

    indices = (np.arange(size), np.arange(size) + size)
    spread = bootstrap(indices, difference, paired=True, vectorized=True, axis=-1,
                       n_resamples=scores.RESAMPLES, confidence_level=scores.CONFIDENCE,
                       method="percentile", rng=np.random.default_rng(scores.SEED))
    low, high = spread.confidence_interval
    result = {"difference": float(difference(*indices)), "ci_low": float(low),
              "ci_high": float(high)}
    if p_value:
        test = permutation_test(indices, difference, permutation_type="samples",
                                vectorized=True, axis=-1, n_resamples=PERMUTATIONS,
                                rng=np.random.default_rng(scores.SEED))
        result["p_value"] = float(test.pvalue)
    return result


def _counted(a: Side, b: Side) -> tuple[pd.Series, list[int], dict, dict]:
    """(diseases, their groups, each side's answers and counts per disease in that order)."""
    diseases = a.answers[0]["disease"]
    for table in (*a.answers, *b.answers):
        if sorted(table["disease"]) != sorted(diseases):
            raise MedLMError(f"{a.asked} and {b.asked} answered different diseases: expected "
                             "the same held-out diseases")
    aligned = {label: [table.set_index("disease").loc[diseases].reset_index()
                       for table in side.answers] for label, side in (("a", a), ("b", b))}
    references = aligned["a"][0]["reference"]
    groups = scores.group_numbers(pd.DataFrame({"Name": diseases, "Symptoms": references}))
    counts = {}
    for label, tables in aligned.items():
        counted = [scores.answer_counts(table["generated"], references) for table in tables]
        # the mean, not the sum: the same ratios, and a permutation that swaps a group's two
        # sides swaps like for like when the sides have different run counts
        counts[label] = {kind: sum(run[kind] for run in counted) / len(counted)
                         for kind in ("symptom", "word")}
    return diseases, groups, aligned, counts


def _paired(counts: dict, groups: list[int], score: str, p_value: bool = True) -> dict:
    """``score`` (a name of ``scores.SCORES``) of A and B, and ``paired_difference``."""
    _, kind, statistic = next(row for row in scores.SCORES if row[0] == score)
    function = scores.STATISTICS[statistic]
    return {"A": float(function(*counts["a"][kind].T)), "B": float(function(*counts["b"][kind].T)),
            **paired_difference(*(scores.group_sums(counts[side][kind], groups) for side in "ab"),
                                statistic, p_value=p_value)}


def compare(a: Side, b: Side) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per score: A, B, B - A, interval, p-value; per disease, largest difference first)."""
    diseases, groups, aligned, counts = _counted(a, b)
    by_score = pd.DataFrame([{"score": name, **_paired(counts, groups, name)}
                             for name, _, _ in scores.SCORES])
    f1 = {side: scores.per_row(counts[side]["symptom"], "f1") for side in "ab"}
    per_disease = pd.DataFrame({
        "disease": diseases, "group": groups, "symptom_f1_a": f1["a"], "symptom_f1_b": f1["b"],
        "difference": f1["b"] - f1["a"], "generated_a": aligned["a"][0]["generated"],
        "generated_b": aligned["b"][0]["generated"]})
    order = per_disease["difference"].abs().sort_values(ascending=False, kind="stable").index
    return by_score, per_disease.loc[order].reset_index(drop=True)


def log_comparison(a: Side, b: Side, by_score: pd.DataFrame, per_disease: pd.DataFrame) -> str:
    """The comparison as an MLflow run of its own in A's experiment; its run id."""
    with mlflow.start_run(experiment_id=a.runs[0].info.experiment_id,
                          run_name=f"compare {a.asked} vs {b.asked}"[:250]) as run:
        mlflow.log_params({"a": a.asked, "b": b.asked, "held_out_diseases": len(per_disease),
                           "confidence": scores.CONFIDENCE,
                           **{f"{label}_run_id": ",".join(run.info.run_id for run in side.runs)
                              for label, side in (("a", a), ("b", b))}})
        mlflow.log_metrics({f"{row.score}_{name}": getattr(row, name) for row in
                            by_score.itertuples() for name in
                            ("difference", "ci_low", "ci_high", "p_value")})
        mlflow.log_text(by_score.to_csv(index=False), "compare.csv")
        mlflow.log_text(per_disease.to_csv(index=False), "compare_diseases.csv")
        return run.info.run_id


def validation_loss_table(losses: np.ndarray, frame: pd.DataFrame) -> pd.DataFrame:
    """``train.row_losses`` of ``frame``'s rows with their diseases and name groups."""
    return pd.DataFrame({"row": range(len(frame)), "disease": frame["Name"].tolist(),
                         "group": scores.group_numbers(frame, per_row=True),
                         "loss_sum": losses[:, 0], "tokens": losses[:, 1].astype(int)})


def loss_evidence(champion: ModelVersion, version: ModelVersion) -> dict[str, float] | str:
    """``version`` - ``champion`` validation loss on the same rows, or why there is none."""
    try:
        theirs, ours = (logged_row_losses(side.run_id, int(side.tags["best_epoch"]))
                        for side in (champion, version))
    except (MlflowException, KeyError, ValueError) as error:  # a deleted run, an old version
        return f"the versions' per-row validation losses cannot be read ({error})"
    if theirs is None or ours is None:
        which = "the champion's run" if theirs is None else "this run"
        return (f"{which} has no per-row validation losses ({VALIDATION_LOSSES}; logged by "
                "MedLM since its champion rule pairs them)")
    if (theirs["disease"].tolist() != ours["disease"].tolist()
            or theirs["tokens"].tolist() != ours["tokens"].tolist()):
        return "their validation rows differ (diseases or token counts)"
    grouped = [scores.group_sums(table[["loss_sum", "tokens"]].to_numpy(float), ours["group"])
               for table in (theirs, ours)]
    try:
        return paired_difference(*grouped, "mean", p_value=False)
    except MedLMError as error:  # one name group held out: nothing to resample
        return str(error)


def score_evidence(champion: ModelVersion, version: ModelVersion,
                   score: str) -> dict[str, float] | str:
    """``version`` - ``champion`` ``score`` on the same diseases, or why there is none."""
    try:
        a, b = (Side(f"version {side.version}", [run := MlflowClient().get_run(side.run_id)],
                     [kept_answers(run, f"version {side.version}",
                                   int(side.tags["best_epoch"]))])
                for side in (champion, version))
        _, groups, _, counts = _counted(a, b)
        return _paired(counts, groups, score, p_value=False)
    except (MedLMError, MlflowException, KeyError, ValueError) as error:
        return str(error)


def _shown(key: dict[str, str], name: str) -> str:
    value = key.get(name, registry.KEY_PARAMS_LEFT_OUT_AT.get(name))
    if value in (None, ""):
        return "unset" if value is None else "all"
    return value[:12] if len(value) == 64 else value


def _why_not_compared(champion_tags: dict[str, str], tags: dict[str, str],
                      select_by: str) -> str | None:
    """Why the champion and a new version cannot be compared on ``select_by``; None if they can."""
    if "evaluation_key_json" not in champion_tags:
        return "the champion has no evaluation key (registered before MedLM recorded one)"
    champion_rule = champion_tags.get("select_by", "validation_loss")  # untagged: the loss
    if champion_rule != select_by:
        return f"the champion was selected by {champion_rule}, this version by {select_by}"
    theirs, ours = (json.loads(side["evaluation_key_json"]) for side in (champion_tags, tags))
    if differences := _differences(theirs, ours, select_by, _shown):
        return f"a different evaluation ({differences})"
    if select_by not in champion_tags or select_by not in tags:
        return f"{select_by} is missing on one of the two versions"
    return None


def _versus(current: ModelVersion, new: ModelVersion, label: str, shown: str,
            select_by: str) -> tuple[bool, str]:
    """(whether ``label`` beats the comparable champion ``current`` with confidence, why)."""
    if select_by == "validation_loss":
        evidence, rows = loss_evidence(current, new), "validation rows"
    else:
        evidence, rows = score_evidence(current, new, select_by), "held-out diseases"
    if isinstance(evidence, str):
        return False, f"not compared with confidence: {evidence}{_PROMOTE_HINT}"
    low, high = evidence["ci_low"], evidence["ci_high"]
    theirs = f"version {current.version}'s {float(current.tags[select_by]):.4f}"
    detail = (f"{evidence['difference']:+.4f}, {scores.CONFIDENCE:.0%} CI "
              f"{low:+.4f}..{high:+.4f}, paired on the same {rows}")
    if (high < 0) if select_by == "validation_loss" else (low > 0):
        return True, (f"{label} is the new champion: {shown} beats {theirs} with confidence "
                      f"({detail}; same evaluation key)")
    return False, f"{label}'s {shown} is not better than {theirs} with confidence ({detail})"


def maybe_crown(tracker: MlflowTracker, version: str, tags: dict[str, str], select_by: str,
                promote: bool, fold: bool = False) -> str:
    """Move ``@champion`` to ``version`` if none holds it, on ``promote``, or if better with
    confidence (never a ``fold``, unless ``promote``); say which, or why not."""
    client, name = MlflowClient(), tracker.registered_model
    label = f"{name} version {version}"
    if fold and not promote:
        mlflow.set_tag("champion", "false")
        return f"{label} is not made the champion: a cross-validation fold{_PROMOTE_HINT}"
    try:
        current = client.get_model_version_by_alias(name, registry.CHAMPION_ALIAS)
    except MlflowException:
        current = None
    shown = f"{select_by} {float(tags[select_by]):.4f}" if select_by in tags else f"no {select_by}"
    if current is not None and current.version == version:  # crowned before a kill
        return f"{label} is the champion ({shown})"
    if current is None:
        crowned, verdict = True, f"{label} is the first champion ({shown})"
    elif promote:
        crowned, verdict = True, (f"{label} is the champion by --promote ({shown}), replacing "
                                  f"version {current.version} without comparing")
    elif why := _why_not_compared(current.tags, tags, select_by):
        crowned, verdict = False, f"not compared: {why}{_PROMOTE_HINT}"
    else:
        new = client.get_model_version(name, version)
        crowned, verdict = _versus(current, new, label, shown, select_by)
    if crowned:
        client.set_registered_model_alias(name, registry.CHAMPION_ALIAS, version)
    mlflow.set_tag("champion", "true" if crowned else "false")
    return verdict if crowned else f"champion stays at version {current.version}: {verdict}"
