"""``muscle-fast scan``: the lexical-trigger scan (:mod:`muscle_fast.backdoor.scan`) of each attack's
training file against the reference rows ``defend`` would draw for ``lora+filter``, without
training anything.

Where the data says which training rows are poisoned (OpenBackdoor's poison-label column, or rows
poisoned here), the report also says how many of them the scan flags and how many clean rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backdoor.scan import ScanResult, scan_ngrams
from ..errors import ConfigError
from .data import _spec_sets, reference_indices
from .loading import BaseModels, resolve_model_name
from .presets import effective_hparams, preset_for, resolve_seed
from .spec import RunSpec

#: The method whose reference rows and scan level ``scan`` uses: the one that scans in ``defend``.
SCAN_METHOD = "lora+filter"


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


def scan_data(spec: RunSpec, alpha: float | None = None) -> list[ScanReport]:
    """Scan every attack's training rows against the reference rows ``defend`` draws for
    ``lora+filter`` with the same spec (model, preset, seed, ``ref_samples``), at ``alpha`` (None:
    that method's ``scan_alpha``). The model's config is read (not its weights): it picks the
    built-in preset and the family's reference-set size."""
    from types import SimpleNamespace

    if spec.ref_samples is not None and spec.ref_samples < 1:
        raise ConfigError(f"scan: ref_samples (--ref-samples) must be >= 1, got {spec.ref_samples!r}")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ConfigError(f"scan: alpha (--alpha) must be in (0, 1), got {alpha!r}")
    preset = preset_for(spec)
    seed = resolve_seed(spec, preset)
    sets = _spec_sets(spec, seed)
    config = BaseModels(resolve_model_name(spec.model), seed).config()
    hp = effective_hparams(SimpleNamespace(config=config), SCAN_METHOD, preset, spec)
    level = alpha if alpha is not None else hp.get("scan_alpha", 0.0)
    if not level:
        raise ConfigError(f"scan: the preset turns {SCAN_METHOD}'s scan off (scan_alpha 0); pass --alpha")
    reports = []
    for ds in sets:
        ref = [ds.dev_clean[i] for i in reference_indices(len(ds.dev_clean), hp["ref_samples"], seed)]
        res = scan_ngrams(ds.train, ref, alpha=level)
        flags = ds.train_poison_flags
        caught = sum(1 for f, p in zip(res.flagged, flags, strict=True) if f and p)
        reports.append(
            ScanReport(ds.dataset, ds.attack, len(ref), res, sum(flags), caught, sum(res.flagged) - caught)
        )
    return reports
