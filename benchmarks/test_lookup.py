"""The lookup baseline on a 20,000-row dataset (16,000 training names, 4,000 held out):
``nearest_name_answers``'s word index against comparing every name pair, as it did before (18 s
of a 20,000-row start-up). Names are drawn from the real names' words, so many share one."""

import numpy as np
import pandas as pd
import pytest
from bench_settings import RESULTS, ROUNDS, SHORT

from medlm.metrics import nearest_name_answers
from tests.conftest import all_pairs_lookup

ROWS = 2_000 if SHORT else 20_000


@pytest.fixture(scope="module")
def lookup_data(frame):
    """(training rows, held-out names): the first 80% of ``ROWS`` made-up rows, and the rest."""
    vocabulary = sorted({word for name in frame["Name"] for word in name.split()})
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({
        "Name": [" ".join(rng.choice(vocabulary, rng.integers(1, 5))) for _ in range(ROWS)],
        "Symptoms": rng.choice(frame["Symptoms"], ROWS)})
    cut = ROWS * 4 // 5
    return rows.iloc[:cut], rows["Name"].iloc[cut:].tolist()


def test_lookup_comparing_every_pair(benchmark, lookup_data):
    train, names = lookup_data
    benchmark.pedantic(lambda: all_pairs_lookup(train, names, "constant"), rounds=ROUNDS)
    RESULTS[f"lookup {ROWS:,} rows: every pair"] = {"seconds": benchmark.stats.stats.min}


def test_lookup_by_word_index(benchmark, lookup_data):
    train, names = lookup_data
    answers = benchmark.pedantic(lambda: nearest_name_answers(train, names, "constant"),
                                 rounds=ROUNDS * 3, warmup_rounds=1)
    assert answers == all_pairs_lookup(train, names[:50], "constant") + answers[50:]
    figures = {"seconds": benchmark.stats.stats.min}
    pairs = RESULTS.get(f"lookup {ROWS:,} rows: every pair")
    if pairs:
        figures["speed-up vs every pair"] = pairs["seconds"] / figures["seconds"]
        benchmark.extra_info["speedup_vs_every_pair"] = figures["speed-up vs every pair"]
    RESULTS[f"lookup {ROWS:,} rows: word index"] = figures
