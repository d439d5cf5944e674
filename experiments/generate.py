"""Write symptoms for disease names with a model from the MLflow Model Registry.

    python -m experiments.generate "Kidney Failure" "Asthma"
"""

import argparse
import sys

from experiments import _cli as cli
from medlm.generate import GenerationSettings, consensus_answers, generate

MAX_RETURN_SEQUENCES = 100  # more is a typo, not a request: each is a full answer on the screen


def disease_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: expected a disease name such as "
                                         "\"Kidney Failure\"")
    return text.strip()


def build_parser() -> cli.ArgumentParser:
    defaults = GenerationSettings()
    parser = cli.ArgumentParser(
        prog="python -m experiments.generate", description=__doc__.strip().splitlines()[0])
    parser.add_argument("diseases", nargs="+", metavar="DISEASE", type=disease_name,
                        help="disease name(s), e.g. \"Kidney Failure\"")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=defaults.max_new_tokens,
                        help="tokens to write per completion")
    parser.add_argument("--num-return-sequences", type=cli.whole_number_up_to(MAX_RETURN_SEQUENCES),
                        default=defaults.num_return_sequences,
                        help=f"completions per disease (at most {MAX_RETURN_SEQUENCES})")
    parser.add_argument("--top-k", type=cli.positive_int, default=defaults.top_k,
                        help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=cli.probability, default=defaults.top_p,
                        help="nucleus sampling: smallest token set with this probability")
    parser.add_argument("--temperature", type=cli.positive_float, default=defaults.temperature,
                        help="below 1: more conservative, above 1: more varied")
    parser.add_argument("--repetition-penalty", type=cli.positive_float,
                        default=defaults.repetition_penalty,
                        help="above 1 discourages repeating tokens")
    parser.add_argument("--seed", type=cli.seed, default=defaults.seed,
                        help="sampling seed, for repeatable output")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding instead of sampling (ignores top-k/p, temperature)")
    parser.add_argument("--consensus", type=cli.whole_number_up_to(64, minimum=2), metavar="N",
                        help="one answer per disease: its greedy answer and N - 1 samples "
                             "merged, keeping the symptoms at least two of them name (the "
                             "samples' own settings, not the flags above; 5 scores best, "
                             "experiments/RESULTS.md)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="of the answers (default: the run's, for a models:/ or runs:/ URI "
                             "where this machine has it natively; else auto)")
    cli.add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.champion_unless_given(parser.parse_args(argv))
    if args.consensus is not None and (args.greedy or args.num_return_sequences > 1):
        parser.error("--consensus writes one answer per disease from its own answers: expected "
                     "it without --greedy and --num-return-sequences")
    if args.greedy and args.num_return_sequences > 1:
        parser.error(f"--num-return-sequences {args.num_return_sequences} with --greedy: "
                     "greedy decoding writes one answer per disease: expected "
                     "--num-return-sequences 1, or sampling (no --greedy)")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_k=args.top_k,
        top_p=args.top_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, seed=args.seed)
    cli.quiet_libraries()

    from medlm.inference import answer_precision, load_model_for_inference, source_run
    from medlm.modeling import resolve_device

    device = resolve_device(args.device)
    run = source_run(args.model_uri, args.registered_model)
    precision, note = answer_precision(args.precision, run.data.params if run else None, device)
    if note:
        print(note, file=sys.stderr)
    tokenizer, model = load_model_for_inference(args.model_uri, args.registered_model)
    model.to(device)
    with precision.answer_autocast():  # as the run and experiments.evaluate decode answers
        if args.consensus is not None:
            completions = [[answer] for answer in consensus_answers(
                model, tokenizer, args.diseases, args.consensus, args.max_new_tokens, args.seed)]
        else:
            completions = generate(model, tokenizer, args.diseases, settings)
    for disease, texts in zip(args.diseases, completions, strict=True):
        for index, text in enumerate(texts, start=1):
            prefix = f"[{index}] " if len(texts) > 1 else ""
            print(f"{prefix}{disease} | {text}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
