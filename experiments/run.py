"""Fine-tune a causal LM on disease -> symptoms and record the run in MLflow.

    python -m experiments.run --lr 5e-4
    torchrun --standalone --nproc_per_node 4 -m experiments.run --lr 5e-4   # 4 processes (DDP)
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import MISSING, Field, fields

from experiments._cli import (
    ArgumentParser,
    checked,
    flags_given,
    offline_alternative,
    quiet_libraries,
    run_cli,
)
from medlm.config import (
    GROUPS,
    SWEEPABLE,
    TrainConfig,
    flag_of,
    read_recipe,
    recipe_names,
    setting_kinds,
    sweep_value,
)
from medlm.errors import MedLMError
from medlm.hub import HubUnavailable

log = logging.getLogger("medlm")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(value) if isinstance(value, list) else str(value)


def flag_help(declared: Field) -> str:
    """A setting's --help text: its help, then its default and what each recipe that changes it
    sets it to."""
    default = (declared.default if declared.default is not MISSING
               else declared.default_factory())
    recipes = "".join(f"; --recipe {name}: {_shown(settings[declared.name])}"
                      for name, settings in ((name, read_recipe(name)) for name in recipe_names())
                      if settings.get(declared.name, default) != default)
    sweep = " (several values: a sweep)" if declared.metadata["sweep"] else ""
    shown = declared.metadata["shown"] or _shown(default)
    return f"{declared.metadata['help']}{sweep} (default: {shown}{recipes})"


def flag_options(declared: Field, kind: type) -> tuple[str, dict]:
    """The flag of a setting and its ``add_argument`` options: --NAME / --no-NAME for an on/off
    setting, a repeatable flag for a list, else a value checked by the setting's own rule or
    choices. Every default is None: the recipe's value applies."""
    flag = flag_of(declared.name)
    options = {"dest": declared.name, "default": None, "help": flag_help(declared)}
    if kind is bool:  # --NAME and --no-NAME, so a flag can undo what a recipe sets
        return flag, {**options, "action": argparse.BooleanOptionalAction}
    if kind is list:
        return flag, {**options, "action": "append", "metavar": declared.metadata["metavar"]}
    if declared.metadata["choices"]:
        options["choices"] = declared.metadata["choices"]
    else:
        options["type"] = checked(kind, declared.metadata["rule"])
        options["metavar"] = declared.metadata["metavar"] or flag[2:].upper().replace("-", "_")
    if declared.metadata["sweep"]:
        options["nargs"] = "+"
    return flag, options


