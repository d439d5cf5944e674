"""Fine-tune a causal LM on disease -> symptoms and record the run in MLflow.

    python -m experiments.run --lr 5e-4
    torchrun --standalone --nproc_per_node 4 -m experiments.run --lr 5e-4   # 4 processes (DDP)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shlex
import sys
from dataclasses import MISSING, Field, fields
from typing import Any

from experiments._cli import ArgumentParser, number, offline_alternative, quiet_libraries, run_cli
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
    setting, a repeatable flag for a list, else a value (a number read as one; ``TrainConfig``
    checks it). A flag left out is not in the parsed namespace: the recipe's value applies."""
    flag = flag_of(declared.name)
    options = {"dest": declared.name, "default": argparse.SUPPRESS, "help": flag_help(declared)}
    if kind is bool:  # --NAME and --no-NAME, so a flag can undo what a recipe sets
        return flag, {**options, "action": argparse.BooleanOptionalAction}
    if kind is list:
        return flag, {**options, "action": "append", "metavar": declared.metadata["metavar"]}
    if kind in (int, float):
        options["type"] = number(kind)
    choices = declared.metadata["choices"]
    options["metavar"] = ("{" + ",".join(choices) + "}" if choices else
                          declared.metadata["metavar"] or flag[2:].upper().replace("-", "_"))
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
    parser = ArgumentParser(  # no abbreviations: a new flag cannot change an old command
        prog="python -m experiments.run", description=__doc__.strip().splitlines()[0],
        allow_abbrev=False)
    add_settings(parser)
    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="a recipe file of settings (field = value, as in "
                             "experiments/recipes/); flags given beside it win")
    parser.add_argument("--resume", metavar="RUN_ID", default=argparse.SUPPRESS,
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
            text = " ".join(action.help.split()).replace("|", "\\|")
            flags = " / ".join(f"`{option}{metavar}`" for option in action.option_strings)
            lines.append(f"| {flags} | {text} |")
    return "\n".join(lines[1:]) + "\n"


def configs_from_args(args: argparse.Namespace) -> tuple[list[TrainConfig], dict[str, list]]:
    """The runs the flags ask for, each a ``TrainConfig`` built (and so checked) once: the
    recipe's settings (``--config`` or ``--recipe``) under the flags given, one run per
    combination of the swept values (and, with ``--folds K``, per fold); and the swept values."""
    given = dict(vars(args))
    config_file, recipe = given.pop("config", None), given.pop("recipe", None)
    if config_file and recipe:
        raise MedLMError(f"--config {config_file} with --recipe {recipe} is invalid: "
                         "expected one recipe (a file, or a name in experiments/recipes/)")
    recipe = config_file or recipe or "default"
    settings = {**read_recipe(recipe), **given}
    axes = {name: _distinct(settings.pop(name)) for name in SWEEPABLE if name in given}
    if settings.get("folds", 0) > 0 and settings.get("fold") is None:  # every fold in turn
        axes["fold"] = list(range(settings["folds"]))
    configs = [TrainConfig(recipe=recipe, **settings, **dict(zip(axes, point, strict=True)))
               for point in itertools.product(*axes.values())]
    if configs[0].folds and "validation_fraction" in given:
        raise MedLMError(f"--validation-fraction with --folds {configs[0].folds} is invalid: "
                         f"each fold holds out 1/{configs[0].folds} of the diseases: expected "
                         "one of the two")
    return configs, {name: _distinct([getattr(config, name) for config in configs])
                     for name in (*SWEEPABLE, *axes)}


# What --resume takes beside the run id: where and how this machine runs it, and how many
# epochs; anything else would change the run's math, which its checkpoint fixes, unless it
# repeats the value the run was started with (the same command plus --resume).
RESUME_FLAGS = {"resume": "--resume", "checkpoint_dir": "--checkpoint-dir",
                "collective_timeout_min": "--collective-timeout", "epochs": "--epochs",
                "device": "--device", "precision": "--precision", "progress": "--[no-]progress",
                "system_metrics": "--[no-]system-metrics"}


def saved_settings(run_id: str, checkpoint_dir: str) -> list[TrainConfig]:
    """The settings an interrupted run (one) or sweep (one per run, as its parent run records
    them) was started with."""
    from medlm.recipe import resume_config  # imports torch: seconds
    from medlm.sweep import saved_sweep

    sweep = saved_sweep(run_id)
    return sweep[0] if sweep else [resume_config(run_id, checkpoint_dir)]


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


def resume_settings(run_id: str, given: dict[str, Any]) -> dict[str, Any]:
    """What the flags ``given`` beside --resume change, checked as every setting is: this
    machine's checkpoint directory and collective timeout, and each of ``RESUME_FLAGS`` that
    differs from the run's saved settings; any other flag that differs is refused, named with
    its given and saved values."""
    settings = {name: given[name] for name in ("checkpoint_dir", "collective_timeout_min")
                if name in given}
    if given:
        saved = saved_settings(run_id, given.get("checkpoint_dir", TrainConfig.checkpoint_dir))
        differ = {}
        for dest, value in given.items():
            values = _distinct(value) if dest in SWEEPABLE else [value]
            saved_values = _distinct([getattr(config, "recipe" if dest == "config" else dest)
                                      for config in saved])
            if values != saved_values:
                differ[dest] = (_spelled(dest, values), _spelled(dest, saved_values))
        refused = [spelled for dest, spelled in differ.items() if dest not in RESUME_FLAGS]
        if refused:
            kind = "sweep" if len(saved) > 1 else "run"
            raise MedLMError(
                f"{', '.join(mine for mine, _ in refused)} with --resume is invalid: {kind} "
                f"{run_id} was started with {', '.join(theirs for _, theirs in refused)}: "
                "expected the values it was started with, or no such flags (a resumed run "
                f"keeps its settings; only {', '.join(RESUME_FLAGS.values())} may differ)")
        settings.update({dest: given[dest] for dest in differ})
    if "epochs" in settings:  # how long the run goes on
        if len(settings["epochs"]) > 1:
            raise MedLMError("--epochs with --resume takes one value: expected the run's new "
                             "number of epochs in all")
        settings["epochs"] = settings["epochs"][0]
    TrainConfig(**settings)  # each value checked, as a new run's are
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and a bad flag before the heavy imports
    resume = vars(args).pop("resume", None)  # args holds only the flags given
    if resume is None:
        configs, grid = configs_from_args(args)  # the flags first, then the store
    from medlm import distributed, sweep  # torch, transformers, MLflow: seconds
    from medlm.store import check_tracking_store, compare_runs_hint
    from medlm.timing import process_started

    try:
        quiet_libraries()
        if resume is not None:  # "" too: an unset shell variable, not a new run
            if distributed.is_main():  # under torchrun only rank 0 talks to MLflow; first, as
                check_tracking_store()  # the saved settings of a sweep are read from it
            settings = resume_settings(resume, vars(args))
            sweep.resume(resume, settings.pop("checkpoint_dir", TrainConfig.checkpoint_dir),
                         settings.pop("collective_timeout_min",
                                      TrainConfig.collective_timeout_min),
                         settings.pop("epochs", None), started=process_started(),
                         machine=settings)
            return 0
        if distributed.is_main():
            check_tracking_store()
        try:
            sweep.run(configs, grid, started=process_started())
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
