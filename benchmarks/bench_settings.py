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
# "auto" (what --precision auto picks on this machine) or fp32/bf16 for every contender; with
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 and fp32, an
# AVX512 machine approximates an AVX2-only CPU
PRECISION = os.environ.get("MEDLM_BENCH_PRECISION", "auto")
DATASET_CSV = Path(os.environ.get(
    "MEDLM_TEST_DATASET",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "diseases_symptoms.csv"))

# Figures each benchmark leaves for the ones after it (ratios) and for the summary table.
RESULTS: dict[str, dict[str, float]] = {}
