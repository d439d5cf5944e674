"""The champion rule on real (tiny) fine-tunes: the alias moves to a model that is better with
confidence on the same validation rows, and a re-run of the champion's recipe with another
training seed moves it only when its improvement is significant."""

import logging

import pytest
from mlflow import MlflowClient

from medlm import compare as champion
from medlm.config import TrainConfig
from medlm.recipe import Run
from medlm.tracking import VALIDATION_LOSSES, logged_row_losses

pytestmark = pytest.mark.slow


def train(tiny_model_dir, dataset_csv, **settings):
    config = TrainConfig.from_recipe(
        "default", model=str(tiny_model_dir), dataset=str(dataset_csv), max_samples=60,
        max_new_tokens=8, system_metrics=False, progress=False, sample_prompts=[],
        num_validation_samples=0, **{"epochs": 1, "lr": 3e-3, **settings})
    return Run(config).setup().execute()


def champion_version():
    return str(MlflowClient().get_model_version_by_alias("medlm", "champion").version)


def test_a_seed_rerun_moves_the_champion_only_with_confidence_and_a_better_model_does(
        tiny_model_dir, dataset_csv, mlflow_home, caplog):
    caplog.set_level(logging.INFO, logger="medlm")
    first = train(tiny_model_dir, dataset_csv, seed=1)
    assert champion_version() == first["version"] == "1"
    rows = logged_row_losses(first["run_id"], epoch=1)
    assert len(rows) == 12 and VALIDATION_LOSSES == "validation_losses.json"  # a fifth of 60
    # the rows' losses add up to the run's validation loss
    assert rows["loss_sum"].sum() / rows["tokens"].sum() == pytest.approx(
        first["validation_loss"], rel=1e-4)

    rerun = train(tiny_model_dir, dataset_csv, seed=2)  # the champion's recipe, another seed
    client = MlflowClient()
    evidence = champion.loss_evidence(client.get_model_version("medlm", "1"),
                                      client.get_model_version("medlm", "2"))
    assert evidence["difference"] == pytest.approx(
        rerun["validation_loss"] - first["validation_loss"], abs=1e-4)
    moved = champion_version() == rerun["version"]
    assert moved == (evidence["ci_high"] < 0), evidence
    (verdict,) = [r.message for r in caplog.records if "version 2;" in r.message]
    assert ("is the new champion" if moved else "is not better than version 1's") in verdict
    assert f"{evidence['ci_low']:+.4f}..{evidence['ci_high']:+.4f}" in verdict, verdict

    better = train(tiny_model_dir, dataset_csv, seed=1, epochs=3)  # trained three times longer
    assert champion_version() == better["version"] == "3"
    (verdict,) = [r.message for r in caplog.records if "version 3;" in r.message]
    assert "is the new champion" in verdict and "with confidence" in verdict, verdict
    worse = train(tiny_model_dir, dataset_csv, seed=3)  # back to one epoch
    assert champion_version() == "3" and worse["version"] == "4"
    (verdict,) = [r.message for r in caplog.records if "version 4;" in r.message]
    assert "is not better than version 3's" in verdict and "95% CI +" in verdict, verdict
