"""What a bare `python -m experiments.run` trains: the default recipe, the seed notebook's one
flag away, LoRA only on a pretrained base, one split for many training seeds, the untuned base
decoded once per base and split, and only the kept epoch scored."""

import json
import shutil
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from experiments.run import build_parser, configs_from_args
from medlm.config import AUTO_LORA_RANK, TrainConfig
from medlm.errors import MedLMError
from medlm.offline import RANDOM_WEIGHTS_MARK, randomly_initialised
from medlm.recipe import resolve_lora_rank
from medlm.registry import evaluation_key
from tests.conftest import run_module

# The seed notebook (experiments/README.md, The default recipe): distilgpt2, Adam at a constant
# 5e-4 (no decay, no clipping), batch 8, 10 epochs, every weight trained, random batches of
# rows padded/cut to 128 tokens.
SEED_NOTEBOOK = {"lr": 5e-4, "batch_size": 8, "epochs": 10, "scheduler": "constant",
                 "warmup_steps": 0, "patience": 0, "lora_rank": 0, "max_grad_norm": 0.0,
                 "weight_decay": 0.0, "group_by_length": False, "max_length": 128,
                 "loss_on": "full", "model": "distilgpt2", "validation_fraction": 0.2}


def configs(*flags: str) -> list[TrainConfig]:
    return configs_from_args(build_parser().parse_args(list(flags)))[0]


def test_recipe_seed_notebook_reproduces_the_seed_notebooks_settings():
    (config,) = configs("--recipe", "seed-notebook")
    assert {name: getattr(config, name) for name in SEED_NOTEBOOK} == SEED_NOTEBOOK
    assert config.to_params()["recipe"] == "seed-notebook"


def test_a_flag_given_beside_a_recipe_wins_and_the_rest_stays_the_recipes():
    (config,) = configs("--recipe", "seed-notebook", "--epochs", "3", "--lora-rank", "8")
    assert (config.epochs, config.lora_rank, config.scheduler) == (3, 8, "constant")
    (config,) = configs("--scheduler", "constant")
    assert (config.scheduler, config.epochs, config.patience) == ("constant", 3, 1)


def test_the_bare_command_is_the_default_recipe():
    (config,) = configs("--lr", "5e-4")
    assert config == TrainConfig(lr=5e-4)
    assert (config.recipe, config.lora_rank, config.scheduler, config.patience) == (
        "default", None, "cosine", 1)  # None: LoRA on a pretrained base (below)


def test_lora_by_default_on_a_pretrained_base_every_weight_on_a_random_one(tiny_model_dir,
                                                                           tmp_path):
    assert randomly_initialised(str(tiny_model_dir))  # experiments.init_model's kind
    assert resolve_lora_rank(TrainConfig(model=str(tiny_model_dir))).lora_rank == 0
    learned = tmp_path / "learned"
    shutil.copytree(tiny_model_dir, learned)
    config_file = learned / "config.json"
    settings = json.loads(config_file.read_text())
    del settings[RANDOM_WEIGHTS_MARK]
    config_file.write_text(json.dumps(settings))
    assert resolve_lora_rank(TrainConfig(model=str(learned))).lora_rank == AUTO_LORA_RANK
    for name in ("smollm2-135m-instruct", "distilgpt2", "gpt2-medium"):
        assert resolve_lora_rank(TrainConfig(model=name)).lora_rank == AUTO_LORA_RANK
    assert resolve_lora_rank(TrainConfig(model=str(tiny_model_dir), lora_rank=4)).lora_rank == 4


def test_several_training_seeds_are_a_sweep_on_one_split():
    runs = configs("--seed", "1", "2", "--split-seed", "7")
    assert [(c.seed, c.split_seed) for c in runs] == [(1, 7), (2, 7)]


def test_training_seeds_compare_split_seeds_do_not_and_older_runs_keep_their_key():
    params = {"dataset_content_sha256": "a" * 64, "max_samples": None, "loss_on": "full",
              "validation_fraction": 0.2, "metric_version": "3", "max_new_tokens": 40}
    one = evaluation_key({**params, "seed": 1, "split_seed": 42})
    assert one == evaluation_key({**params, "seed": 2, "split_seed": 42})
    assert one != evaluation_key({**params, "seed": 1, "split_seed": 7})
    # logged before --split-seed: its seed split the data, and its key reads as before
    assert evaluation_key({**params, "seed": 42}) == one


def test_a_config_saved_before_split_seed_resumes_on_its_own_split():
    saved = {**TrainConfig(seed=7, lora_rank=0).__dict__}
    del saved["split_seed"], saved["recipe"]
    assert TrainConfig.from_saved(saved).split_seed == 7


def test_the_recipe_and_the_split_seed_are_checked_like_every_flag(capsys):
    with pytest.raises(MedLMError, match="--recipe 'best' is invalid: expected one of "
                       "chat-template, default, seed-notebook"):
        configs("--recipe", "best")
    with pytest.raises(MedLMError, match="--split-seed -1 is invalid"):
        configs("--split-seed", "-1")


