"""Fixtures for the benchmarks and the summary table printed at the end (see bench_settings)."""

from __future__ import annotations

import time

import pytest
import torch
from bench_settings import DATASET_CSV, PRESET, RESULTS, SCALE, SHORT


@pytest.fixture(scope="session")
def frame():
    from medlm.data import load_disease_data

    return load_disease_data(str(DATASET_CSV)).frame


@pytest.fixture(scope="session")
def train_frame(frame):
    from medlm.split import split_by_disease

    return split_by_disease(frame, 0.2, 42).train


@pytest.fixture(scope="session")
def tokenizer():
    from medlm.offline import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture
def fresh_model():
    """A new model each call, same initial weights, in train mode."""
    from medlm.offline import random_gpt2

    def make():
        _, model = random_gpt2(PRESET, seed=0)
        return model.train()

    return make


@pytest.fixture(scope="session")
def matmul_peak() -> dict[str, float]:
    """Best FLOP/s of a square matmul in fp32 and bf16, measured now, on this machine."""
    size = 1024 if SHORT else 2048
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        peaks[name] = 2 * size**3 / best
    RESULTS["matmul peak"] = {"fp32 GFLOP/s": peaks["fp32"] / 1e9,
                              "bf16 GFLOP/s": peaks["bf16"] / 1e9}
    return peaks


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    from medlm.modeling import cpu_count, cpu_kind, cpu_name

    terminalreporter.section(f"MedLM benchmark figures ({PRESET}, scale x{SCALE}, "
                             f"{torch.get_num_threads()} threads)")
    terminalreporter.write_line(f"machine: {cpu_name()}, {cpu_count()} cores, {cpu_kind()}; "
                                f"torch {torch.__version__}")
    for name, figures in RESULTS.items():
        shown = ", ".join(f"{key} {value:,.3g}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {shown}")
