"""Score a model's symptoms for held-out diseases, beside the answers that need no model.

    python -m experiments.evaluate --model-uri models:/medlm@champion
"""

import math
import os
import sys

from experiments import _cli as cli
from medlm.config import TrainConfig, setting_kinds
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable
from medlm.metrics import METRIC_VERSION, SCORING_REPETITION_PENALTY
from medlm.prompts import prompt_format_of

# flags that default to the run's own logged params for a models:/ or runs:/ URI
FROM_RUN = ("dataset", "split_seed", "validation_fraction", "max_samples", "max_new_tokens")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m experiments.evaluate",
                                description=__doc__.strip().splitlines()[0])
    from_run = " (default: the run's, for a models:/ or runs:/ URI; else %s)"
    parser.add_argument("--dataset", help="Hub dataset id or local CSV/TSV/Parquet/JSON file"
                        + from_run % TrainConfig.dataset)
    parser.add_argument("--split", choices=("validation", "all"), default="validation",
                        help="validation: the diseases the run held out; all: every disease")
    parser.add_argument("--split-seed", "--seed", dest="split_seed", type=cli.seed, default=None,
                        help="which diseases are held out" + from_run % TrainConfig.split_seed)
    parser.add_argument("--validation-fraction", type=cli.fraction, default=None,
                        help="share of diseases held out"
                             + from_run % TrainConfig.validation_fraction)
    parser.add_argument("--max-samples", type=cli.positive_int, default=None,
                        help="use only the first N cleaned rows" + from_run % "all")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                        help="tokens generated per answer (greedy decoding)"
                             + from_run % TrainConfig.max_new_tokens)
    parser.add_argument("--repetition-penalty", type=cli.positive_float,
                        default=SCORING_REPETITION_PENALTY,
                        help="of the greedy answers (1 = none, as in training runs' scores; "
                             "the seed notebook sampled with 1.2)")
    parser.add_argument("--num-beams", type=cli.positive_int, default=1,
                        help="1: greedy answers, as training runs score them; N > 1: beam "
                             "search over N beams")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="of the answers (default: the run's, for a models:/ or runs:/ URI "
                             "where this machine has it natively; else auto)")
    parser.add_argument("--consensus", type=cli.whole_number_up_to(64, minimum=2), metavar="N",
                        help="consensus decoding: each disease's greedy answer and N - 1 samples "
                             "merged, keeping the symptoms at least two of them name "
                             "(experiments/RESULTS.md measures 5)")
    parser.add_argument("--output", default=None, metavar="CSV",
                        help="also write the per-disease table to this CSV file")
    cli.add_model_arguments(parser)
    return parser


def settings_from_run(args, run_params: dict[str, str] | None) -> tuple[dict, dict[str, str]]:
    """Each ``FROM_RUN`` setting from its flag, else the run's logged param, else its default;
    and a note for every flag that overrides a different logged value."""
    from medlm.registry import split_seed_of  # imports MLflow: not for --help

    settings, notes, kinds = {}, {}, setting_kinds()
    if run_params is not None and split_seed_of(run_params) is not None:  # older runs: "seed"
        run_params = {**run_params, "split_seed": split_seed_of(run_params)}
    if run_params and os.path.isfile(run_params.get("dataset_path") or ""):  # typed relative
        run_params = {**run_params, "dataset": run_params["dataset_path"]}
    for name in FROM_RUN:
        logged = run_params is not None and name in run_params
        in_run = getattr(TrainConfig, name) if not logged else (
            None if run_params[name] in ("", "None") else kinds[name](run_params[name]))
        flag = getattr(args, name)
        settings[name] = flag if flag is not None else in_run
        if logged and flag is not None and flag != in_run and name != "dataset":
            notes[name] = (f"note: --{name.replace('_', '-')} {flag} overrides the run's "
                           f"{'all rows' if in_run is None else in_run}")
    return settings, notes


def held_out(data, settings: dict, params: dict | None, split: str, notes: dict[str, str]):
    """(the diseases scored, the baselines on them, which they are), with a note in ``notes``
    where the rows or the split differ from the run's."""
    from medlm.scores import baseline_scores
    from medlm.split import split_rows

    if params and params.get("dataset_content_sha256") not in (None, data.content_sha256):
        notes["dataset"] = (f"note: the rows of {settings['dataset']!r} differ from those the "
                            "run trained on (another file, or the file changed)")
    folds, fold = int((params or {}).get("folds") or 0), (params or {}).get("fold")
    if folds and fold in (None, "None", ""):
        raise MedLMError(f"the run has --folds {folds} but no fold (a cross-validation's "
                         "parent?): expected one fold's run, a child of the parent")
    which = (f"fold {fold} of {folds}" if folds and split == "validation" else
             f"validation fraction {settings['validation_fraction']}")
    where = (f"{settings['dataset']}, split seed {settings['split_seed']}, {which}, "
             f"{settings['max_samples'] or 'all'} rows")
    if split != "validation":
        return data.frame, {}, where
    rows = split_rows(data.frame, settings["validation_fraction"], settings["split_seed"],
                      folds, int(fold) if folds else None, settings["dataset"])
    if params and not notes and params.get("split_validation_sha256") != rows.validation_sha256:
        notes["split"] = ("note: these validation diseases are not the ones the run held "
                          "out (it was split by an older MedLM)")
    return rows.validation, baseline_scores(rows.train, rows.validation), where


