"""benchmarks/defense_sweep.py: the stage-2 choice reads dev numbers only, never test numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "defense_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "defense_sweep.py"
)
sweep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep  # dataclasses resolve annotations through sys.modules
spec.loader.exec_module(sweep)


def _job(name: str, dev_cacc: float, dev_asr: float, cacc: float, asr: float, method: str = "muscle"):
    j = sweep.Job(name, "badnets", method, {}, 1, status="ok")
    j.records = [dict(dev_cacc=dev_cacc, dev_asr=dev_asr, cacc=cacc, asr=asr)]
    return j


def test_select_top_uses_dev_only() -> None:
    jobs = [
        _job("feasible-lower-cacc", 0.80, 0.05, cacc=0.99, asr=0.0),  # best on test: must not matter
        _job("feasible-best", 0.85, 0.09, cacc=0.10, asr=0.9),
        _job("infeasible-low-asr", 0.90, 0.12, cacc=0.5, asr=0.5),
        _job("infeasible-high-asr", 0.95, 0.80, cacc=0.5, asr=0.5),
        _job("baseline", 0.99, 0.0, cacc=0.99, asr=0.0, method="vanilla"),
    ]
    jobs.append(sweep.Job("failed", "badnets", "muscle", {}, 1, status="failed rc=1"))
    jobs.append(_job("ablation", 0.99, 0.0, cacc=0.99, asr=0.0, method="lora+ga"))
    names = [j.name for j in sweep.select_top(jobs, 3, max_dev_asr=0.10)]
    assert names == ["feasible-best", "feasible-lower-cacc", "infeasible-low-asr"]


def test_summary_keeps_the_teacher_and_scan_records() -> None:
    """A run with TrainConfig.teacher_epochs / scan_alpha carries what they relabelled and dropped."""
    base = dict(best_epoch=2, epochs=3, curves={}, wall_seconds=1.0, dataset="sst-2")
    plain, taught = _job("plain", 0.8, 0.1, 0.8, 0.1), _job("taught", 0.8, 0.1, 0.8, 0.1)
    plain.records[0].update(base)
    scan = {"flagged": 4, "poison_dropped": 4, "clean_dropped": 0}
    taught.records[0].update(base, teacher={"relabeled": 3, "dropped": 1, "rows": 10}, scan=scan)
    rows = sweep._summary([plain, taught])
    assert "teacher" not in rows[0] and "scan" not in rows[0]
    assert rows[1]["teacher"] == {"relabeled": 3, "dropped": 1, "rows": 10} and rows[1]["scan"] == scan
    assert rows[1]["cacc"] == 0.8 and rows[1]["best_epoch"] == 2
