"""What the CLIs share: one-line errors with exit status 2, number flags, readable logging."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from medlm import hub, offline, stop
from medlm._paths import looks_like_local_path
from medlm.config import AT_LEAST_ONE, DEVICES, FRACTION, POSITIVE, SEED, Rule, check_mlflow_name
from medlm.errors import MedLMError

EXIT_USAGE = 2
OFFLINE_DATASET = "PATH/TO/diseases_symptoms.csv"  # what a user types instead of a Hub dataset id
OFFLINE_MODEL = "smollm2-135m-instruct"  # the offline base the quick start recommends


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off switches and flags whose default is "not set"."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``error: ...``) instead of usage + message, and
    ``--lr -1e-4`` reaches the flag's validation instead of being mistaken for an option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class",
                          functools.partial(_HelpFormatter, max_help_position=32))
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def number(kind: type, rule: Rule | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` of ``kind``, checked by ``rule`` (none for a setting's flag:
    ``TrainConfig`` checks it)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if rule and not rule.ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {rule.expected}")
        return value

    return parse


positive_int = number(int, AT_LEAST_ONE)
seed = number(int, SEED)
positive_float = number(float, POSITIVE)
fraction = number(float, FRACTION)
probability = number(float, Rule(lambda v: 0 < v <= 1, "a number in (0, 1]"))


def whole_number_up_to(maximum: int, minimum: int = 1) -> Callable[[str], int]:
    return number(int, Rule(lambda v: minimum <= v <= maximum,
                            f"a whole number from {minimum} to {maximum}"))


def offline_alternative(error, parser: argparse.ArgumentParser, argv: list[str] | None,
                        dataset_flag: str | None, model_flag: str | None,
                        model: str | None) -> MedLMError:
    """The one-line error for a Hub id that cannot load offline, ending with the user's command,
    each uncached Hub id swapped for a local file or the offline base (downloaded first)."""
    replace = {}
    if error.kind == "dataset" and dataset_flag:
        replace[dataset_flag] = OFFLINE_DATASET
    hub_model = (model is not None and model not in offline.OFFLINE_BASES
                 and not os.path.exists(os.path.expanduser(model))
                 and not looks_like_local_path(model) and ":/" not in model)
    if model_flag and (error.kind == "model" or hub_model and not hub.model_in_cache(model)):
        replace[model_flag] = OFFLINE_MODEL
    words = replace_options(parser, sys.argv[1:] if argv is None else argv, replace)
    launcher = ("python" if int(os.environ.get("WORLD_SIZE", "1")) == 1
                else "torchrun <the same options>")
    command = f"{launcher} -m {parser.prog.split()[-1]} {shlex.join(words)}".rstrip()
    if OFFLINE_MODEL in replace.values() and offline.find_base(OFFLINE_MODEL) is None:
        command = f"{offline.fetch_command(OFFLINE_MODEL)} && {command}"
    wanted = [what for flag, what in ((dataset_flag, "a local dataset file"),
                                      (model_flag, "an offline base model")) if flag in replace]
    return MedLMError(f"{error}: expected {' and '.join(wanted)}; offline, run: {command}")


def replace_options(parser: argparse.ArgumentParser, argv: list[str],
                    replace: dict[str, str]) -> list[str]:
    """``argv`` without the options in ``replace`` (in any spelling argparse accepts: ``--x v``,
    ``--x=v``, an unambiguous prefix), then those options with their new values."""
    options = [option for action in parser._actions for option in action.option_strings
               if option.startswith("--")]

    def replaced(word: str) -> bool:
        name = word.split("=", 1)[0]
        matches = [option for option in options if option.startswith(name)]
        return (name if name in options else matches[0] if len(matches) == 1 else None) in replace

    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("--") and replaced(word):
            skip = "=" not in word
        else:
            kept.append(word)
    return kept + [word for option, value in replace.items() for word in (option, value)]


def registered_model_name(text: str) -> str:
    """An argparse ``type=`` for ``--registered-model``: TrainConfig's check, in its words."""
    try:
        check_mlflow_name("registered_model", text)
    except MedLMError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--registered-model ")) from None
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-uri", default=None,
                        help="default: models:/REGISTERED_MODEL@champion (see "
                             "--registered-model); models:/NAME@ALIAS, models:/NAME/VERSION, "
                             "models:/NAME/latest, models:/m-MODEL_ID (MLflow 3 logged model), "
                             "a bare version number, runs:/RUN_ID/model, an offline base "
                             "(smollm2-135m-instruct), a local model directory or a .gguf file")
    parser.add_argument("--registered-model", default="medlm", type=registered_model_name,
                        help="registered model whose @champion is the default --model-uri, and "
                             "that a bare version number refers to")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda, then mps, then cpu")


def champion_unless_given(args: argparse.Namespace) -> argparse.Namespace:
    if args.model_uri is None:
        args.model_uri = f"models:/{args.registered_model}@champion"
    return args


def quiet_libraries() -> None:
    """Keep the output about the run: library chatter down to warnings."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The Hub client logs every retry; a final failure still reaches the user as our error.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not _main_process():  # under torchrun every line is said once, by rank 0
        logging.getLogger("medlm").setLevel(logging.ERROR)
    import mlflow  # noqa: F401 - it sets its own log levels on import; ours must come after
    import transformers

    for name in ("mlflow", "transformers", "datasets", "urllib3", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Model-card and license look-ups on the Hub for a local model: expected to miss.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")


def _main_process() -> bool:  # False in torchrun's processes other than rank 0
    return os.environ.get("RANK", "0") == "0"


def _interrupt(signum, frame):
    name = signal.Signals(signum).name
    stop.ask(name)  # a raise lost in a __del__ or gc callback still stops at the next step
    raise KeyboardInterrupt(name)


def credentials_out_of_tracking_uri() -> None:
    """A server's ``user:password@`` in ``MLFLOW_TRACKING_URI`` moved to
    ``MLFLOW_TRACKING_USERNAME`` and ``_PASSWORD`` (MLflow's own way to send the same basic
    auth), so that no line MLflow or MedLM prints can show the password."""
    parts = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if parts.scheme not in ("http", "https") or parts.password is None:
        return
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    os.environ["MLFLOW_TRACKING_URI"] = parts._replace(
        netloc=parts.netloc.rpartition("@")[2]).geturl()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user mistake becomes ``error: ...`` on stderr and exit status 2 (printed
    by rank 0 alone under torchrun). SIGTERM is handled like Ctrl-C: the MLflow run is marked
    KILLED, never left RUNNING, and the exit status is 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    stop.clear()  # a stop asked of an earlier command in this process is not this one's
    credentials_out_of_tracking_uri()
    try:
        return main(argv)
    except MedLMError as error:
        if _main_process():
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        if _main_process():
            print(f"interrupted ({str(interrupt) or 'SIGINT'}); the MLflow run, if one had "
                  "started, is marked KILLED", file=sys.stderr)
        return 130
    finally:
        stop.clear()  # the command asked to stop has ended
