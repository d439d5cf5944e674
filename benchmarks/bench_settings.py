"""Benchmark settings and the figures the benchmarks share (ratios, the summary table).

Full mode (default) uses distilgpt2's exact architecture (random init: same cost as the real
weights, no download). ``MEDLM_BENCH_SHORT=1`` (what .ci/run uses) swaps in a tiny GPT-2, fewer
steps and a 10x instead of 100x scale test, so the suite cannot rot without costing CI minutes.
"""

import os
from pathlib import Path

SHORT = os.environ.get("MEDLM_BENCH_SHORT", "") not in ("", "0")
PRESET = "tiny" if SHORT else "distilgpt2"
SCALE = 10 if SHORT else 100
ROUNDS = 1 if SHORT else 2
DATASET_CSV = Path(os.environ.get(
    "MEDLM_TEST_DATASET",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "diseases_symptoms.csv"))

# Figures each benchmark leaves for the ones after it (ratios) and for the summary table.
RESULTS: dict[str, dict[str, float]] = {}
