"""The rows a run sees: the checked, subsampled (dataset, attack) sets, the seeded reference /
model-selection split of dev-clean, the dev-poison rows the dev ASR is measured on, and the rows
each method trains on."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEED
from ..errors import ConfigError
from .spec import METHODS, RunSpec


def reference_indices(n_dev: int, n: int, seed: int) -> list[int]:
    """The dev-clean indices of the reference rows, seeded (what :func:`reference_split` takes)."""
    return random.Random(f"{seed}:ref").sample(range(n_dev), min(n, n_dev))


def reference_split(dev_clean: Sequence[Any], n: int, seed: int, disjoint: bool) -> tuple[list, list]:
    """(reference rows, model-selection rows) from dev-clean, seeded.

    Gradient alignment trains the adapters along the reference gradient, so dev accuracy
    measured on the reference rows themselves is inflated. ``disjoint`` keeps them out of model selection; the
    paper's protocol (selection on all of dev-clean) is ``disjoint=False``.
    """
    idx = reference_indices(len(dev_clean), n, seed)
    ref = [dev_clean[i] for i in idx]
    if not disjoint:
        return ref, list(dev_clean)
    taken = set(idx)
    select = [r for i, r in enumerate(dev_clean) if i not in taken]
    if not select:
        raise ConfigError(
            f"ref_samples={n} takes all {len(dev_clean)} dev-clean rows and leaves "
            "none for model selection; use fewer reference rows or --ref-overlap"
        )
    return ref, select


def selection_dev_poison(ds: Any, ref_idx: Collection[int]) -> tuple[list[Any], int]:
    """(dev-poison rows the dev ASR is measured on, how many were left out as reference twins).

    dev-poison holds triggered copies of dev-clean sentences and the reference rows are dev-clean
    sentences: a model trained along the reference rows has seen the clean twin of some dev-poison
    rows, which biases the dev ASR. Rows whose source (``ds.dev_poison_source``) is a reference row
    are dropped; with no known pairing every row stays (the loader says so)."""
    src = getattr(ds, "dev_poison_source", None)
    if src is None or not ref_idx:
        return list(ds.dev_poison), 0
    taken = set(ref_idx)
    keep = [r for r, i in zip(ds.dev_poison, src, strict=True) if i is None or i not in taken]
    if not keep:
        raise ConfigError(
            f"{ds.dataset}/{ds.attack}: the {len(taken)} reference rows are the clean twins of every "
            f"dev-poison row, leaving none for the dev ASR; use fewer reference rows (--ref-samples)"
        )
    return keep, len(ds.dev_poison) - len(keep)


def load_sets(
    data_dir: str | Path | None,
    attacks: str | Sequence[str] | None = None,
    *,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    max_train_rows: int | None = None,
    max_eval_rows: int | None = None,
    seed: int = DEFAULT_SEED,
    need_train: bool = True,
) -> list[Any]:
    """The checked (dataset, attack) sets a run trains or evaluates on, subsampled as asked (seeded);
    ``need_train=False`` (evaluation) does not require or read a training file."""
    from ..backdoor.data import load_backdoor_sets

    sets = load_backdoor_sets(
        data_dir,
        attacks=attacks,
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        seed=seed,
        need_train=need_train,
    )
    return [ds.subsample(max_train_rows, max_eval_rows, seed).validate() for ds in sets]


def _spec_sets(spec: RunSpec, seed: int) -> list[Any]:
    return load_sets(
        spec.data_dir,
        spec.attacks,
        setting=spec.poison_setting,
        rate=spec.poison_rate,
        target_label=spec.target_label,
        num_labels=spec.num_labels,
        max_train_rows=spec.max_train_rows,
        max_eval_rows=spec.max_eval_rows,
        seed=seed,
    )


def training_rows(ds: Any, method: str, reference: list[Any]) -> list[Any]:
    """The rows ``method`` trains on: the training file, its unpoisoned rows, or the reference rows."""
    on = METHODS[method].train_on
    if on == "clean":
        rows = [r for r, f in zip(ds.train, ds.train_poison_flags, strict=True) if not f]
        if not rows:
            raise ConfigError(f"{ds.dataset}/{ds.attack}: every training row is poisoned; oracle has none")
        return rows
    if on == "reference":
        return list(reference)
    return list(ds.train)
