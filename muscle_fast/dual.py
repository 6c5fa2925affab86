"""Training and reference gradients of one step (SPEC §4), in one backward pass where possible.

Samples do not interact inside a transformer, so a single forward/backward over
[training batch; reference batch] with loss = loss_train + loss_ref gives, at
every MuScleLinear, the output-gradient rows of each batch separately. The
grouped weight-gradient path of the low-rank backward splits the reduction by
row group, so the training gradient g lands in ``p.grad`` and the reference
gradient c comes back separately: both from one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MuScleLinear
from .ops.lowrank import split_rows

logger = logging.getLogger("muscle_fast")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PAD_ZERO = ("attention_mask", "token_type_ids")
_warned_two_pass: set[int] = set()


def default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The models' own single-label classification loss: mean cross-entropy."""
    return F.cross_entropy(logits.float(), labels)


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _single_pass_ok(model: nn.Module, params: Sequence[nn.Parameter]) -> bool:
    """Every trainable parameter is an adapter weight of a MuScleLinear (so its grad can be split)."""
    adapter = {id(m.lora_A) for m in model.modules() if isinstance(m, MuScleLinear)}
    adapter |= {id(m.lora_B) for m in model.modules() if isinstance(m, MuScleLinear)}
    return all(id(p) in adapter for p in params)


def _check_labels(labels: torch.Tensor, num_labels: int | None, what: str) -> None:
    if labels.numel() == 0:
        raise ValueError(f"dual_gradients: the {what} batch is empty")
    if num_labels is not None and labels.dtype in (torch.int64, torch.int32):
        used = labels[labels != -100]  # -100: a row left out of the loss (transformers' ignore index)
        lo, hi = (int(used.min()), int(used.max())) if used.numel() else (0, 0)
        if lo < 0 or hi >= num_labels:
            raise ValueError(
                f"dual_gradients: {what} labels must be in [0, {num_labels}), got values in [{lo}, {hi}]"
            )


def pad_cat(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], pad_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate two tokenized batches along the batch dim, right-padding to a common length."""
    if set(a) != set(b):
        raise ValueError(f"dual_gradients: batch keys {sorted(a)} differ from reference keys {sorted(b)}")
    out = {}
    for k in a:
        x, y = a[k], b[k]
        if x.dim() >= 2 and x.shape[1] != y.shape[1]:
            n = max(x.shape[1], y.shape[1])
            fill = 0 if k in _PAD_ZERO else (-100 if k == "labels" else pad_id)
            x = F.pad(x, (0, n - x.shape[1]), value=fill)
            y = F.pad(y, (0, n - y.shape[1]), value=fill)
        out[k] = torch.cat([x, y], dim=0)
    return out


def _forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def dual_gradients(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    ref_batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn | None = None,
    params: Sequence[nn.Parameter] | None = None,
    single_pass: bool | None = None,
    accumulate: bool = False,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Training loss, reference loss and reference gradients; ``p.grad`` becomes the training gradient.

    ``batch`` and ``ref_batch`` are tokenizer outputs plus ``labels``. The losses are
    returned detached (as device tensors: no host sync). Single pass is used when every
    trainable parameter lives in a MuScleLinear; otherwise (or with single_pass=False) two
    passes, the second a plain backward whose ``p.grad`` is taken as the reference gradient
    (``torch.autograd.grad`` would miss, and pollute ``p.grad`` with, the gradients of
    parameters inside reentrant activation checkpoints). ``accumulate`` adds to ``p.grad``
    instead of overwriting it (gradient accumulation). ``loss_scale`` multiplies both losses
    before backward (both gradients scale with it; the returned losses do not): a data-parallel
    rank's share of an unevenly split global batch. The model's train/eval mode is left as it is.
    """
    loss_fn = loss_fn or default_loss
    params = list(params) if params is not None else trainable_params(model)
    if not params:
        raise ValueError("dual_gradients: the model has no trainable parameters")
    if "labels" not in batch or "labels" not in ref_batch:
        raise ValueError("dual_gradients: both batches need 'labels'")
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    num_labels = getattr(getattr(core, "config", None), "num_labels", None)
    _check_labels(batch["labels"], num_labels, "training")
    _check_labels(ref_batch["labels"], num_labels, "reference")
    possible = _single_pass_ok(model, params)
    if single_pass is None:
        single_pass = possible
        if not possible and id(model) not in _warned_two_pass:
            _warned_two_pass.add(id(model))
            logger.info(
                "muscle_fast: some trainable parameters are outside MuScleLinear modules; gradient "
                "alignment uses two passes"
            )
    elif single_pass and not possible:
        raise ValueError(
            "dual_gradients: single_pass=True needs every trainable parameter inside a MuScleLinear"
        )
    if not accumulate:
        for p in params:
            p.grad = None
    if single_pass:
        return _single_pass(model, core, batch, ref_batch, loss_fn, params, loss_scale)
    return _two_pass(model, batch, ref_batch, loss_fn, params, loss_scale)


def _two_pass(model, batch, ref_batch, loss_fn, params, scale):
    loss = loss_fn(_forward_logits(model, batch), batch["labels"])
    (loss * scale).backward()
    # copies: under DDP with gradient_as_bucket_view=True, p.grad is a view of the reducer's bucket,
    # into which the reference backward below writes c
    train_grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    try:
        ref_loss = loss_fn(_forward_logits(model, ref_batch), ref_batch["labels"])
        (ref_loss * scale).backward()  # under DDP this also averages c over ranks, as g was
        ref_grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, train_grads, strict=True):
            p.grad = g
    return loss.detach(), ref_loss.detach(), ref_grads


def _single_pass(model, core, batch, ref_batch, loss_fn, params, scale):
    pad_id = getattr(getattr(core, "config", None), "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    both = pad_cat(batch, ref_batch, pad_id)
    n_train = batch["labels"].shape[0]
    sink: dict[int, list[torch.Tensor]] = {}

    def collect(module: nn.Module, dA: torch.Tensor, dB: torch.Tensor) -> None:
        got = sink.get(id(module))
        if got is None:
            sink[id(module)] = [dA, dB]
        else:  # a module applied twice in one forward
            got[0] = got[0] + dA
            got[1] = got[1] + dB

    with split_rows(n_train, collect, total=both["labels"].shape[0]):
        logits = _forward_logits(model, both)
        loss = loss_fn(logits[:n_train], both["labels"][:n_train])
        ref_loss = loss_fn(logits[n_train:], both["labels"][n_train:])
        ((loss + ref_loss) * scale).backward()
    by_param: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, MuScleLinear) and id(m) in sink:
            dA, dB = sink[id(m)]
            by_param[id(m.lora_A)] = dA.to(m.lora_A.dtype)
            by_param[id(m.lora_B)] = dB.to(m.lora_B.dtype)
    ref_grads = [by_param.get(id(p)) for p in params]
    return loss.detach(), ref_loss.detach(), ref_grads
