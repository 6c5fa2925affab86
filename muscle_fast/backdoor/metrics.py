"""CACC and ASR (SPEC §5), from predictions or from a model on a ``BackdoorDataset``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import TRAIN_DEFAULTS
from ..evaluation import Row, predict
from .dataset import BackdoorDataset


def _as_list(x: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def clean_accuracy(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """CACC: share of clean samples predicted as their label."""
    p, y = _as_list(preds), _as_list(labels)
    if len(p) != len(y):
        raise ValueError(f"clean_accuracy: {len(p)} predictions for {len(y)} labels")
    if not p:
        raise ValueError("clean_accuracy: no samples")
    return sum(a == b for a, b in zip(p, y, strict=True)) / len(p)


def attack_success_rate(
    preds: Sequence[int] | torch.Tensor,
    target: int,
    orig_labels: Sequence[int | None] | torch.Tensor | None = None,
) -> float:
    """ASR: share of triggered non-target samples classified as ``target``.

    With ``orig_labels`` (the labels before the trigger was applied) samples whose original
    label already is the target are left out: predicting the target there is no success.
    ``None`` entries mean unknown (OpenBackdoor files hold only non-target rows) and count.
    """
    p = _as_list(preds)
    if orig_labels is not None:
        orig = orig_labels.tolist() if isinstance(orig_labels, torch.Tensor) else list(orig_labels)
        if len(orig) != len(p):
            raise ValueError(f"attack_success_rate: {len(p)} predictions for {len(orig)} original labels")
        p = [a for a, o in zip(p, orig, strict=True) if o is None or int(o) != target]
    if not p:
        raise ValueError("attack_success_rate: no triggered non-target samples")
    return sum(a == target for a in p) / len(p)


def evaluate_backdoor(
    model: torch.nn.Module,
    tokenizer: Any,
    ds: BackdoorDataset,
    batch_size: int = TRAIN_DEFAULTS.eval_batch_size,
    max_length: int = TRAIN_DEFAULTS.max_length,
    splits: tuple[str, str] = ("test_clean", "test_poison"),
) -> dict[str, float]:
    """``{"cacc", "asr"}`` of ``model`` on the clean and poisoned splits named in ``splits``."""
    clean: list[Row] = ds.split(splits[0])
    poison: list[Row] = ds.split(splits[1])
    pc = predict(model, tokenizer, clean, batch_size, max_length)
    pp = predict(model, tokenizer, poison, batch_size, max_length)
    return {
        "cacc": clean_accuracy(pc, [lab for _, lab in clean]),
        "asr": attack_success_rate(pp, ds.target_label),
    }
