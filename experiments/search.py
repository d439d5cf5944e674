"""Search hyperparameters with Optuna: each trial a run under one parent run; the same command
on another machine, against the same --storage, joins the search (experiments/README.md)."""

import sys
from argparse import SUPPRESS
from dataclasses import fields

from experiments._cli import ArgumentParser, positive_int, quiet_libraries, run_cli, seed
from experiments.run import add_settings, configs_from_args
from medlm.config import DEFAULT_SPACE, SWEEPABLE, flag_of
from medlm.errors import MedLMError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.search",
                            description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    add = parser.add_argument_group("search (the other flags: the settings every trial shares, "
                                    "as python -m experiments.run takes them)").add_argument
    add("--param", action="append", default=[], metavar="NAME=SPEC",
        help="a setting the search varies: LOW..HIGH, LOW..HIGH:log or A,B,C (repeat the flag; "
             "default: " + " ".join(f"{k}={v}" for k, v in DEFAULT_SPACE.items()) + ")")
    add("--space", metavar="FILE.toml", help='the space as a file: NAME = "LOW..HIGH[:log]" or '
        "NAME = [A, B] per line (--param flags add to it)")
    add("--trials", type=positive_int, default=12,
        help="trials in the whole study, all processes together")
    add("--study", default="medlm-search",
        help="the Optuna study: processes given the same name and --storage share it")
    add("--storage", metavar="URL", help="postgresql://user:password@host:port/db (a team's "
        "machines together), or a SQLite file (several processes on one machine; default: "
        "./medlm-search.db)")
    add("--sampler", choices=("tpe", "random"), default="tpe", help="how trials are drawn")
    add("--pruner", choices=("median", "none"), default="median", help="median: stop a trial "
        "after an epoch worse than the median of earlier trials at that epoch")
    add("--startup-trials", type=positive_int, default=4,
        help="trials finished before TPE models the space and the pruner acts")
    add("--sampler-seed", type=seed, default=42,
        help="the draws of the process that begins the study")
    add("--replay", metavar="STUDY", help="a new study first runs every trial of STUDY (same "
        "storage, same flags), in order: e.g. the same trials with --pruner none")
    add_settings(parser)
    parser.add_argument("--config", metavar="FILE.toml", default=SUPPRESS,
                        help="a recipe file of the settings every trial shares")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medlm import distributed  # torch, Optuna, MLflow: seconds, not for --help
    from medlm.search import SearchOptions, parse_params, read_space_file, search, search_space
    from medlm.store import check_tracking_store, compare_runs_hint

    quiet_libraries()
    given = vars(args)  # less the search's flags: the settings every trial shares
    space_file, params = given.pop("space"), given.pop("param")
    space = search_space({**(read_space_file(space_file) if space_file else {}),
                          **parse_params(params)})
    options = SearchOptions(**{item.name: given.pop(item.name) for item in fields(SearchOptions)})
    if drawn := [name for name in space if name in given]:  # args holds only the flags given
        raise MedLMError(f"{flag_of(drawn[0])} with --param {drawn[0]}=... is invalid: expected "
                         "one of the two (the search draws it)")
    configs, grid = configs_from_args(args)
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
    search(configs[0], space, options)
    print(f"compare runs: {compare_runs_hint(configs[0].experiment)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
