"""Gaussian low-pass filter of the Fourier analysis (SPEC §6): reference, torch path and dispatch.

For inputs x_i (flattened padded embedding outputs) and a width delta,
``G(i, j) = exp(-||x_i - x_j|| / (2 delta))`` normalised over j (plain, not squared, distance).
``G f`` is the low-frequency part of any f over the inputs, ``f - G f`` the high part.

Three implementations of the same G f:

* :func:`gaussian_filter_dense_ref`: float64, materialises the n x n matrix G like the original
  analysis code; test oracle and benchmark baseline (O(n^2) memory: unusable at n = 67k).
* Triton (``csrc_triton/gaussian_filter.py``): one launch for all deltas, streaming over j with an
  online max / normaliser; O(n d + n c) memory.
* :func:`gaussian_filter_torch`: blocks of rows against all points, O(block * n) memory; the CPU path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .dispatch import use_kernels

#: x dtypes the kernel takes (others, float64 included, are cast to fp32 by the launcher).
_KERNEL_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["check_deltas", "gaussian_filter", "gaussian_filter_dense_ref", "gaussian_filter_torch"]

#: Elements of one (rows x n) distance block of the chunked torch path (64 MiB of fp32).
_TORCH_BLOCK_ELEMS = 1 << 24
_FP32_MAX = float(torch.finfo(torch.float32).max)

Deltas = float | Sequence[float] | torch.Tensor


def check_deltas(deltas: Deltas) -> list[float]:
    """Deltas as a list of floats; ValueError naming the first bad one."""
    if isinstance(deltas, torch.Tensor):
        vals = [float(v) for v in deltas.detach().reshape(-1).tolist()]
    elif isinstance(deltas, (int, float)):
        vals = [float(deltas)]
    else:
        vals = [float(v) for v in deltas]
    if not vals:
        raise ValueError("deltas must hold at least one width")
    for i, v in enumerate(vals):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"deltas[{i}] = {v!r}: every delta must be a positive finite number")
    return vals


def check_inputs(x: torch.Tensor, f: torch.Tensor, deltas: Deltas) -> list[float]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (n, d), got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(f, torch.Tensor) or f.dim() != 2:
        raise ValueError(f"f must be a 2-D tensor (n, c), got shape {tuple(getattr(f, 'shape', ()))}")
    if f.shape[0] != x.shape[0]:
        raise ValueError(f"x and f must have the same number of rows, got {x.shape[0]} and {f.shape[0]}")
    if not x.is_floating_point() or not f.is_floating_point():
        raise TypeError(f"x and f must be floating point, got {x.dtype} and {f.dtype}")
    if x.device != f.device:
        raise ValueError(f"x and f must be on the same device, got {x.device} and {f.device}")
    return check_deltas(deltas)


_BITS = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}
_HASH_PRIMES = (2147483647, 2147483629)  # two primes < 2**31: products of residues fit int64


def _row_ids(x: torch.Tensor) -> torch.Tensor:
    """int64 id per row of x, equal for bit-identical rows, so duplicates get distance exactly 0.

    The fast paths form squared distances as ``|a|^2 + |b|^2 - 2 a.b``; whether that cancels to
    exactly 0 for two copies of a point depends on the dot's rounding order (BLAS and GPU kernels
    may pick different algorithms per shape). A random linear hash of the bit patterns modulo two
    primes decides it instead: distinct rows share an id with probability ~2**-62. O(n d) integer
    work in row chunks (O(chunk) extra memory).
    """
    n, d = x.shape
    if x.dtype not in _BITS:
        x = x.to(torch.float32)
    x = x.contiguous()
    gen = torch.Generator().manual_seed(0x5EED)
    ids = torch.zeros(n, dtype=torch.int64, device=x.device)
    if n == 0 or d == 0:
        return ids
    weights = [torch.randint(1, p, (d,), generator=gen).to(x.device) for p in _HASH_PRIMES]
    rows = max(1, (1 << 22) // d)
    for s0 in range(0, n, rows):
        bits = x[s0 : s0 + rows].view(_BITS[x.dtype]).to(torch.int64)
        h = torch.zeros(bits.shape[0], dtype=torch.int64, device=x.device)
        for p, w in zip(_HASH_PRIMES, weights, strict=True):
            # residues < 2**31, products < 2**62, row sums < 2**62 for d < 2**31: no overflow
            h = h * (1 << 31) + (bits.remainder(p) * w).remainder_(p).sum(1).remainder_(p)
        ids[s0 : s0 + rows] = h
    return ids


def gaussian_filter_torch(
    x: torch.Tensor, f: torch.Tensor, deltas: list[float], block_rows: int | None = None
) -> torch.Tensor:
    """Chunked torch G f: blocks of rows against all points, never n x n.

    Same numerics as the kernel: fp32 Gram expansion of the centred points, norms from the diagonal
    of a block matmul, exact zeros for bit-identical rows (``_row_ids``), normalised
    ``exp(-dist / (2 delta))``.
    """
    n, c = x.shape[0], f.shape[1]
    out = torch.empty(len(deltas), n, c, dtype=torch.float32, device=x.device)
    if n == 0 or c == 0:
        return out
    ids = _row_ids(x)
    xf = x.to(torch.float32)
    xc = xf - xf.mean(0)  # distances unchanged; cancellation in |a|^2 + |b|^2 - 2ab reduced
    f32 = f.to(torch.float32)
    B = block_rows or max(1, min(n, _TORCH_BLOCK_ELEMS // n))
    sq = torch.empty(n, dtype=torch.float32, device=x.device)
    for s0 in range(0, n, B):
        xb = xc[s0 : s0 + B]
        sq[s0 : s0 + B] = torch.diagonal(xb @ xb.T)
    scales = [min(1.0 / (2.0 * v), _FP32_MAX) for v in deltas]
    f1 = torch.cat([f32, f32.new_ones(n, 1)], dim=1)  # the last column sums the weights
    for s0 in range(0, n, B):
        xb = xc[s0 : s0 + B]
        d2 = (xb @ xc.T).mul_(-2.0).add_(sq[s0 : s0 + B, None]).add_(sq[None, :]).clamp_(min=0.0)
        d2.masked_fill_(ids[s0 : s0 + B, None] == ids[None, :], 0.0)  # the diagonal and exact duplicates
        dist = d2.sqrt_()
        w = torch.empty_like(dist)
        for k, s in enumerate(scales):
            # Every row holds its own distance 0, so its largest log-weight is exactly 0: exp cannot
            # overflow and the denominator is >= 1 (no max subtraction needed, unlike the kernel's
            # running max over blocks that may not contain the row itself).
            r = torch.mul(dist, -s, out=w).exp_() @ f1
            out[k, s0 : s0 + B] = r[:, :c] / r[:, c:]
    return out


def gaussian_filter(
    x: torch.Tensor,
    f: torch.Tensor,
    deltas: Deltas,
    *,
    backend: str = "auto",
    center: bool | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Low-frequency part ``G f`` for every width in ``deltas``: a (len(deltas), n, c) fp32 tensor.

    ``x`` (n, d) points (fp32 or bf16/fp16; accumulation is fp32), ``f`` (n, c) values.
    ``G(i, j) = exp(-||x_i - x_j|| / (2 delta))`` normalised over j. Memory is O(n d + n c) on the
    Triton path and O(block_rows * n) on the torch path; the n x n matrix is never formed.

    ``backend`` as everywhere (``muscle_fast.ops.dispatch``): ``"auto"`` runs the kernel on CUDA
    (x in any float dtype: the kernel upcasts float64 to fp32), the chunked torch path elsewhere.
    ``center`` (Triton only): subtract the mean of x in-kernel; default for fp32 inputs only, so
    that 16-bit inputs keep the tensor-core dot. ``block_rows``: row block of the torch path.
    """
    vals = check_inputs(x, f, deltas)
    if use_kernels(backend, x.device, (x.dtype,), op="gaussian_filter", supported=_KERNEL_X_DTYPES):
        from csrc_triton.gaussian_filter import gaussian_filter_triton  # lazy: TRITON_INTERPRET

        return gaussian_filter_triton(x, f, vals, center=center, row_ids=_row_ids(x))
    return gaussian_filter_torch(x, f, vals, block_rows)


def gaussian_filter_dense_ref(
    x: torch.Tensor, f: torch.Tensor, deltas: Deltas, *, exact: bool = True
) -> torch.Tensor:
    """float64 G f with G materialised (n x n), the way the original analysis code did it.

    The row normalisation is a softmax of ``-dist / (2 delta)`` (the same G, but no 0/0 when every
    off-diagonal weight underflows). ``exact``: distances from coordinate differences (duplicate
    points at distance exactly 0; O(n^2 d) without BLAS: for tests); otherwise from the float64
    Gram expansion of the centred points (BLAS, for the benchmark). Returns float64.
    """
    vals = check_inputs(x, f, deltas)
    n, d = x.shape
    x64, f64 = x.to(torch.float64), f.to(torch.float64)
    if n == 0 or d == 0:
        dist = x64.new_zeros(n, n)
    elif exact:
        dist = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    else:
        xc = x64 - x64.mean(0)
        dist = torch.cdist(xc, xc, compute_mode="use_mm_for_euclid_dist")
    return torch.stack([torch.softmax(dist * (-0.5 / v), dim=1) @ f64 for v in vals])
