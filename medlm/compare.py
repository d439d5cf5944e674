"""Two models compared on the same held-out diseases: the per-disease paired difference of each
score, its bootstrap interval over name groups and a paired permutation p-value (SciPy), from
the answers each run scored at its kept epoch (``symptom_scores.json``).

The champion rule: ``@champion`` moves to a new version only when it is better than the
champion with confidence, on the same evaluation key and paired on the same evidence: each
validation row's loss for ``validation_loss`` (``VALIDATION_LOSSES``, logged at registration),
each held-out disease's kept-epoch answer for ``symptom_f1`` (``symptom_scores.json``). The
threshold: the ``CONFIDENCE`` bootstrap interval of the paired difference, name groups
resampled together, lies wholly on the better side of 0.

The rule compares two models, not two recipes: the same recipe with another training seed is
another model, and takes the alias when it is better with confidence on these diseases. Whether
a recipe is better is a question for several seeds (``medlm.scores``, ``experiments.compare
A1,A2 B1,B2``)."""

from __future__ import annotations

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

from medlm.errors import MedLMError
from medlm.inference import source_run
from medlm.metrics import METRIC_VERSION
from medlm.registry import (
    CHAMPION_ALIAS,
    KEY_PARAMS_BY_SELECTION,
    KEY_PARAMS_LEFT_OUT_AT,
    evaluation_key,
)
from medlm.scores import (
    CONFIDENCE,
    RESAMPLES,
    SCORES,
    SEED,
    STATISTICS,
    answer_counts,
    group_numbers,
    group_sums,
    row_group_numbers,
)
from medlm.store import shown_tracking_uri
from medlm.tracking import VALIDATION_LOSSES, MlflowTracker, logged_row_losses, logged_table

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PERMUTATIONS = 9999  # two-sided: the smallest p-value is 2 / (PERMUTATIONS + 1) = 0.0002


@dataclass
class Side:
    """One side of a comparison: what was asked, its runs (one, or several training seeds of a
    recipe: their answers pooled, counts averaged per disease) and each run's kept-epoch
    answers (disease, generated, reference; one row per held-out disease)."""

    asked: str
    runs: list[Run]
    answers: list[pd.DataFrame]

    @property
    def run(self) -> Run:
        return self.runs[0]


def find_run(asked: str, registered_model: str) -> Run:
    """A run id, a version number of ``registered_model``, or a ``models:/`` / ``runs:/`` URI."""
    if _RUN_ID.match(asked):
        try:
            return MlflowClient().get_run(asked)
        except mlflow.exceptions.MlflowException:
            raise MedLMError(f"{asked!r}: no such run at {shown_tracking_uri()}: expected "
                             "a run id, a version number or a models:/ or runs:/ URI") from None
    run = source_run(asked, registered_model)
    if run is None:
        raise MedLMError(f"{asked!r} is not a logged model: expected a run id, a version "
                         "number or a models:/ or runs:/ URI (a local model has no held-out "
                         "diseases to compare on)")
    return run


def kept_answers(run: Run, asked: str, epoch: int | None = None) -> pd.DataFrame:
    """The answers the run scored at its kept epoch (or at ``epoch``: a registered version's
    own, where a resumed run kept a later one), one row per held-out disease."""
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
    """``asked``: one run (id, version, URI) or several, comma-separated."""
    parts = [part.strip() for part in asked.split(",") if part.strip()]
    runs = [find_run(part, registered_model) for part in parts]
    ids = [run.info.run_id for run in runs]
    if len(set(ids)) < len(ids):
        raise MedLMError(f"{asked!r} names a run twice: expected each run once")
    return Side(asked, runs, [kept_answers(run, part) for run, part in
                              zip(runs, parts, strict=True)])


def scored_by_other_rules(a: Side, b: Side) -> list[str]:
    """The runs whose symptom scores were logged under an older metric version: compare scores
    their answers by today's rules, so its A and B differ from what those runs logged."""
    return [run.info.run_id for side in (a, b) for run in side.runs
            if run.data.params.get("metric_version") != METRIC_VERSION]


def check_comparable(a: Side, b: Side) -> None:
    """The same held-out diseases, metric and answer length, or a one-line refusal naming
    what differs."""
    names = KEY_PARAMS_BY_SELECTION["symptom_f1"]
    first = evaluation_key(a.run.data.params)
    for side in (a, b):
        for run in side.runs:
            key = evaluation_key(run.data.params)
            differ = [f"{'split_seed' if name == 'seed' else name} {first.get(name)} vs "
                      f"{key.get(name)}" for name in names if first.get(name) != key.get(name)]
            if differ:
                other = side.asked if len(side.runs) == 1 else f"run {run.info.run_id}"
                raise MedLMError(f"{a.asked} and {other} were not scored on the same held-out "
                                 f"diseases by the same metric ({'; '.join(differ)}): expected "
                                 "runs with the same evaluation key (dataset, split, metric, "
                                 "answer length)")


