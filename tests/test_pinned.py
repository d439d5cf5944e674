"""The safety net for refactors: a short run of a tiny random GPT-2 through the whole recipe (the
data, split, tokenization, batches, schedule, loop and logging the main command uses) must log
the same per-epoch losses and scores as when they were pinned, to 1e-5.

It pins fresh runs; that a resumed run, a sweep's child or a torchrun process ends with the
losses of a plain run is the slow tests' part (test_resume, test_cli, test_distributed).

A change that moves any of them on purpose (a new default, another tokenization) updates the
pins in the same commit, and says why: run this file with ``MEDLM_PRINT_PINS=1 -s`` to print
the new ones. A refactor that moves them is a bug.

The runs are fp32 on the CPU (never bf16 autocast, which an AVX512-BF16 machine would choose), so
the pins hold on every CPU kind: their kernels sum in other orders, which moves these losses by
about 1e-7 (checked with ``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE``, the portable
kernels, against this machine's AVX512 ones).
"""

import os

import pytest
from mlflow import MlflowClient

from medlm.config import TrainConfig
from medlm.recipe import Run
from medlm.tracking import library_versions

# per-epoch training and validation losses, and the no-model answers' scores, of each run
PINS = {
    "full fine-tuning": {"training_loss": [10.679686090818903, 8.722284930781024],
                         "validation_loss": [9.663361080109127, 8.770533970424108]},
    "lora": {"training_loss": [10.825890743371213, 10.658871781430376],
             "validation_loss": [10.690233018663195, 10.635228717137897]},
}
BASELINE_SCORES = {  # with their intervals (medlm.scores: SciPy's bootstrap, seeded)
    "baseline_constant_symptom_precision": 0.125,
    "baseline_constant_symptom_precision_ci_low": 0.04,
    "baseline_constant_symptom_precision_ci_high": 0.175,
    "baseline_constant_symptom_recall": 0.18518518518518517,
    "baseline_constant_symptom_recall_ci_low": 0.05555555555555555,
    "baseline_constant_symptom_recall_ci_high": 0.23076923076923078,
    "baseline_constant_symptom_f1": 0.14925373134328357,
    "baseline_constant_symptom_f1_ci_low": 0.047619047619047616,
    "baseline_constant_symptom_f1_ci_high": 0.19444444444444445,
    "baseline_constant_word_f1": 0.15730337078651688,
    "baseline_constant_word_f1_ci_low": 0.13664596273291926,
    "baseline_constant_word_f1_ci_high": 0.19607843137254902,
    "baseline_lookup_symptom_precision": 0.13157894736842105,
    "baseline_lookup_symptom_precision_ci_low": 0.041666666666666664,
    "baseline_lookup_symptom_precision_ci_high": 0.1794871794871795,
    "baseline_lookup_symptom_recall": 0.18518518518518517,
    "baseline_lookup_symptom_recall_ci_low": 0.05555555555555555,
    "baseline_lookup_symptom_recall_ci_high": 0.23076923076923078,
    "baseline_lookup_symptom_f1": 0.15384615384615383,
    "baseline_lookup_symptom_f1_ci_low": 0.05263157894736842,
    "baseline_lookup_symptom_f1_ci_high": 0.19718309859154928,
    "baseline_lookup_word_f1": 0.1978021978021978,
    "baseline_lookup_word_f1_ci_low": 0.16129032258064516,
    "baseline_lookup_word_f1_ci_high": 0.22077922077922077,
}
SETTINGS = {
    "full fine-tuning": {},  # the default on a random base: every weight
    "lora": {"lora_rank": 4},  # the default's path on a pretrained base (here a random one)
}


def test_short_runs_log_their_pinned_losses_and_scores(tiny_model_dir, dataset_csv, mlflow_home):
    client, logged, scores = MlflowClient(), {}, {}
    for name, settings in SETTINGS.items():
        config = TrainConfig.from_recipe(
            "default", model=str(tiny_model_dir), dataset=str(dataset_csv), max_samples=40,
            epochs=2, lr=1e-2, warmup_steps=2, seed=0, precision="fp32", device="cpu",
            register=False, symptom_eval=False, system_metrics=False, progress=False,
            sample_prompts=[], num_validation_samples=0, run_name=name, **settings)
        run_id = Run(config).setup().execute()["run_id"]
        logged[name] = {key: [m.value for m in sorted(client.get_metric_history(run_id, key),
                                                      key=lambda m: m.step)]
                        for key in ("training_loss", "validation_loss")}
        scores[name] = {key: value for key, value in client.get_run(run_id).data.metrics.items()
                        if key.startswith("baseline_")}
    if os.environ.get("MEDLM_PRINT_PINS"):
        print(f"\nPINS = {logged}\nBASELINE_SCORES = {scores['lora']}")
    # pinned with torch 2.13.0, transformers 5.24.0, peft 0.21.2 and scipy 1.17.1: a release
    # that changes how a random GPT-2 or an adapter is initialised, or how SciPy's bootstrap
    # draws, moves them too
    versions = library_versions()
    assert logged == {name: {key: pytest.approx(values, rel=1e-5) for key, values in pins.items()}
                      for name, pins in PINS.items()}, versions
    assert scores == {name: pytest.approx(BASELINE_SCORES, rel=1e-5) for name in SETTINGS}
