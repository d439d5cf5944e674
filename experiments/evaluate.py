"""Score a model's symptoms for held-out diseases, beside the answers that need no model.

    python -m experiments.evaluate --model-uri models:/medlm@champion
"""

from __future__ import annotations

import sys

from experiments._cli import (
    ArgumentParser,
    add_model_arguments,
    positive_float,
    positive_int,
    quiet_libraries,
    run_cli,
)
from medlm.config import DEFAULT_DATASET, TrainConfig
from medlm.metrics import SCORING_REPETITION_PENALTY

# The split flags: for a models:/ or runs:/ URI they default to the run's own logged params.
SPLIT_FLAGS = {"dataset": DEFAULT_DATASET, "seed": TrainConfig.seed,
               "validation_fraction": TrainConfig.validation_fraction, "max_samples": None}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.evaluate",
                            description=__doc__.strip().splitlines()[0])
    from_run = " (default: the run's, for a models:/ or runs:/ URI; else %s)"
    parser.add_argument("--dataset", default=None,
                        help="Hub dataset id or local CSV/TSV/Parquet/JSON file"
                             + from_run % DEFAULT_DATASET)
    parser.add_argument("--split", choices=("validation", "all"), default="validation",
                        help="validation: the diseases the run held out; all: every disease")
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed" + from_run % SPLIT_FLAGS["seed"])
    parser.add_argument("--validation-fraction", type=positive_float, default=None,
                        help="share of diseases held out"
                             + from_run % SPLIT_FLAGS["validation_fraction"])
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="use only the first N cleaned rows" + from_run % "all")
    parser.add_argument("--max-new-tokens", type=positive_int, default=40,
                        help="tokens generated per answer (greedy decoding)")
    parser.add_argument("--repetition-penalty", type=positive_float,
                        default=SCORING_REPETITION_PENALTY,
                        help="of the greedy answers (1 = none; the seed notebook sampled with "
                             "1.2)")
    parser.add_argument("--output", default=None, metavar="CSV",
                        help="also write the per-disease table to this CSV file")
    add_model_arguments(parser)
    return parser


def split_settings(args, run_params: dict[str, str] | None) -> tuple[dict, list[str]]:
    """The dataset/seed/fraction/max-samples to split with, and notes on where they came from:
    a flag, else the run's logged param, else the default."""
    parsers = {"dataset": str, "seed": int, "validation_fraction": float, "max_samples": int}
    logged = {name: _parse(run_params[name], parse) for name, parse in parsers.items()
              if run_params and name in run_params}
    settings, notes = {}, []
    for name, default in SPLIT_FLAGS.items():
        flag, in_run = getattr(args, name), logged.get(name, default)
        settings[name] = flag if flag is not None else in_run
        if flag is not None and name in logged and flag != in_run:
            shown = "all rows" if in_run is None else in_run
            notes.append(f"note: --{name.replace('_', '-')} {flag} overrides the run's "
                         f"{shown}: these may not be the diseases the run held out")
    return settings, notes


def _parse(text: str | None, kind: type):
    return None if text in (None, "", "None") else kind(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()

    import pandas as pd

    from medlm.data import load_disease_data, split_by_disease
    from medlm.metrics import baseline_scores, evaluate_symptoms
    from medlm.modeling import resolve_device
    from medlm.tracking import load_model_for_inference, logged_metrics, source_run

    run = source_run(args.model_uri, args.registered_model)
    settings, notes = split_settings(args, run.data.params if run else None)
    for note in notes:
        print(note, file=sys.stderr)
    data = load_disease_data(settings["dataset"], settings["max_samples"])
    frame, baselines = data.frame, {}
    if args.split == "validation":
        split = split_by_disease(frame, settings["validation_fraction"], settings["seed"],
                                 settings["dataset"])
        frame, baselines = split.validation, baseline_scores(split.train, split.validation)
    device = resolve_device(args.device)
    tokenizer, model = load_model_for_inference(args.model_uri, args.registered_model)
    model.to(device)
    table, overall = evaluate_symptoms(model, tokenizer, frame, args.max_new_tokens,
                                       repetition_penalty=args.repetition_penalty)
    if args.output:
        table.to_csv(args.output, index=False)
    shown = table[["disease", "symptom_precision", "symptom_recall", "symptom_f1", "word_f1",
                   "generated"]]
    shown = shown.assign(generated=shown["generated"].str.replace("\n", " ").str.slice(0, 60))
    with pd.option_context("display.max_rows", None, "display.width", 160,
                           "display.float_format", "{:.3f}".format):
        print(shown.rename(columns=lambda c: c.replace("symptom_", "")).to_string(index=False))

    rows = {"this model": overall}
    rows.update({f"baseline: {name} (no model)": scores
                 for name, (_, scores) in baselines.items()})
    summary = [{"answers": label, "symptom P": scores.symptom.precision,
                "symptom R": scores.symptom.recall, "symptom F1": scores.symptom.f1,
                "word F1": scores.word.f1} for label, scores in rows.items()]
    untuned = logged_metrics(run.info.run_id, "untuned_") if run and not notes else {}
    if untuned and args.split == "validation":
        summary.append({"answers": "untuned base (the run's epoch 0)",
                        "symptom P": untuned.get("symptom_precision"),
                        "symptom R": untuned.get("symptom_recall"),
                        "symptom F1": untuned.get("symptom_f1"),
                        "word F1": untuned.get("word_f1")})
    where = (f"{settings['dataset']}, seed {settings['seed']}, validation fraction "
             f"{settings['validation_fraction']}, "
             f"{settings['max_samples'] or 'all'} rows"
             + (f", as run {run.info.run_id} logged" if run and not notes else ""))
    print(f"\n{len(table)} {args.split} diseases ({where}); greedy answers, "
          f"{args.max_new_tokens} new tokens, repetition penalty {args.repetition_penalty:g}")
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(pd.DataFrame(summary).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
