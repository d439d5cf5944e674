"""Tokenizing the whole dataset: LanguageDataset (once, in batch) against the seed's per-item
tokenization padded to 128; and how LanguageDataset's time and memory grow with the data."""

import json
import subprocess
import sys

from bench_settings import RESULTS, ROUNDS, SCALE, SHORT
from seed_notebook import SeedLanguageDataset

from medlm.data import LanguageDataset


def tokenize_all(dataset) -> int:
    return sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))


def test_seed_per_item_tokenization(benchmark, frame, tokenizer):
    benchmark.pedantic(lambda: tokenize_all(SeedLanguageDataset(frame, tokenizer)),
                       rounds=ROUNDS * 3, warmup_rounds=1)
    RESULTS["tokenize: seed per item"] = {"seconds": benchmark.stats.stats.min}


def test_language_dataset_tokenization(benchmark, frame, tokenizer):
    benchmark.pedantic(lambda: tokenize_all(LanguageDataset(frame, tokenizer)),
                       rounds=ROUNDS * 3, warmup_rounds=1)
    figures = {"seconds": benchmark.stats.stats.min}
    seed = RESULTS.get("tokenize: seed per item")
    if seed:
        figures["speed-up vs seed"] = seed["seconds"] / figures["seconds"]
        benchmark.extra_info["speedup_vs_seed"] = figures["speed-up vs seed"]
    RESULTS["tokenize: LanguageDataset"] = figures


_MEASURE = """
import json, resource, sys, time
import pandas as pd
from medlm.data import LanguageDataset, load_disease_data
from medlm.offline import gpt2_tokenizer
tokenizer = gpt2_tokenizer()
frame = load_disease_data(sys.argv[1]).frame
frame = pd.concat([frame] * int(sys.argv[2]), ignore_index=True)
tokenizer(["warm up"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dataset = LanguageDataset(frame, tokenizer)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = []
for _ in range(3):
    started = time.perf_counter()
    LanguageDataset(frame, tokenizer)
    seconds.append(time.perf_counter() - started)
seconds = min(seconds)
print(json.dumps({"rows": len(dataset), "seconds": seconds, "peak_kib": after - before}))
"""


def measure_in_fresh_process(times: int) -> dict:
    """A fresh process per size, so peak RSS growth belongs to this size alone."""
    from bench_settings import DATASET_CSV

    output = subprocess.run([sys.executable, "-c", _MEASURE, str(DATASET_CSV), str(times)],
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_tokenization_scales_linearly(benchmark):
    sizes = [1, SCALE // 10, SCALE] if not SHORT else [1, SCALE]
    measured = benchmark.pedantic(lambda: [measure_in_fresh_process(t) for t in sizes],
                                  rounds=1)
    per_row_us = [m["seconds"] / m["rows"] * 1e6 for m in measured]
    per_row_bytes = [m["peak_kib"] * 1024 / m["rows"] for m in measured]
    benchmark.extra_info["sizes"] = measured
    RESULTS[f"tokenize scaling (rows {', '.join(str(m['rows']) for m in measured)})"] = {
        **{f"us/row @{m['rows']}": us for m, us in zip(measured, per_row_us, strict=True)},
        **{f"peak bytes/row @{m['rows']}": b
           for m, b in zip(measured[1:], per_row_bytes[1:], strict=True)},
    }
    # Linear: the largest size costs no more per row than 2x the smaller ones.
    assert per_row_us[-1] < 2 * min(per_row_us)
