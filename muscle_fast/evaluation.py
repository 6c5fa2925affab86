"""Rows in, labels out: the one way every part of the package tokenises and scores a text set.

Training (dev selection), the backdoor metrics (CACC / ASR) and the Fourier tracker all read rows
through ``as_rows`` and predict through ``predict``, so a number in a report means the same thing
wherever it was computed.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import TRAIN_DEFAULTS
from .distributed import unwrap_model

#: One labelled text: (text, class index).
Row = tuple[str, int]

__all__ = ["Row", "accuracy", "as_rows", "encode", "predict"]


def as_rows(rows: Sequence[Any], what: str) -> list[Row]:
    """Accept (text, label) pairs or dicts with text/sentence and label; ``what`` names the set in errors."""
    if isinstance(rows, (str, bytes)):
        raise ValueError(f"{what}: expected a sequence of rows, got a string: {rows[:60]!r}")
    out: list[Row] = []
    for i, r in enumerate(rows):
        if isinstance(r, Mapping):
            text = r.get("text", r.get("sentence"))
            label = r.get("label")
        elif not isinstance(r, (str, bytes)) and hasattr(r, "__getitem__") and _len(r) == 2:
            # a tuple, a list, a row of a numpy object array
            text, label = r[0], r[1]
        else:
            text = label = None
        if hasattr(label, "item") and getattr(label, "ndim", None) == 0:  # a 0-d tensor or array
            label = label.item()
        # a float label (0.7) would truncate, a bool pass as 0/1: a label is an integer class index
        integral = isinstance(label, numbers.Integral) or (
            isinstance(label, numbers.Real) and float(label).is_integer()
        )
        if not isinstance(text, str) or isinstance(label, bool) or not integral:
            raise ValueError(
                f"{what}: row {i} must be (text, integer label) or a dict with text/sentence and label, "
                f"got {r!r}"
            )
        out.append((text, int(label)))
    return out


def _len(r: Any) -> int | None:
    try:
        return len(r)
    except TypeError:
        return None


def encode(
    tokenizer: Any, rows: Sequence[Row], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A padded model batch of ``rows`` on ``device``, labels included (the loss needs them)."""
    enc = tokenizer(
        [t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {k: v.to(device) for k, v in enc.items()}
    batch["labels"] = torch.tensor([lab for _, lab in rows], dtype=torch.long, device=device)
    return batch


@torch.no_grad()
def _logits(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int,
    max_length: int,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """[rows, labels] fp32 CPU logits (eval mode for the call, the previous mode restored)."""
    core = unwrap_model(model)
    was = core.training
    core.eval()
    device = next(core.parameters()).device
    out: torch.Tensor | None = None
    try:
        for idx in _length_batches(tokenizer, rows, batch_size, max_length):
            batch = encode(tokenizer, [rows[j] for j in idx], max_length, device)
            batch.pop("labels")
            logits = core(**batch).logits.float().cpu()
            if out is None:
                out = logits.new_empty((len(rows), logits.shape[-1]))
            out[idx] = logits
            if on_batch is not None:
                on_batch(len(idx))
    finally:
        core.train(was)
    return out if out is not None else torch.empty(0, 0)


def _length_batches(tokenizer: Any, rows: Sequence[Row], batch_size: int, max_length: int) -> list[list[int]]:
    """Row indices in batches of similar token length: each batch is padded to its longest row, so
    sorting by length skips most padding. A row's batch mates reach its logits only through its
    padding: the float summation order, and for a model with absolute positions padded on the left,
    its positions (less padding, closer to the row alone)."""
    enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
    mask = enc.get("attention_mask")
    lengths = [int(sum(m)) for m in mask] if mask is not None else [len(ids) for ids in enc["input_ids"]]
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int = TRAIN_DEFAULTS.eval_batch_size,
    max_length: int = TRAIN_DEFAULTS.max_length,
    *,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Predicted labels for ``rows`` (eval mode for the call, the previous mode restored).

    ``on_batch(n)`` is called after each batch of ``n`` rows (a progress bar's ``update``). The
    batches depend on all of ``rows``: pass a whole set for the numbers every evaluation reports."""
    if not rows:
        return torch.empty(0, dtype=torch.long)
    return _logits(model, tokenizer, rows, batch_size, max_length, on_batch).argmax(-1)


def predict_proba(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int = TRAIN_DEFAULTS.eval_batch_size,
    max_length: int = TRAIN_DEFAULTS.max_length,
) -> torch.Tensor:
    """[rows, labels] fp32 class probabilities for ``rows`` (eval mode for the call)."""
    if not rows:
        raise ValueError("predict_proba: empty set of rows")
    return torch.softmax(_logits(model, tokenizer, rows, batch_size, max_length), dim=-1)


def accuracy(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int = TRAIN_DEFAULTS.eval_batch_size,
    max_length: int = TRAIN_DEFAULTS.max_length,
) -> float:
    """Share of rows predicted as their label (on a poisoned set labelled with the target: the ASR)."""
    if not rows:
        raise ValueError("accuracy: empty evaluation set")
    pred = predict(model, tokenizer, rows, batch_size, max_length)
    gold = torch.tensor([lab for _, lab in rows])
    return float((pred == gold).float().mean())
