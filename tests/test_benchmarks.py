"""The GPU run's benchmarks must not fail there for a CPU-visible reason: their code paths run here on
tiny shapes (no timing claims), and the memory estimate they record is checked against its parts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _estimator():
    path = ROOT / "benchmarks" / "estimate_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_estimate_counts_the_reference_batch():
    est = _estimator()
    for seq in (512, 2048):
        for ckpt in (False, True):
            muscle = est.components(1, seq, ckpt)  # reference batch = training batch
            lora = est.components(1, seq, ckpt, ref_batch=0)
            assert muscle["activations"] == pytest.approx(2 * lora["activations"])
            assert muscle["weights"] == lora["weights"] and muscle["dequant_buffer"] == lora["dequant_buffer"]
            parts = [v for k, v in muscle.items() if k != "total"]
            assert muscle["total"] == pytest.approx(sum(parts))
    # the 4-bit Llama-2-7B weights: ~6.5e9 linear params at 4 bits + double-quantized absmax + bf16 rest
    assert 3.2 < est.components(1, 512, False)["weights"] / 2**30 < 3.5


@pytest.mark.slow
def test_gpu_benchmarks_run_on_cpu():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("pytest_benchmark")
    files = ["benchmarks/bench_memory.py", "benchmarks/bench_qlora.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable"]
    res = subprocess.run(cmd + files, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