def answer_and_score(model, tokenizer, frame, args, max_new_tokens: int):
    """(per-disease table, scores) of greedy, beam-search or consensus answers, as ``args`` asks."""
    from medlm.generate import consensus_answers
    from medlm.metrics import references_by_disease
    from medlm.scores import evaluate_symptoms, score_answers

    if args.consensus is None:
        return evaluate_symptoms(model, tokenizer, frame, max_new_tokens,
                                 repetition_penalty=args.repetition_penalty,
                                 num_beams=args.num_beams)
    names = [name for name, _ in references_by_disease(frame).values()]
    return score_answers(consensus_answers(model, tokenizer, names, args.consensus,
                                           max_new_tokens), frame)


def span(scores: dict[str, float], name: str) -> str:
    """"0.211-0.303": the score's interval, or "-" where it has none."""
    low, high = scores.get(f"{name}_ci_low", math.nan), scores.get(f"{name}_ci_high", math.nan)
    return f"{low:.4f}-{high:.4f}" if math.isfinite(low) and math.isfinite(high) else "-"


def print_tables(table, overall, baselines: dict, untuned: dict[str, float], heading: str) -> None:
    """The per-disease table, then ``heading`` and one summary row per set of answers: the
    model's, each baseline's and (where comparable) the run's untuned base's."""
    import pandas as pd

    from medlm.scores import CONFIDENCE

    shown = table[["disease", "symptom_precision", "symptom_recall", "symptom_f1", "word_f1",
                   "generated"]]
    shown = shown.assign(generated=shown["generated"].str.replace("\n", " ").str.slice(0, 60))
    with pd.option_context("display.max_rows", None, "display.width", 160,
                           "display.float_format", "{:.3f}".format):
        print(shown.rename(columns=lambda c: c.replace("symptom_", "")).to_string(index=False))
    rows = {"this model": overall.as_metrics(), **{
        f"baseline: {name} (no model)": scores.as_metrics() for name, (_, scores) in
        baselines.items()}}
    if untuned:
        rows["untuned base (the run's epoch 0)"] = untuned
    columns = {"symptom_precision": "symptom P", "symptom_recall": "symptom R",
               "symptom_f1": "symptom F1", "word_f1": "word F1"}
    summary = pd.DataFrame([{"answers": label, **{shown_name: scores.get(name)
                                                  for name, shown_name in columns.items()},
                             **{f"{columns[name]} {CONFIDENCE:.0%} CI": span(scores, name)
                                for name in ("symptom_f1", "word_f1")}}
                            for label, scores in rows.items()])
    print(heading)
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(summary.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.champion_unless_given(parser.parse_args(argv))
    if args.consensus is not None and (args.num_beams > 1 or args.repetition_penalty != (
            SCORING_REPETITION_PENALTY)):
        parser.error("--consensus writes its own answers: expected it without --num-beams and "
                     "--repetition-penalty")
    cli.quiet_libraries()

    from medlm.data import load_disease_data
    from medlm.generate import drop_unanswerable
    from medlm.inference import answer_precision, load_model_for_inference, source_run
    from medlm.modeling import resolve_device
    from medlm.tracking import logged_metrics

    run = source_run(args.model_uri, args.registered_model)
    params = run.data.params if run else None
    settings, notes = settings_from_run(args, params)
    scoring_note = notes.pop("max_new_tokens", None)
    try:
        data = load_disease_data(settings["dataset"], settings["max_samples"])
    except HubUnavailable as error:
        raise cli.offline_alternative(error, parser, argv, "--dataset", None, None) from None
    tokenizer, model = load_model_for_inference(args.model_uri, args.registered_model)
    # the rows the run dropped before its split (by its own answer length)
    drop_unanswerable(data, model, tokenizer, int(params.get("max_new_tokens", settings[
        "max_new_tokens"])) if params else settings["max_new_tokens"], prompt_format_of(model))
    frame, baselines, where = held_out(data, settings, params, args.split, notes)
    device = resolve_device(args.device)
    precision, notes["precision"] = answer_precision(args.precision, params, device)
    notes = {name: note for name, note in notes.items() if note}
    for note in notes.values():
        print(note + ": the run's held-out figures do not apply here", file=sys.stderr)
    if scoring_note:
        print(scoring_note + ": the run's untuned score does not apply here", file=sys.stderr)
    as_logged = run is not None and not notes and args.split == "validation"
    model.to(device)
    with precision.answer_autocast():  # as the run decoded its scored answers
        table, overall = answer_and_score(model, tokenizer, frame, args, settings["max_new_tokens"])
    if args.output:
        table.to_csv(args.output, index=False)
    scored_alike = (as_logged and not scoring_note and args.consensus is None
                    and args.repetition_penalty == SCORING_REPETITION_PENALTY
                    and args.num_beams == 1 and params.get("metric_version") == METRIC_VERSION)
    untuned = logged_metrics(run.info.run_id, "untuned_") if scored_alike else {}
    where += f", as run {run.info.run_id} logged" if as_logged else ""
    decoding = ("greedy answers" if args.num_beams == 1 else f"beam search ({args.num_beams})"
                ) if args.consensus is None else f"consensus of {args.consensus} answers"
    print_tables(table, overall, baselines, untuned,
                 f"\n{len(table)} {args.split} diseases ({where}); {decoding} in "
                 f"{'bf16' if precision.name == 'bf16' else 'fp32'}, {settings['max_new_tokens']}"
                 f" new tokens, repetition penalty {args.repetition_penalty:g}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
