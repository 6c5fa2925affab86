"""Two DDP ranks (gloo, CPU) with batch B equal one process with batch 2B, alignment included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_train.py")


def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(single), "8"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(multi),
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert len(a) == len(b) > 0
    moved = 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
        moved += 1
    assert moved == len(a)
