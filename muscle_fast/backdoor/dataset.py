"""The structure every backdoor data source is loaded into, and the error bad data raises.

It sits below both the file loaders (``data``) and the built-in poisoners (``poison``), so
either can build a ``BackdoorDataset`` without importing the other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import DEFAULT_SEED
from ..errors import MuscleFastError
from ..evaluation import Row

__all__ = ["SETTINGS", "SPLITS", "BackdoorDataset", "DataError", "Row", "infer_num_labels"]

#: The five splits of the evaluation protocol.
SPLITS = ("train", "dev_clean", "dev_poison", "test_clean", "test_poison")
#: Poisoning settings: clean-label (only target rows), mix (any rows), dirty (only non-target rows).
SETTINGS = ("clean", "mix", "dirty")


class DataError(MuscleFastError, ValueError):
    """Bad input data: the message names the folder, file or column at fault."""


def infer_num_labels(train: list[Row], train_where: str, evals: list[list[Row]], target: int) -> int:
    """The class count the evaluation splits define: their largest label + 1 (at least 2, and the
    target's). A training label outside it is an error naming the row: one stray label (a ``7`` in
    binary data) would otherwise grow the classifier head silently."""
    n = max(2, target + 1, *(lab + 1 for rows in evals for _, lab in rows))
    for i, (_, lab) in enumerate(train):
        if not 0 <= lab < n:
            raise DataError(
                f"{train_where}: row {i + 1} has label {lab}, which is not a class of the dev/test splits "
                f"([0, {n})); fix the row, or pass num_labels (--num-labels) if the data has more classes"
            )
    return n


@dataclass
class BackdoorDataset:
    """One attack on one dataset: the five splits as (text, label) rows plus per-row poison flags.

    ``dev_poison`` / ``test_poison`` hold only triggered rows whose original label is not the
    target, labelled with the target, so their accuracy is the attack success rate.
    """

    dataset: str
    attack: str
    target_label: int
    num_labels: int
    train: list[Row]
    dev_clean: list[Row]
    dev_poison: list[Row]
    test_clean: list[Row]
    test_poison: list[Row]
    poison_flags: dict[str, list[bool]] = field(default_factory=dict)
    setting: str | None = None
    rate: float | None = None
    source: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # split -> file it came from (for errors)
    #: loaded to evaluate a checkpoint: the training file was not read and ``train`` may be empty
    eval_only: bool = False
    #: per dev-poison row, the index in ``dev_clean`` of the clean sentence it was made from (None:
    #: unknown or subsampled away); None when the source gives no reliable pairing. ``defend`` uses it
    #: to keep the twins of its reference rows out of the dev ASR (SPEC §5).
    dev_poison_source: list[int | None] | None = None

    def __post_init__(self) -> None:
        for name in SPLITS:
            rows = getattr(self, name)
            flags = self.poison_flags.setdefault(name, [name.endswith("_poison")] * len(rows))
            if len(flags) != len(rows):
                raise DataError(f"{self._where(name)}: {len(flags)} poison flags for {len(rows)} rows")
        src = self.dev_poison_source
        if src is not None and len(src) != len(self.dev_poison):
            raise DataError(
                f"{self._where('dev_poison')}: {len(src)} source indices for {len(self.dev_poison)} rows"
            )

    def _where(self, split: str) -> str:
        return self.sources.get(split) or f"{self.dataset}/{self.attack} split {split!r}"

    def split(self, name: str) -> list[Row]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; splits: {list(SPLITS)}")
        return getattr(self, name)

    @property
    def train_poison_flags(self) -> list[bool]:
        return self.poison_flags["train"]

    def validate(self) -> BackdoorDataset:
        """Reject empty splits (an eval-only ``train`` aside) and labels outside [0, num_labels)."""
        if not 0 <= self.target_label < self.num_labels:
            raise DataError(
                f"{self.dataset}/{self.attack}: target label {self.target_label} is outside the "
                f"{self.num_labels} classes [0, {self.num_labels})"
            )
        for name in SPLITS:
            rows = getattr(self, name)
            if not rows and not (name == "train" and self.eval_only):
                raise DataError(f"{self._where(name)}: split {name!r} is empty")
            bad = sorted({lab for _, lab in rows if not 0 <= lab < self.num_labels})
            if bad:
                raise DataError(
                    f"{self._where(name)}: labels {bad[:5]} are outside the {self.num_labels} classes "
                    f"[0, {self.num_labels})"
                )
        return self

    def summary(self) -> dict[str, Any]:
        """Row counts per split and the number of poisoned training rows (for logs and results)."""
        out: dict[str, Any] = {name: len(getattr(self, name)) for name in SPLITS}
        out["train_poisoned"] = sum(self.train_poison_flags)
        return out

    def subsample(
        self, max_train_rows: int | None = None, max_eval_rows: int | None = None, seed: int = DEFAULT_SEED
    ) -> BackdoorDataset:
        """A seeded random subset for smoke runs; the training subset keeps the poison share.

        Each split has its own generator, so the evaluation subsets do not depend on
        ``max_train_rows`` (a later ``eval`` with the same seed sees the same rows).
        """
        for name, v in (("max_train_rows", max_train_rows), ("max_eval_rows", max_eval_rows)):
            if v is not None and v < 1:
                raise DataError(f"{name} must be >= 1, got {v}")
        changes: dict[str, Any] = {}
        flags = dict(self.poison_flags)
        if max_train_rows is not None and max_train_rows < len(self.train):
            rng = random.Random(f"{seed}:train")
            poisoned = [i for i, f in enumerate(self.train_poison_flags) if f]
            clean = [i for i, f in enumerate(self.train_poison_flags) if not f]
            n_p = round(max_train_rows * len(poisoned) / len(self.train))
            keep = sorted(rng.sample(poisoned, n_p) + rng.sample(clean, max_train_rows - n_p))
            changes["train"] = [self.train[i] for i in keep]
            flags["train"] = [self.train_poison_flags[i] for i in keep]
        kept: dict[str, list[int]] = {}
        if max_eval_rows is not None:
            for name in SPLITS[1:]:
                rows = getattr(self, name)
                if max_eval_rows < len(rows):
                    keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)), max_eval_rows))
                    kept[name] = keep
                    changes[name] = [rows[i] for i in keep]
                    flags[name] = [self.poison_flags[name][i] for i in keep]
        src = self.dev_poison_source
        if src is not None and kept:  # the pairing follows both subsets (a twin sampled away: None)
            clean_at = {old: new for new, old in enumerate(kept.get("dev_clean", range(len(self.dev_clean))))}
            rows_kept = kept.get("dev_poison", range(len(src)))
            changes["dev_poison_source"] = [
                clean_at.get(src[i]) if src[i] is not None else None for i in rows_kept
            ]
        return replace(self, poison_flags=flags, **changes)
