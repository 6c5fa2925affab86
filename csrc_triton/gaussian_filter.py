"""Streaming Gaussian smoothing for the Fourier analysis (SPEC section 6), several widths per launch.

``out[k, i] = sum_j w_kij f_j / sum_j w_kij`` with ``w_kij = exp(-||x_i - x_j|| / (2 delta_k))``.
The n x n weight matrix is never formed: memory is O(n d + n c).

Design
------
* **One program per block of ``BLOCK`` rows i**, streaming over blocks of ``BLOCK`` columns j.
  For each (i, j) tile the dot products ``x_i . x_j`` are accumulated over d in chunks of
  ``BLOCK_D`` with ``tl.dot`` (d is large: the paper flattens padded embedding outputs,
  e.g. 64 x 384 = 24576), then ``dist = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i . x_j, 0))``.
  The distance tile is shared by every delta: only the exp / accumulate work is per delta.
* **Online normalisation (flash-attention style)** per delta with log-weights ``-dist * s_k``
  (``s_k = 1 / (2 delta_k)``): running max ``m``, denominator ``den`` and accumulator ``acc``
  (rescaled by ``exp(m_old - m_new)``): the weights are only ever exponentiated relative to the
  largest one seen, so a tiny delta (weights far below fp32's range) cannot underflow to 0/0
  (the exact-zero diagonal also keeps the final denominator >= 1) and a block whose weights all
  overflow to -inf log-weight leaves the state untouched instead of producing NaN.
  Per-delta state lives in 2-D tensors padded to ``NDP`` deltas (a power of two): ``m, den``
  are (BLOCK, NDP), ``acc`` is (BLOCK, NDP * CP) with column ``k * CP + c``; delta k's slice is
  read and written with ``tl.where`` selects. The delta loop is a runtime loop over the constexpr
  ``ND`` (unrolled it spills registers at 8 deltas); the ``C`` value columns (constexpr, small)
  are unrolled, each weighted sum being a row reduction of the weight tile: a ``tl.dot`` with
  C <= 8 columns would run on the FMA units in fp32 anyway and its operand layouts cost far more
  registers (checked with ptxas for sm_90).
* **Squared norms** come from a pre-pass that runs the *same* ``tl.dot`` (same tile shape, same
  d-chunking and order) on a row block against itself and keeps the diagonal, so a row's norm
  matches its dot product with any bit-identical row as closely as the hardware allows. On top of
  that, pairs with equal ``row_ids`` (the diagonal; with ``muscle_fast.analysis``'s row hash, every
  pair of bit-identical rows) get distance exactly 0, independent of the dot's rounding order.
* **Precision.** fp32 inputs are centred in-kernel (``x - mean(x)``, the mean computed by the
  launcher in fp32; distances are unchanged, the cancellation in the expansion is reduced from
  ``eps * |x|^2`` to ``eps * |x - mean|^2``) and use ``input_precision="ieee"`` (tf32 would cost
  ~1e-3 relative in the dot, far too much for a difference of large numbers). 16-bit inputs are not
  centred by default so that the dot stays on the tensor cores: bf16/fp16 products are exact in fp32
  and accumulation is fp32, so the only extra error is the cancellation ``~eps_fp32 * |x|^2`` in the
  squared distance (negligible unless the common offset of the points dwarfs their spread; pass
  ``center=True`` then, which runs an fp32 IEEE dot on the centred values). The weighted sums are
  fp32 reductions. Output is fp32.
* Under Triton's interpreter bf16 ``tl.dot`` is broken, so ``UPCAST`` (``_common.upcast_dot``)
  casts those operands to fp32 there (exact).

More than ``MAX_DELTAS`` deltas, or more value columns than fit ``MAX_COLS`` accumulator columns,
are split over several launches (each recomputes the distances).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import configs
from ._common import check_device, launch_guard, upcast_dot

__all__ = ["MAX_COLS", "MAX_DELTAS", "gaussian_filter_triton"]

#: Deltas handled by one launch (the per-delta state is padded to a power of two).
MAX_DELTAS = 8
#: Accumulator columns (padded deltas x padded value columns) per launch: bounds registers and the
#: unrolled per-column reductions.
MAX_COLS = 64
_FP32_MAX = float(torch.finfo(torch.float32).max)


@triton.jit
def _load_tile(x_ptr, mu_ptr, rows, rmask, offs_d, dmask, stride_x, CENTER: tl.constexpr, TC: tl.constexpr):
    """Rows ``rows`` x columns ``offs_d`` of x as a dot operand (zeros outside the masks)."""
    m = rmask[:, None] & dmask[None, :]
    t = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_d[None, :], mask=m, other=0.0)
    if CENTER:
        mu = tl.load(mu_ptr + offs_d, mask=dmask, other=0.0)
        t = tl.where(m, t.to(tl.float32) - mu[None, :], 0.0)
    if TC:
        t = t  # 16-bit values straight to the tensor cores
    else:
        t = t.to(tl.float32)
    return t


@triton.jit
def _gram(acc, a, bt, TC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ bt`` in fp32: tensor-core dot for 16-bit operands, IEEE fp32 dot otherwise."""
    if TC:
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bt, acc)
    else:
        acc = tl.dot(a, bt, acc, input_precision="ieee")
    return acc


