"""Write a randomly initialised GPT-2 (real GPT-2 tokenizer) for machines without Hub access.

    python -m experiments.init_model models/distilgpt2-random --preset distilgpt2
"""

import sys

from experiments._cli import ArgumentParser, quiet_libraries, run_cli, seed
from medlm.offline import PRESETS, save_random_gpt2


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.init_model",
                            description=__doc__.strip().splitlines()[0])
    parser.add_argument("directory", help="where to save_pretrained the model and tokenizer")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="distilgpt2",
                        help="architecture (distilgpt2: 6 layers, 768 wide, 12 heads)")
    parser.add_argument("--seed", type=seed, default=0, help="initialisation seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    path = save_random_gpt2(args.directory, args.preset, args.seed)
    print(f"saved a random {args.preset} GPT-2 to {path}; train it with "
          f"python -m experiments.run --model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
