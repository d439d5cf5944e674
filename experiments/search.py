"""Search hyperparameters with Optuna: each trial a run under one parent run; the same command
on another machine, against the same --storage, joins the search.

    python -m experiments.search --trials 12
    python -m experiments.search --param lr=1e-4..3e-3:log --param lora_rank=8,16,32 \\
        --storage postgresql://user:password@host:5432/optuna --study team-search
"""

from __future__ import annotations

import sys
from argparse import SUPPRESS

from experiments._cli import ArgumentParser, positive_int, quiet_libraries, run_cli, seed
from experiments.run import add_settings, configs_from_args
from medlm.config import DEFAULT_SPACE, SWEEPABLE, flag_of
from medlm.errors import MedLMError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.search",
                            description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    search = parser.add_argument_group("search (the other flags: the settings every trial "
                                       "shares, as python -m experiments.run takes them)")
    search.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                        help="a setting the search varies: LOW..HIGH, LOW..HIGH:log or A,B,C "
                             "(repeat the flag; default: "
                             + " ".join(f"{k}={v}" for k, v in DEFAULT_SPACE.items()) + ")")
    search.add_argument("--space", metavar="FILE.toml", default=None,
                        help="the space as a file: NAME = \"LOW..HIGH[:log]\" or NAME = [A, B] "
                             "per line (--param flags add to it)")
    search.add_argument("--trials", type=positive_int, default=12,
                        help="trials in the whole study, all processes together")
    search.add_argument("--study", default="medlm-search",
                        help="the Optuna study: processes given the same name and --storage "
                             "share it")
    search.add_argument("--storage", default=None, metavar="URL",
                        help="postgresql://user:password@host:port/db (a team's machines "
                             "together), or a SQLite file (several processes on one machine; "
                             "default: ./medlm-search.db)")
    search.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                        help="how trials are drawn")
    search.add_argument("--pruner", choices=("median", "none"), default="median",
                        help="median: stop a trial after an epoch worse than the median of "
                             "earlier trials at that epoch")
    search.add_argument("--startup-trials", type=positive_int, default=4,
                        help="trials finished before TPE models the space and the pruner acts")
    search.add_argument("--sampler-seed", type=seed, default=42,
                        help="the draws of the process that begins the study")
    search.add_argument("--replay", metavar="STUDY", default=None,
                        help="a new study first runs every trial of STUDY (same storage, same "
                             "flags), in order: e.g. the same trials with --pruner none")
    add_settings(parser)
    parser.add_argument("--config", metavar="FILE.toml", default=SUPPRESS,
                        help="a recipe file of the settings every trial shares")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medlm import distributed
    from medlm.search import SearchOptions, parse_params, read_space_file, search, search_space
    from medlm.store import check_tracking_store, compare_runs_hint

    quiet_libraries()
    specs = {**(read_space_file(args.space) if args.space else {}), **parse_params(args.param)}
    space = search_space(specs)
    for name in space:
        if hasattr(args, name):  # a setting's flag is in args only when given
            raise MedLMError(f"{flag_of(name)} with --param {name}=... is invalid: expected "
                             "one of the two (the search draws it)")
    search_args = ("param", "space", "trials", "study", "storage", "sampler", "pruner",
                   "startup_trials", "sampler_seed", "replay")
    settings = {key: value for key, value in vars(args).items() if key not in search_args}
    configs, grid = configs_from_args(type(args)(**settings))
    if len(configs) > 1:
        swept = [flag_of(name) for name in (*SWEEPABLE, "fold") if len(grid.get(name, [])) > 1]
        raise MedLMError(f"several values of {', '.join(swept)} are invalid in a search: "
                         "expected one value, or --param NAME=A,B to let the search choose")
    if configs[0].folds or configs[0].promote:
        raise MedLMError("--folds and --promote are invalid in a search: expected trials on "
                         "one split, crowned by the champion rule")
    if distributed.world_size() > 1:
        raise MedLMError("experiments.search under torchrun is invalid: expected one process "
                         "per machine (run the same command on each to share the search)")
    check_tracking_store()
    options = SearchOptions(study=args.study, storage=args.storage, trials=args.trials,
                            sampler=args.sampler, pruner=args.pruner, seed=args.sampler_seed,
                            startup_trials=args.startup_trials, replay=args.replay)
    search(configs[0], space, options)
    print(f"compare runs: {compare_runs_hint(configs[0].experiment)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