def paired_difference(a: np.ndarray, b: np.ndarray, statistic: str,
                      p_value: bool = True) -> dict[str, float]:
    """B - A of a micro-averaged ``statistic`` (``intervals.STATISTICS``) on the same groups
    (rows of ``a`` and ``b``: one group's summed counts each): the difference, its bootstrap
    interval (the groups resampled together for both) and, with ``p_value``, a two-sided
    paired permutation p-value (each group's two answers swapped at random)."""
    from scipy.stats import bootstrap, permutation_test  # deferred: ~1.7 s to import

    function = STATISTICS[statistic]
    both = np.concatenate([a, b])
    size = len(a)
    if size < 2:
        raise MedLMError(f"{size} name group held out: expected at least two to compare on "
                         "(more validation rows: --validation-fraction, --max-samples)")

    def difference(on_a, on_b, axis=-1):  # indices into ``both``
        return (function(*np.moveaxis(both[on_b], -1, 0), axis=-1)
                - function(*np.moveaxis(both[on_a], -1, 0), axis=-1))

    indices = (np.arange(size), np.arange(size) + size)
    value = float(difference(*indices))
    spread = bootstrap(indices, difference, paired=True, vectorized=True, axis=-1,
                       n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                       rng=np.random.default_rng(SEED))
    low, high = spread.confidence_interval
    result = {"difference": value, "ci_low": float(low), "ci_high": float(high)}
    if p_value:
        test = permutation_test(indices, difference, permutation_type="samples",
                                vectorized=True, axis=-1, n_resamples=PERMUTATIONS,
                                rng=np.random.default_rng(SEED))
        result["p_value"] = float(test.pvalue)
    return result


@dataclass
class _Counted:
    """Both sides' counts on the same diseases (one row per disease, in ``diseases`` order)."""

    diseases: pd.Series
    groups: list[int]
    aligned: dict[str, list[pd.DataFrame]]  # "a", "b": each run's answers in that order
    counts: dict[str, dict[str, np.ndarray]]  # "a", "b" -> "symptom", "word" -> counts

    def paired(self, kind: str, statistic: str, p_value: bool = True) -> dict[str, float]:
        function = STATISTICS[statistic]
        grouped = [group_sums(self.counts[side][kind], self.groups) for side in ("a", "b")]
        return {"A": float(function(*self.counts["a"][kind].T)),
                "B": float(function(*self.counts["b"][kind].T)),
                **paired_difference(*grouped, statistic, p_value=p_value)}


def _counted(a: Side, b: Side) -> _Counted:
    diseases = a.answers[0]["disease"]
    for table in (*a.answers, *b.answers):
        if sorted(table["disease"]) != sorted(diseases):
            raise MedLMError(f"{a.asked} and {b.asked} answered different diseases: expected "
                             "the same held-out diseases")
    aligned = {label: [table.set_index("disease").loc[diseases].reset_index()
                       for table in side.answers] for label, side in (("a", a), ("b", b))}
    references = aligned["a"][0]["reference"]
    groups = group_numbers(pd.DataFrame({"Name": diseases, "Symptoms": references}))
    sides = {}
    for label, tables in aligned.items():  # each side's counts averaged over its runs
        counted = [answer_counts(table["generated"], references) for table in tables]
        # the mean, not the sum: every ratio is the same, and a permutation that swaps a
        # group's two sides swaps like for like when the sides have different run counts
        sides[label] = {kind: sum(counts[kind] for counts in counted) / len(counted)
                        for kind in ("symptom", "word")}
    return _Counted(diseases, groups, aligned, sides)


def paired_score(a: Side, b: Side, score: str) -> dict[str, float]:
    """``score`` (a name of ``heldout.SCORES``) of A and B, B - A and its interval (no
    p-value): what the champion rule weighs."""
    _, kind, statistic = next(row for row in SCORES if row[0] == score)
    return _counted(a, b).paired(kind, statistic, p_value=False)


def compare(a: Side, b: Side) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per score: A, B, B - A, its interval and p-value; one row per disease: each
    side's symptom F1 and answer, largest difference first)."""
    counted = _counted(a, b)
    rows = [{"score": name, **counted.paired(kind, statistic)} for name, kind, statistic in SCORES]
    sides, aligned = counted.counts, counted.aligned
    per_disease = pd.DataFrame({
        "disease": counted.diseases, "group": counted.groups,
        "symptom_f1_a": _f1(sides["a"]["symptom"]), "symptom_f1_b": _f1(sides["b"]["symptom"]),
        "generated_a": aligned["a"][0]["generated"],  # the first run's, where several
        "generated_b": aligned["b"][0]["generated"]})
    per_disease.insert(4, "difference", per_disease["symptom_f1_b"] - per_disease["symptom_f1_a"])
    order = per_disease["difference"].abs().sort_values(ascending=False, kind="stable").index
    return pd.DataFrame(rows), per_disease.loc[order].reset_index(drop=True)


def _f1(counts: np.ndarray) -> np.ndarray:
    """Each row's own F1 (one disease's counts)."""
    return STATISTICS["f1"](*counts.T[:, :, None])


def log_comparison(a: Side, b: Side, scores: pd.DataFrame, per_disease: pd.DataFrame) -> str:
    """The comparison as an MLflow run of its own in A's experiment: which runs, each score's
    difference, interval and p-value as metrics, both tables as CSV artifacts. Its run id."""
    with mlflow.start_run(experiment_id=a.run.info.experiment_id,
                          run_name=f"compare {a.asked} vs {b.asked}"[:250]) as run:
        mlflow.log_params({"a": a.asked, "b": b.asked,
                           **{f"{label}_run_id": ",".join(run.info.run_id for run in side.runs)
                              for label, side in (("a", a), ("b", b))},
                           "held_out_diseases": len(per_disease), "confidence": CONFIDENCE})
        mlflow.log_metrics({f"{row.score}_{name}": getattr(row, name) for row in
                            scores.itertuples() for name in
                            ("difference", "ci_low", "ci_high", "p_value")})
        mlflow.log_text(scores.to_csv(index=False), "compare.csv")
        mlflow.log_text(per_disease.to_csv(index=False), "compare_diseases.csv")
        return run.info.run_id


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
