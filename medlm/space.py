"""A hyperparameter search's space: which settings it varies and over what, from
``--param NAME=SPEC`` flags or a TOML file of the same specs, as Optuna distributions.

A spec is ``LOW..HIGH`` (uniform; a whole-number setting draws whole numbers), ``LOW..HIGH:log``
(log-uniform) or ``A,B,C`` (one of those values); in a file, ``lr = "1e-4..3e-3:log"`` or
``lora_rank = [8, 16, 32]``. Every bound and value is checked by its setting's own rule
(``medlm.config``), so a search never proposes what a run would refuse."""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from medlm.config import NOT_RECIPE, TrainConfig, setting_kinds
from medlm.errors import MedLMError

# What a plain ``python -m experiments.search`` varies: the levers the default recipe was
# chosen among (experiments/RESULTS.md), each range holding the default's own value. Not
# loss_on: it changes the tokens the validation loss is over (the default --select-by), so
# trials of both could not be compared by it (``medlm.search.check_comparable``).
DEFAULT_SPACE = {"lr": "1e-4..3e-3:log", "lora_rank": "8,16,32", "warmup_steps": "0..30",
                 "weight_decay": "0..0.1", "epochs": "2..5"}

# what a search may not vary: where and how runs are tracked and run, the split (every trial
# must hold out the same diseases to be compared), and the selection itself
NOT_SEARCHABLE = NOT_RECIPE | {"model", "dataset", "max_samples", "validation_fraction",
                               "split_seed", "select_by", "sample_prompts", "folds", "fold"}


def searchable() -> dict[str, type]:
    """The settings a search may vary, and their types."""
    kinds = setting_kinds()
    return {name: kind for name, kind in kinds.items()
            if name not in NOT_SEARCHABLE and kind in (int, float, str, bool)}


def _value(name: str, kind: type, text: Any) -> Any:
    """One bound or choice of ``name``, parsed as its setting's type and checked by its rule."""
    declared = next(item for item in fields(TrainConfig) if item.name == name)
    rule, choices = declared.metadata["rule"], declared.metadata["choices"]
    expected = {int: "a whole number", float: "a number", bool: "true or false"}.get(kind)
    try:
        value = (text if not isinstance(text, str) else
                 {"true": True, "false": False}[text.lower()] if kind is bool else
                 float(text) if kind is int else kind(text))
    except (KeyError, ValueError):
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected {expected}") from None
    if kind in (int, float) and not math.isfinite(value):
        raise MedLMError(f"--param {name}: {text!r} is invalid: expected a finite number")
    if kind is int and isinstance(value, float):
        if value != int(value):
            raise MedLMError(f"--param {name}: {text!r} is invalid: expected a whole number")
        value = int(value)
    if choices and value not in choices:
        raise MedLMError(f"--param {name}: {value!r} is invalid: expected one of "
                         f"{', '.join(choices)}")
    if rule is not None and not rule.ok(value):
        raise MedLMError(f"--param {name}: {value!r} is invalid: expected {rule.expected}")
    return value


def distribution(name: str, spec: Any) -> BaseDistribution:
    """The distribution a spec (a string, or a file's list of choices) draws ``name`` from."""
    kinds = searchable()
    if name not in kinds:
        raise MedLMError(f"--param {name!r} is invalid: expected one of "
                         f"{', '.join(sorted(kinds))}")
    kind = kinds[name]
    if isinstance(spec, list):
        spec = ",".join(str(item) for item in spec)
    spec = str(spec).strip()
    if ".." not in spec:
        choices = list(dict.fromkeys(_value(name, kind, item.strip())
                                     for item in spec.split(",") if item.strip()))
        if not choices:
            raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW..HIGH, "
                             "LOW..HIGH:log or A,B,C")
        return CategoricalDistribution(choices)
    bounds, _, scale = spec.partition(":")
    if kind not in (int, float) or scale not in ("", "log"):
        raise MedLMError(f"--param {name}={spec!r} is invalid: expected "
                         + ("A,B,C (it is not a number)" if kind not in (int, float)
                            else "LOW..HIGH or LOW..HIGH:log"))
    low, high = (_value(name, kind, text.strip()) for text in bounds.split("..", 1))
    if not low < high or (scale == "log" and low <= 0):
        raise MedLMError(f"--param {name}={spec!r} is invalid: expected LOW < HIGH"
                         + (", both > 0 on a log scale" if scale else ""))
    if kind is int:
        return IntDistribution(low, high, log=scale == "log")
    return FloatDistribution(low, high, log=scale == "log")


def parse_params(specs: list[str]) -> dict[str, str]:
    """``["lr=1e-4..1e-3:log", ...]`` as {name: spec}; a name given twice is refused."""
    parsed: dict[str, str] = {}
    for text in specs:
        name, sep, spec = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not spec.strip():
            raise MedLMError(f"--param {text!r} is invalid: expected NAME=SPEC, e.g. "
                             "lr=1e-4..3e-3:log or lora_rank=8,16,32")
        if name in parsed:
            raise MedLMError(f"--param {name} is given twice: expected one range per setting")
        parsed[name] = spec
    return parsed


def read_space_file(path: str) -> dict[str, Any]:
    """A TOML file of specs, by setting name (``warmup-steps`` as ``warmup_steps``)."""
    try:
        specs = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise MedLMError(f"--space {path!r}: {error.strerror or error}: expected a readable "
                         "TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise MedLMError(f"--space {path!r} is not valid TOML ({error}): expected lines like "
                         "lr = \"1e-4..3e-3:log\"") from None
    named = {name.replace("-", "_"): spec for name, spec in specs.items()}
    if len(named) < len(specs):
        raise MedLMError(f"--space {path!r} names a setting twice (as NAME and its flag "
                         "spelling): expected one range per setting")
    return named


def search_space(specs: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The space of ``specs`` (the default space when there are none), in the order given."""
    return {name: distribution(name, spec) for name, spec in (specs or DEFAULT_SPACE).items()}


def contains(space: dict[str, BaseDistribution], values: dict[str, Any]) -> bool:
    """Do ``values`` (a recipe's, by setting) lie in ``space``? (Then the search may start
    from them.)"""
    for name, drawn in space.items():
        value = values.get(name)
        if isinstance(drawn, CategoricalDistribution):
            if value not in drawn.choices:
                return False
        elif value is None or not drawn.low <= value <= drawn.high:
            return False
    return True


def describe(space: dict[str, BaseDistribution]) -> str:
    """The space in the specs' own words: ``lr=0.0001..0.003:log lora_rank=8,16,32``."""
    words = []
    for name, drawn in space.items():
        if isinstance(drawn, CategoricalDistribution):
            words.append(f"{name}={','.join(str(choice) for choice in drawn.choices)}")
        else:
            words.append(f"{name}={drawn.low:g}..{drawn.high:g}{':log' if drawn.log else ''}")
    return " ".join(words)