@triton.jit
def _sqnorm_kernel(
    x_ptr,
    mu_ptr,
    sq_ptr,
    n,
    d,
    stride_x,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CENTER: tl.constexpr,
    TC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``sq[i] = x_i . x_i`` as the diagonal of the same tile dot the main kernel runs."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    g = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        a = _load_tile(x_ptr, mu_ptr, rows, rmask, offs_d, dmask, stride_x, CENTER, TC)
        g = _gram(g, a, tl.trans(a), TC, UPCAST)
    r = tl.arange(0, BLOCK)
    sq = tl.sum(tl.where(r[:, None] == r[None, :], g, 0.0), 1)
    tl.store(sq_ptr + rows, sq, mask=rmask)


@triton.jit
def _gauss_filter_kernel(
    x_ptr,
    mu_ptr,
    sq_ptr,
    ids_ptr,
    f_ptr,
    s_ptr,
    out_ptr,
    n,
    d,
    stride_x,
    stride_f,
    stride_ok,
    stride_oi,
    ND: tl.constexpr,
    NDP: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CENTER: tl.constexpr,
    TC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of rows i, all ``ND`` deltas, streaming over all j (see the module docstring)."""
    NQ: tl.constexpr = NDP * CP
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    sq_i = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    id_i = tl.load(ids_ptr + rows, mask=rmask, other=-1)
    kcol = tl.arange(0, NDP)[None, :]  # delta index of the (BLOCK, NDP) state
    q = tl.arange(0, NQ)[None, :]  # accumulator column k * CP + c
    m = tl.full((BLOCK, NDP), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK, NDP), dtype=tl.float32)
    acc = tl.zeros((BLOCK, NQ), dtype=tl.float32)
    for j0 in range(0, n, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        cmask = cols < n
        s = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < d
            a = _load_tile(x_ptr, mu_ptr, rows, rmask, offs_d, dmask, stride_x, CENTER, TC)
            b = _load_tile(x_ptr, mu_ptr, cols, cmask, offs_d, dmask, stride_x, CENTER, TC)
            s = _gram(s, a, tl.trans(b), TC, UPCAST)
        sq_j = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
        d2 = tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * s, 0.0)
        id_j = tl.load(ids_ptr + cols, mask=cmask, other=-2)
        d2 = tl.where(id_i[:, None] == id_j[None, :], 0.0, d2)  # the diagonal, and exact duplicates
        dist = tl.sqrt(d2)
        fptr = f_ptr + cols.to(tl.int64) * stride_f
        for kd in range(ND):
            sk = tl.load(s_ptr + kd)
            logw = tl.where(cmask[None, :], -dist * sk, float("-inf"))
            sel = kcol == kd
            m_old = tl.max(tl.where(sel, m, float("-inf")), 1)
            m_new = tl.maximum(m_old, tl.max(logw, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all weights 0 so far: no NaN
            alpha = tl.exp(m_old - m_ref)
            p = tl.exp(logw - m_ref[:, None])
            l_old = tl.sum(tl.where(sel, den, 0.0), 1)
            den = tl.where(sel, (l_old * alpha + tl.sum(p, 1))[:, None], den)
            m = tl.where(sel, m_new[:, None], m)
            # Weighted sums as row reductions of the weight tile, one per value column (C is small):
            # a tl.dot here would run on the FMA units anyway (fp32) and its operand layouts cost
            # far more registers than these reductions.
            acc = acc * tl.where((q >= kd * CP) & (q < kd * CP + CP), alpha[:, None], 1.0)
            for cc in tl.static_range(C):
                fc = tl.load(fptr + cc, mask=cmask, other=0.0)
                v = tl.sum(p * fc[None, :], 1)
                acc = tl.where(q == kd * CP + cc, acc + v[:, None], acc)
    lq = tl.full((BLOCK, NQ), 1.0, tl.float32)
    for kd in tl.static_range(ND):
        l_k = tl.sum(tl.where(kcol == kd, den, 0.0), 1)
        l_k = tl.where(l_k > 0.0, l_k, 1.0)  # only padding rows (i >= n) can have no weight at all
        lq = tl.where((q >= kd * CP) & (q < kd * CP + CP), l_k[:, None], lq)
    qk = q // CP
    qc = q % CP
    optrs = out_ptr + qk * stride_ok + rows.to(tl.int64)[:, None] * stride_oi + qc
    omask = rmask[:, None] & (qk < ND) & (qc < C)
    tl.store(optrs, acc / lq, mask=omask)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _config(
    x: torch.Tensor, center: bool | None, block: int | None, block_d: int | None, num_warps: int | None
) -> tuple[bool, bool, int, int, int]:
    """(CENTER, TC, BLOCK, BLOCK_D, num_warps) for this input; unset sizes from ``configs``.

    Larger tiles read x fewer times, while small n needs more programs to fill the GPU: the config
    table picks by row count. The per-delta loop is a runtime loop (unrolled, it spills at 8 deltas).
    """
    sixteen = x.dtype in (torch.bfloat16, torch.float16)
    center = (not sixteen) if center is None else bool(center)
    tc = sixteen and not center
    cfg = configs.launch_config("gaussian_filter", rows=x.shape[0], tc=int(tc))
    block = cfg["BLOCK"] if block is None else block
    block_d = cfg["BLOCK_D"] if block_d is None else block_d
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    for name, v in (("block", block), ("block_d", block_d)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
    return center, tc, block, block_d, num_warps


def _prepare_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: fp32/bf16/fp16 with unit stride along d, never an empty buffer."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.to(torch.float32)
    if x.shape[1] == 0:  # no coordinates: all distances 0, as with one zero coordinate
        x = x.new_zeros(x.shape[0], 1)
    if (x.stride(1) != 1 and x.shape[1] > 1) or (x.stride(0) == 0 and x.shape[0] > 1):
        x = x.contiguous()  # an expanded row (stride 0) would be read with the launch's row stride 1
    return x


@launch_guard("x")
def gaussian_filter_triton(
    x: torch.Tensor,
    f: torch.Tensor,
    deltas: Sequence[float],
    *,
    center: bool | None = None,
    block: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(deltas), n, c) fp32 row-normalised Gaussian smoothing of ``f`` over the points ``x``.

    ``x`` (n, d) fp32/bf16/fp16 (other floats are cast to fp32), ``f`` (n, c) any float dtype,
    ``deltas`` validated positive finite floats (see ``muscle_fast.analysis.gaussian_filter``).
    ``center``: subtract the mean of x inside the kernel (default: for fp32 only, see the module
    docstring). ``block`` / ``block_d``: tile sizes (powers of two >= 16; tests shrink them).
    ``row_ids``: optional int64 (n,) ids, equal for bit-identical rows: those pairs get distance
    exactly 0 whatever the dot's rounding (default: each row its own id, only i == j).
    """
    check_device(x, f)
    x = _prepare_x(x)
    n, d = x.shape
    c = f.shape[1]
    nd = len(deltas)
    out = torch.empty(nd, n, c, dtype=torch.float32, device=x.device)
    if n == 0 or c == 0:
        return out
    CENTER, TC, BLOCK, BLOCK_D, num_warps = _config(x, center, block, block_d, num_warps)
    UPCAST = upcast_dot(x.dtype)
    mu = x.mean(0, dtype=torch.float32) if CENTER else x.new_zeros(1, dtype=torch.float32)
    sq = torch.empty(n, dtype=torch.float32, device=x.device)
    if row_ids is None:
        ids = torch.arange(n, dtype=torch.int64, device=x.device)
    else:
        ids = row_ids.to(device=x.device, dtype=torch.int64).contiguous()
    grid = (triton.cdiv(n, BLOCK),)
    stride_x = max(x.stride(0), 1)
    _sqnorm_kernel[grid](
        x,
        mu,
        sq,
        n,
        d,
        stride_x,
        BLOCK=BLOCK,
        BLOCK_D=BLOCK_D,
        CENTER=CENTER,
        TC=TC,
        UPCAST=UPCAST,
        num_warps=num_warps,
    )
    f32 = f.to(torch.float32).contiguous()
    # 1 / (2 delta) in float64, clamped so that 0 * s stays 0 for subnormal deltas.
    scales = [min(1.0 / (2.0 * float(v)), _FP32_MAX) for v in deltas]
    for k0 in range(0, nd, MAX_DELTAS):
        ks = scales[k0 : k0 + MAX_DELTAS]
        ND = len(ks)
        NDP = _pow2(ND)
        cg = max(1, min(c, MAX_COLS // NDP))  # value columns per launch
        s_t = torch.tensor(ks, dtype=torch.float32).to(x.device)
        for c0 in range(0, c, cg):
            C = min(cg, c - c0)
            o = out[k0 : k0 + ND, :, c0 : c0 + C]
            _gauss_filter_kernel[grid](
                x, mu, sq, ids, f32[:, c0 : c0 + C], s_t, o,
                n, d, stride_x, f32.stride(0), o.stride(0), o.stride(1),
                ND=ND, NDP=NDP, C=C, CP=_pow2(C), BLOCK=BLOCK, BLOCK_D=BLOCK_D,
                CENTER=CENTER, TC=TC, UPCAST=UPCAST, num_warps=num_warps,
            )  # fmt: skip
    return out