def add_settings(parser: ArgumentParser) -> None:
    """One flag per ``TrainConfig`` setting, in its group."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    kinds = setting_kinds()
    for declared in fields(TrainConfig):
        flag, options = flag_options(declared, kinds[declared.name])
        groups[declared.metadata["group"]].add_argument(flag, **options)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(  # no abbreviations: --resume must see --epochs as it is written
        prog="python -m experiments.run", description=__doc__.strip().splitlines()[0],
        allow_abbrev=False)
    add_settings(parser)
    parser.add_argument("--config", metavar="FILE.toml", default=None,
                        help="a recipe file of settings (field = value, as in "
                             "experiments/recipes/); flags given beside it win")
    parser.add_argument("--resume", metavar="RUN_ID", default=None,
                        help="continue an interrupted run from its last completed epoch, with "
                             "its own settings; beside it only --epochs (the run's new number of "
                             "epochs in all), this machine's --device and --precision, "
                             "--checkpoint-dir, --collective-timeout, --[no-]progress and "
                             "--[no-]system-metrics; a sweep's parent run id continues the whole "
                             "sweep")
    return parser


def flags_table() -> str:
    """The flags of --help as markdown tables, one per group (experiments/README.md holds it;
    tests/test_readme.py checks that it is this)."""
    lines = []
    for group in build_parser()._action_groups:
        actions = [action for action in group._group_actions if action.dest != "help"]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", "", "| flag | what it sets |", "| --- | --- |"]
        for action in actions:
            metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            if action.choices:
                metavar = " {" + ",".join(action.choices) + "}"
            text = " ".join(action.help.split()).replace("|", "\\|")
            flags = " / ".join(f"`{option}{metavar}`" for option in action.option_strings)
            lines.append(f"| {flags} | {text} |")
    return "\n".join(lines[1:]) + "\n"


def configs_from_args(args) -> tuple[list[TrainConfig], dict[str, list]]:
    """The runs the flags ask for: the recipe's settings (``--config`` or ``--recipe``) under
    the flags given (a flag left out is None), one run per combination of the swept values
    (and, with ``--folds K``, per fold); and the swept values."""
    from medlm.sweep import sweep_configs

    if args.config and args.recipe:
        raise MedLMError(f"--config {args.config} with --recipe {args.recipe} is invalid: "
                         "expected one recipe (a file, or a name in experiments/recipes/)")
    given = {key: value for key, value in vars(args).items()
             if value is not None and key not in ("resume", "recipe", "config")}
    base = TrainConfig.from_recipe(args.config or args.recipe or "default", **{
        key: value for key, value in given.items() if key not in SWEEPABLE})
    grid = {name: list(dict.fromkeys(given.get(name, [getattr(base, name)])))
            for name in SWEEPABLE}
    if base.folds and "validation_fraction" in given:
        raise MedLMError(f"--validation-fraction with --folds {base.folds} is invalid: each "
                         f"fold holds out 1/{base.folds} of the diseases: expected one of the "
                         "two")
    if base.folds and base.fold is None:  # a cross-validation: every fold in turn
        grid["fold"] = list(range(base.folds))
    return sweep_configs(base, grid), grid


# What --resume takes beside the run id: where and how this machine runs it, and how many
# epochs; anything else would change the run's math, which its checkpoint fixes, unless it
# repeats the value the run was started with (the same command plus --resume).
RESUME_FLAGS = {"resume": "--resume", "checkpoint_dir": "--checkpoint-dir",
                "collective_timeout_min": "--collective-timeout", "epochs": "--epochs",
                "device": "--device", "precision": "--precision", "progress": "--[no-]progress",
                "system_metrics": "--[no-]system-metrics"}


def saved_settings(run_id: str, checkpoint_dir: str) -> list[TrainConfig]:
    """The settings an interrupted run (one) or sweep (one per run) was started with."""
    from medlm._paths import sweep_state_file  # medlm.recipe imports torch: seconds
    from medlm.recipe import resume_config
    from medlm.sweep import load_sweep_state

    state_file = sweep_state_file(checkpoint_dir, run_id)
    if state_file.is_file():
        return [TrainConfig.from_saved(saved)
                for saved in load_sweep_state(state_file)["configs"]]
    return [resume_config(run_id, checkpoint_dir)]


def _distinct(values: list) -> list:
    return [value for index, value in enumerate(values) if value not in values[:index]]


def _spelled(dest: str, values: list) -> str:
    """A setting's values as flags: ``--lr 0.001 0.003``, ``--no-register``, ``no --max-length``
    (not set)."""
    if dest in ("recipe", "config"):
        return " ".join(f"--{'config' if value.endswith('.toml') else 'recipe'} {value}"
                        for value in values)
    flag = flag_of(dest)
    if values == [None]:
        return f"no {flag}"
    if all(isinstance(value, bool) for value in values):
        return " ".join(flag if value else f"--no-{flag[2:]}" for value in values)
    if all(isinstance(value, list) for value in values):
        return " ".join(f"{flag} {item}" for value in values for item in value) or f"{flag} []"
    return f"{flag} {' '.join(sweep_value(value) for value in values)}"


def check_resume_flags(args: argparse.Namespace, given: dict[str, str]) -> dict[str, str]:
    """The flags ``given`` beside --resume less those that repeat the run's saved settings;
    one outside ``RESUME_FLAGS`` that differs is refused, named with its given and saved
    values."""
    asked = [dest for dest in given if dest != "resume"]
    if not asked:
        return given
    saved = saved_settings(args.resume, args.checkpoint_dir or TrainConfig().checkpoint_dir)
    differ = {}
    for dest in asked:
        value = getattr(args, dest)
        values = _distinct(value) if dest in SWEEPABLE else [value]
        saved_values = _distinct([getattr(config, "recipe" if dest == "config" else dest)
                                  for config in saved])
        if values != saved_values:
            differ[dest] = (_spelled(dest, values), _spelled(dest, saved_values))
    refused = [differ[dest] for dest in sorted(differ, key=given.get)
               if dest not in RESUME_FLAGS]
    if refused:
        kind = "sweep" if len(saved) > 1 else "run"
        raise MedLMError(
            f"{', '.join(mine for mine, _ in refused)} with --resume is invalid: {kind} "
            f"{args.resume} was started with {', '.join(theirs for _, theirs in refused)}: "
            "expected the values it was started with, or no such flags (a resumed run keeps "
            f"its settings; only {', '.join(RESUME_FLAGS.values())} may differ)")
    return {dest: option for dest, option in given.items() if dest == "resume" or dest in differ}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and a bad flag before the heavy imports
    from medlm import distributed, launch  # torch, transformers, MLflow: seconds
    from medlm.store import check_tracking_store, compare_runs_hint
    from medlm.timing import process_started

    try:
        quiet_libraries()
        if args.resume is not None:  # "" too: an unset shell variable, not a new run
            given = check_resume_flags(args, flags_given(
                build_parser(), argv if argv is not None else sys.argv[1:]))
            if distributed.is_main():  # under torchrun only rank 0 talks to MLflow
                check_tracking_store()
            epochs = None
            if "epochs" in given:  # how long the run goes on
                if len(args.epochs) > 1:
                    raise MedLMError("--epochs with --resume takes one value: expected the "
                                     "run's new number of epochs in all")
                epochs = args.epochs[0]
            machine = {name: getattr(args, name) for name in
                       ("device", "precision", "progress", "system_metrics") if name in given}
            defaults = TrainConfig()
            launch.resume(args.resume, args.checkpoint_dir or defaults.checkpoint_dir,
                          args.collective_timeout_min or defaults.collective_timeout_min,
                          epochs, started=process_started(), machine=machine)
            return 0
        configs, grid = configs_from_args(args)  # the flags first, then the store
        if distributed.is_main():
            check_tracking_store()
        try:
            launch.run(configs, grid, started=process_started())
        except HubUnavailable as error:  # setup failed, no run started: what works offline
            raise offline_alternative(error, build_parser(), argv, "--dataset", "--model",
                                      configs[0].model) from None
        registered = configs[0].registered_model
        log.info("compare runs: %s    generate: python -m experiments.generate \"Kidney "
                 "Failure\"%s", compare_runs_hint(configs[0].experiment),
                 "" if registered == TrainConfig.registered_model
                 else f" --registered-model {shlex.quote(registered)}")
        return 0
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(run_cli(main))
