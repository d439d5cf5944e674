"""Score a model's symptoms for held-out diseases: per-disease table and micro-averaged P/R/F1.

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
from medlm.config import DEFAULT_DATASET


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.evaluate",
                            description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="Hub dataset id or local CSV/TSV/Parquet/JSON file")
    parser.add_argument("--split", choices=("validation", "all"), default="validation",
                        help="validation: the diseases training held out (same --seed and "
                             "--validation-fraction as the run); all: every disease")
    parser.add_argument("--seed", type=int, default=42, help="split seed, as in the run")
    parser.add_argument("--validation-fraction", type=positive_float, default=0.2)
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="use only the first N cleaned rows")
    parser.add_argument("--max-new-tokens", type=positive_int, default=40,
                        help="tokens generated per answer (greedy decoding)")
    parser.add_argument("--output", default=None, metavar="CSV",
                        help="also write the per-disease table to this CSV file")
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()

    import pandas as pd

    from medlm.data import load_disease_data, split_by_disease
    from medlm.metrics import MATCH_THRESHOLD, evaluate_symptoms
    from medlm.modeling import resolve_device
    from medlm.tracking import load_model_for_inference

    data = load_disease_data(args.dataset, args.max_samples)
    frame = data.frame
    if args.split == "validation":
        frame = split_by_disease(frame, args.validation_fraction, args.seed, args.dataset)[1]
    device = resolve_device(args.device)
    tokenizer, model = load_model_for_inference(args.model_uri, args.registered_model)
    model.to(device)
    table, overall = evaluate_symptoms(model, tokenizer, frame, args.max_new_tokens)
    if args.output:
        table.to_csv(args.output, index=False)
    shown = table[["disease", "symptom_precision", "symptom_recall", "symptom_f1", "generated"]]
    shown = shown.assign(generated=shown["generated"].str.replace("\n", " ").str.slice(0, 60))
    with pd.option_context("display.max_rows", None, "display.width", 160,
                           "display.float_format", "{:.3f}".format):
        print(shown.rename(columns=lambda c: c.replace("symptom_", "")).to_string(index=False))
    print(f"symptom precision {overall.precision:.4f}  recall {overall.recall:.4f}  "
          f"F1 {overall.f1:.4f}  ({len(table)} {args.split} diseases, phrase match: word F1 "
          f">= {MATCH_THRESHOLD})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
