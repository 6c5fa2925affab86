"""Pure-PyTorch twins of the low-rank kernels in ``csrc_triton/lowrank.py``.

Same signatures and semantics as the Triton launchers, so the autograd
function is backend-agnostic. They accumulate in place (``addmm_``) and skip
M x N temporaries: this is also the fast CPU path. fp16 is the exception: its
range (65504) cannot hold the low-rank intermediates or the weight-gradient sums
the kernels keep in fp32, so fp16 operands are upcast and results rounded once.
"""

from __future__ import annotations

import torch


def dropout_mask(m: int, k: int, p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """Keep-mask of the torch path, regenerated from ``seed`` in backward (never saved)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand((m, k), generator=gen, device=device) >= p


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p <= 0.0:
        return x
    mask = dropout_mask(x.shape[0], x.shape[1], p, seed, x.device)
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))


def _groups(m: int, row_split: int | None) -> list[slice]:
    if row_split is None:
        return [slice(0, m)]
    if not 0 <= row_split <= m:
        raise ValueError(f"row_split={row_split} outside [0, {m}]")
    return [slice(0, row_split), slice(row_split, m)]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp16 -> fp32 (fp16's range overflows where the kernels' fp32 accumulators do not); else as is."""
    return t.float() if t.dtype == torch.float16 else t


def _grouped_tn(a: torch.Tensor, b: torch.Tensor, groups: list[slice]) -> torch.Tensor:
    """out[g] = a[rows_g]^T @ b[rows_g] in float32, (G, a.shape[1], b.shape[1]); fp32 writes in place."""
    a, b = _wide(a), _wide(b)
    out = torch.empty((len(groups), a.shape[1], b.shape[1]), dtype=torch.float32, device=a.device)
    for g, rows in enumerate(groups):
        if a.dtype == torch.float32:
            torch.mm(a[rows].t(), b[rows], out=out[g])
        else:
            out[g].copy_(a[rows].t() @ b[rows])
    return out


def lowrank_shrink(
    x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """S = (drop(x) @ A^T) * scale, float32 (M, R)."""
    xd = _wide(_dropped(x, dropout_p, seed))
    s = xd @ A.to(xd.dtype).t()
    return s.float().mul_(scale)


def lowrank_expand_(y: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y += S @ B^T in place."""
    if y.dtype == torch.float32:
        return y.addmm_(S, B.float().t())
    if y.dtype == torch.float16:
        return y.copy_(y.float().addmm_(S, B.float().t()))  # one rounding, as the kernel does
    return y.addmm_(S.to(y.dtype), B.to(y.dtype).t())


def fused_linear_lowrank(
    x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, S: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """y = x @ W^T + bias + S @ B^T."""
    y = x @ W.t() if bias is None else torch.addmm(bias.to(x.dtype), x, W.t())
    return lowrank_expand_(y, S, B)


def lowrank_backward_dS_dB(
    dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *, row_split: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = (dY @ B) * scale (M, R) and dB = dY^T @ S per row group, (G, N, R), both float32."""
    dY = _wide(dY)
    dS = (dY @ B.to(dY.dtype)).float().mul_(scale)
    groups = _groups(dY.shape[0], row_split)
    return dS, _grouped_tn(dY, S.to(dY.dtype), groups)


def lowrank_grad_A(
    dS: torch.Tensor, x: torch.Tensor, *, row_split: int | None = None, dropout_p: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """dA = dS^T @ drop(x) per row group, (G, R, K) float32."""
    xd = _wide(_dropped(x, dropout_p, seed))
    groups = _groups(x.shape[0], row_split)
    return _grouped_tn(dS.to(xd.dtype), xd, groups)


def lowrank_dx_(
    dX: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """dX += drop'(dS @ A) in place."""
    if dropout_p <= 0.0:
        if dX.dtype == torch.float32:
            return dX.addmm_(dS, A.float())
        if dX.dtype == torch.float16:
            return dX.copy_(dX.float().addmm_(dS, A.float()))
        return dX.addmm_(dS.to(dX.dtype), A.to(dX.dtype))
    if dX.dtype == torch.float16:
        return dX.copy_(dX.float().add_(_dropped(dS @ A.float(), dropout_p, seed)))
    return dX.add_(_dropped((dS @ A.float()).to(dX.dtype), dropout_p, seed))
