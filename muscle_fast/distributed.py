"""torch.distributed helpers, each a no-op on one process, so single-GPU code needs no branches.

Under DDP each rank takes a share of every global batch (``rank_share``) and the reference
gradients are averaged across ranks (``average_across_ranks``) before alignment, which makes N
ranks with batch B equal one process with batch N*B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_across_ranks", "rank_share", "unwrap_model", "world"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise).

    Evaluation, hooks and attribute lookups need the plain model: DDP's forward would take part
    in gradient synchronisation, and the wrapper hides the model's own attributes.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rank_share(idx: Sequence[int], rank: int, nranks: int) -> tuple[list[int], float]:
    """This rank's rows of a global batch and the factor its mean loss is scaled by.

    Rows are dealt round-robin. DDP (and ``average_across_ranks``) take the plain mean of the
    ranks' gradients, which is the mean over the global batch only if every rank has as many
    rows; the last batch of an epoch need not split evenly, so each rank's loss is scaled by
    ``nranks * (its rows / all rows)``. A rank left with no row still has to take part in the
    collectives: it runs the batch's first row with scale 0.
    """
    if nranks == 1:
        return list(idx), 1.0
    mine = list(idx[rank::nranks])
    if not mine:
        return [idx[0]], 0.0
    return mine, nranks * len(mine) / len(idx)


def average_across_ranks(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Mean of each tensor over ranks, in one all-reduce of a flat buffer (no-op on one process)."""
    _, n = world()
    if n == 1:
        return list(tensors)
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).float() for t in present])
    dist.all_reduce(flat)
    flat /= n
    out: list[torch.Tensor | None] = []
    off = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[off : off + t.numel()].view_as(t).to(t.dtype))
        off += t.numel()
    return out
