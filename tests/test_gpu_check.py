"""benchmarks/gpu_check.py on a machine without CUDA: one line, exit 0, nothing heavy loaded
(its checks are rehearsed on a CPU with --rehearse-on-cpu; benchmarks/README.md, GPU check)."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device to check")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, "-X", "importtime", "benchmarks/gpu_check.py"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"gpu_check: no CUDA device (torch {torch.__version__}): nothing to check"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the import lines were read
    assert not imported & {"medlm", "transformers", "mlflow", "pandas"}  # seconds each
