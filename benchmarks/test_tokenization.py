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
import json, sys, time
import pandas as pd
from medlm.data import LanguageDataset, load_disease_data
from medlm.offline import gpt2_tokenizer

def status_kib(field):
    with open("/proc/self/status") as status:
        return int(status.read().split(field + ":")[1].split()[0])

tokenizer = gpt2_tokenizer()
frame = load_disease_data(sys.argv[1]).frame
frame = pd.concat([frame] * int(sys.argv[2]), ignore_index=True)
tokenizer(["warm up"])
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
before = status_kib("VmRSS")
dataset = LanguageDataset(frame, tokenizer)
peak_kib = status_kib("VmHWM") - before
seconds = []
for _ in range(3):
    started = time.perf_counter()
    LanguageDataset(frame, tokenizer)
    seconds.append(time.perf_counter() - started)
print(json.dumps({"rows": len(dataset), "seconds": min(seconds), "peak_kib": peak_kib}))
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
    benchmark.extra_info["peak_bytes_per_row"] = per_row_bytes
    benchmark.extra_info["sizes"] = measured
    RESULTS[f"tokenize scaling (rows {', '.join(str(m['rows']) for m in measured)})"] = {
        **{f"us/row @{m['rows']}": us for m, us in zip(measured, per_row_us, strict=True)},
        **{f"peak KiB/row @{m['rows']}": b / 1024
           for m, b in zip(measured, per_row_bytes, strict=True)},
    }
    # Linear: the largest size costs no more per row, in time or in peak memory, than 2x the
    # smaller ones (peak memory at the smallest size is within page-size noise, so not used).
    assert per_row_us[-1] < 2 * min(per_row_us)
    assert per_row_bytes[-1] < 2 * per_row_bytes[-2]
