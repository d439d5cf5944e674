"""README's "Best model offline" recipe, on a subset of the data: the fine-tuned model's symptom
F1 on diseases it never saw beats every answer that needs no model, and the untuned base."""

import os

import pytest
from mlflow import MlflowClient

from medlm.modeling import cpu_supports_bf16
from medlm.offline import fetch_command, find_base
from tests.conftest import run_module

pytestmark = pytest.mark.slow

BASE = "gemma3-270m"
# README, "Best model offline": the recipe's flags (the test shortens --epochs and the data)
RECIPE = ["--model", BASE, "--lr", "1e-4", "--scheduler", "cosine", "--warmup-steps", "10"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, dataset_csv):
    if find_base(BASE) is None:
        if os.environ.get("MEDLM_REQUIRE_OFFLINE_BASE"):  # .ci/run downloads it
            pytest.fail(f"{BASE} is not downloaded: {fetch_command(BASE)}", pytrace=False)
        pytest.skip(f"{BASE} is not downloaded: {fetch_command(BASE)}")
    if not cpu_supports_bf16():
        # fp32 on such a CPU: the same run takes ~4x longer than CI's budget for one test
        pytest.skip("the recipe test needs a CPU with native bf16 (AVX512-BF16 or AMX) to run "
                    "in minutes")
    home = tmp_path_factory.mktemp("recipe")
    result = run_module("experiments.run", *RECIPE, "--dataset", str(dataset_csv),
                        "--max-samples", "200", "--epochs", "2", "--no-register",
                        "--num-validation-samples", "0", "--no-system-metrics", cwd=home,
                        env_extra={"MLFLOW_TRACKING_URI": "", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medlm").experiment_id])
    return run.data.metrics


def test_the_recipe_beats_every_answer_that_needs_no_model(recipe_run):
    best_baseline = max(recipe_run["baseline_constant_symptom_f1"],
                        recipe_run["baseline_lookup_symptom_f1"])
    assert recipe_run["best_symptom_f1"] >= 1.2 * best_baseline, recipe_run
    best_word = max(recipe_run["baseline_constant_word_f1"],
                    recipe_run["baseline_lookup_word_f1"])
    assert recipe_run["best_word_f1"] >= 1.2 * best_word, recipe_run


def test_the_recipe_beats_the_untuned_base(recipe_run):
    assert recipe_run["best_symptom_f1"] > 3 * recipe_run["untuned_symptom_f1"] + 0.05
