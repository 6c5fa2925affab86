"""``muscle-fast scan``: the lexical-trigger scan (:mod:`muscle_fast.backdoor.scan`) of each attack's
training file against the reference rows ``defend`` would draw, without training anything.

Where the data says which training rows are poisoned (OpenBackdoor's poison-label column, or rows
poisoned here), the report also says how many of them the scan flags and how many clean rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backdoor.scan import ScanResult, scan_ngrams
from ..config import DEFAULT_SEED
from ..errors import ConfigError
from .data import load_sets, reference_indices


@dataclass
class ScanReport:
    """One (dataset, attack): the scan's result and, with known poison flags, what it caught."""

    dataset: str
    attack: str
    ref_rows: int
    result: ScanResult
    poison_rows: int
    poison_flagged: int
    clean_flagged: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "attack": self.attack,
            "ref_rows": self.ref_rows,
            **self.result.summary(),
            "poison_rows": self.poison_rows,
            "poison_flagged": self.poison_flagged,
            "clean_flagged": self.clean_flagged,
        }


def scan_data(
    data_dir: str | Path | None,
    attacks: str | None = None,
    *,
    ref_samples: int = 600,
    seed: int = DEFAULT_SEED,
    alpha: float = 1e-3,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    max_train_rows: int | None = None,
) -> list[ScanReport]:
    """Scan every attack's training rows against ``ref_samples`` dev-clean rows drawn as ``defend``
    draws its reference set for ``seed``."""
    if ref_samples < 1:
        raise ConfigError(f"scan: ref_samples (--ref-samples) must be >= 1, got {ref_samples!r}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"scan: alpha (--alpha) must be in (0, 1), got {alpha!r}")
    reports = []
    sets = load_sets(
        data_dir,
        attacks,
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        max_train_rows=max_train_rows,
        seed=seed,
    )
    for ds in sets:
        ref = [ds.dev_clean[i] for i in reference_indices(len(ds.dev_clean), ref_samples, seed)]
        res = scan_ngrams(ds.train, ref, alpha=alpha)
        flags = ds.train_poison_flags
        caught = sum(1 for f, p in zip(res.flagged, flags, strict=True) if f and p)
        reports.append(
            ScanReport(ds.dataset, ds.attack, len(ref), res, sum(flags), caught, sum(res.flagged) - caught)
        )
    return reports
