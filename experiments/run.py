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
from dataclasses import MISSING, fields
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

# What --resume takes beside the run id: where and how this machine runs it, and how many
# epochs; any other flag must repeat the run's own value (its checkpoint fixes its math).
RESUME_FLAGS = {"resume": "--resume", "checkpoint_dir": "--checkpoint-dir",
                "collective_timeout_min": "--collective-timeout", "epochs": "--epochs",
                "device": "--device", "precision": "--precision", "tf32": "--[no-]tf32",
                "deterministic": "--[no-]deterministic", "progress": "--[no-]progress",
                "system_metrics": "--[no-]system-metrics"}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(value) if isinstance(value, list) else str(value)


def add_settings(parser: ArgumentParser) -> None:
    """One flag per ``TrainConfig`` setting, in its group, its help ending with its default and
    each recipe's other value. A flag left out is not in the namespace: the recipe's applies."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    kinds, recipes = setting_kinds(), {name: read_recipe(name) for name in recipe_names()}
    for declared in fields(TrainConfig):
        meta, flag, kind = declared.metadata, flag_of(declared.name), kinds[declared.name]
        default = (declared.default if declared.default is not MISSING
                   else declared.default_factory())
        changed = "".join(f"; --recipe {name}: {_shown(settings[declared.name])}"
                          for name, settings in recipes.items()
                          if settings.get(declared.name, default) != default)
        sweep = " (several values: a sweep)" if meta["sweep"] else ""
        options = {"dest": declared.name, "default": argparse.SUPPRESS, "help": f"{meta['help']}"
                   f"{sweep} (default: {meta['shown'] or _shown(default)}{changed})"}
        if kind is bool:  # --NAME and --no-NAME, so a flag can undo what a recipe sets
            options["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            options.update(action="append", metavar=meta["metavar"])
        else:
            if kind in (int, float):
                options["type"] = number(kind)
            options["metavar"] = ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else
                                  meta["metavar"] or flag[2:].upper().replace("-", "_"))
            if meta["sweep"]:
                options["nargs"] = "+"
        groups[meta["group"]].add_argument(flag, **options)


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
    """The flags of --help as markdown tables, one per group (experiments/README.md holds it)."""
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


def _distinct(values: list) -> list:
    return [value for index, value in enumerate(values) if value not in values[:index]]


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


def _spelled(dest: str, values: list) -> str:
    """``--lr 0.001 0.003``, ``--no-register``, ``no --max-length``: values as flags."""
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
    """The settings the flags ``given`` beside --resume set, checked: the checkpoint directory,
    the collective timeout, and each of ``RESUME_FLAGS`` that differs from the run's saved
    settings; any other flag that differs is refused, named with both values."""
    from medlm.recipe import resume_config  # imports torch: seconds
    from medlm.sweep import saved_sweep

    settings = {name: given.get(name, getattr(TrainConfig, name))
                for name in ("checkpoint_dir", "collective_timeout_min")}
    if given:
        sweep = saved_sweep(run_id)
        saved = sweep[0] if sweep else [resume_config(run_id, settings["checkpoint_dir"])]
        differ = {}
        for dest, value in given.items():
            values = _distinct(value) if dest in SWEEPABLE else [value]
            saved_values = _distinct([getattr(run, "recipe" if dest == "config" else dest)
                                      for run in saved])
            if values != saved_values:
                differ[dest] = (_spelled(dest, values), _spelled(dest, saved_values))
        refused = [spelled for dest, spelled in differ.items() if dest not in RESUME_FLAGS]
        if refused:
            raise MedLMError(
                f"{', '.join(mine for mine, _ in refused)} with --resume is invalid: "
                f"{'sweep' if len(saved) > 1 else 'run'} {run_id} was started with "
                f"{', '.join(theirs for _, theirs in refused)}: expected the values it was "
                "started with, or no such flags (a resumed run keeps its settings; only "
                f"{', '.join(RESUME_FLAGS.values())} may differ)")
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

    failed = False
    try:
        quiet_libraries()
        if distributed.is_main():  # under torchrun only rank 0 talks to MLflow; first, as
            check_tracking_store()  # a sweep's saved settings are read from it
        if resume is not None:  # "" too: an unset shell variable, not a new run
            sweep.resume(resume, resume_settings(resume, vars(args)), process_started())
            return 0
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
    except BaseException:
        failed = True
        raise
    finally:
        distributed.stop(failed)


if __name__ == "__main__":
    sys.exit(run_cli(main))