@pytest.mark.slow
def test_training_seeds_share_one_split_one_untuned_decode_and_the_champion_rule(
        tmp_path, tracking_store, tiny_model_dir, dataset_csv):
    """Two training seeds of the default recipe: the second run reads the untuned base's
    answers the first one wrote, scores only its kept epoch, and is compared with the first
    (same evaluation key); another split seed is neither."""
    env = {"MLFLOW_TRACKING_URI": "", "MEDLM_CACHE": str(tmp_path / "cache")}
    common = ["--model", str(tiny_model_dir), "--dataset", str(dataset_csv), "--max-samples",
              "60", "--epochs", "3", "--patience", "0", "--lr", "3e-3",
              "--num-validation-samples", "0", "--no-system-metrics"]
    first = run_module("experiments.run", *common, "--seed", "1", cwd=tmp_path, env_extra=env)
    assert first.returncode == 0, first.stderr
    assert "answers kept from an earlier run" not in first.stderr
    assert "training every weight: " in first.stderr  # a random base: no LoRA
    second = run_module("experiments.run", *common, "--seed", "2", cwd=tmp_path,
                        env_extra=env)
    assert second.returncode == 0, second.stderr
    assert "epoch 0 (untuned base, answers kept from an earlier run)" in second.stderr
    assert "not compared" not in second.stderr  # another training seed, the same key
    other_split = run_module("experiments.run", *common, "--seed", "1", "--split-seed", "7",
                             cwd=tmp_path, env_extra=env)
    assert other_split.returncode == 0, other_split.stderr
    assert "answers kept" not in other_split.stderr
    assert "not compared: a different evaluation (split_seed 42 vs 7" in other_split.stderr

    client = MlflowClient(tracking_uri=tracking_store)
    runs = sorted(client.search_runs([client.get_experiment_by_name("medlm").experiment_id]),
                  key=lambda run: run.info.start_time)
    untuned = [run.data.metrics["untuned_symptom_f1"] for run in runs]
    assert untuned[0] == untuned[1]
    params = [run.data.params for run in runs]
    assert [(p["seed"], p["split_seed"], p["lora_rank"]) for p in params] == [
        ("1", "42", "0"), ("2", "42", "0"), ("1", "7", "0")]
    assert params[0]["split_validation_sha256"] == params[1]["split_validation_sha256"]
    assert params[0]["split_validation_sha256"] != params[2]["split_validation_sha256"]
    for run in runs:  # epoch 0 and the kept epoch, nothing in between
        steps = [p.step for p in client.get_metric_history(run.info.run_id, "symptom_f1")]
        assert sorted(steps) == [0, int(run.data.metrics["best_epoch"])]
        assert run.data.metrics["best_symptom_f1"] == next(
            p.value for p in client.get_metric_history(run.info.run_id, "symptom_f1")
            if p.step == run.data.metrics["best_epoch"])


def test_kept_untuned_answers_read_back_only_for_the_same_names(tmp_path, monkeypatch, caplog):
    from medlm import untuned

    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "cache"))
    untuned.save_answers("k1", ["Flu", "Asthma"], ["fever", "wheezing"])
    assert untuned.load_answers("k1", ["Flu", "Asthma"]) == ["fever", "wheezing"]
    assert untuned.load_answers("k1", ["Asthma", "Flu"]) is None  # another order: not these
    assert untuned.load_answers("k2", ["Flu", "Asthma"]) is None
    (tmp_path / "cache" / "untuned" / "k3.json").write_text("{half a file")
    assert untuned.load_answers("k3", ["Flu"]) is None
    for answers in (["fever"], ["fever", None], "fever, wheezing"):  # the names, not the answers
        (tmp_path / "cache" / "untuned" / "k4.json").write_text(
            json.dumps({"names": ["Flu", "Asthma"], "answers": answers}))
        assert untuned.load_answers("k4", ["Flu", "Asthma"]) is None, answers
    assert not list((tmp_path / "cache" / "untuned").glob("*.partial"))
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    untuned.save_answers("k1", ["Flu"], ["fever"])  # a cache that cannot be written: a warning
    assert "could not keep the untuned base's answers" in caplog.text


def test_a_runs_recipe_file_trains_its_settings_again_and_flags_undo_a_recipes_switches(
        tmp_path):
    """``to_recipe`` (the run's artifact recipe.toml) read back with --config gives the same
    settings, less where the run was tracked; an on/off setting a recipe turns off, a flag
    turns on again."""
    (config,) = configs("--recipe", "seed-notebook", "--model", "my model", "--sample-prompt",
                        'Flu "A"', "--max-samples", "60", "--no-register")
    file = tmp_path / "recipe.toml"
    file.write_text(config.to_recipe())
    (again,) = configs("--config", str(file))
    assert again == replace(config, recipe=str(file), register=True)  # tracking is no setting
    assert "register" not in config.to_recipe()
    assert not config.group_by_length
    (switched,) = configs("--recipe", "seed-notebook", "--group-by-length")
    assert switched.group_by_length


@pytest.mark.parametrize("content, expected", [
    ("lr = 'fast'\n", "lr = 'fast' is invalid: expected a float"),
    ("learning_rate = 5e-4\n", "'learning_rate' is not a setting"),
    ("sample_prompts = [1]\n", "expected a list of strings"),
    ("lr = \n", "is not TOML"),
])
def test_a_bad_recipe_file_is_one_line_naming_the_setting(tmp_path, content, expected):
    file = tmp_path / "bad.toml"
    file.write_text(content)
    with pytest.raises(MedLMError, match=expected):
        configs("--config", str(file))
    with pytest.raises(MedLMError, match="does not exist"):
        configs("--config", str(tmp_path / "missing.toml"))
