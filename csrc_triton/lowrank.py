"""Triton kernels for the multi-scale low-rank linear (SPEC section 2).

Notation: x (M, K) input rows, A (R, K), B (N, R), ``scale`` (R,) float32 (= s * kvec, already
multiplied), W (N, K) frozen base weight. R = n * r is small (1..64): it is held in one constexpr
block ``BLOCK_R`` padded to a power of two >= 16 (``tl.dot`` needs every dim >= 16), padding masked.

Forward:   S = (drop(x) @ A.T) * scale                (lowrank_shrink, fp32)
           y = y0 + S @ B.T                            (lowrank_expand_)
Backward:  dS = (dY @ B) * scale,  dB = dY.T @ S       (lowrank_backward_dS_dB, one pass over dY)
           dA = dS.T @ drop(x)                         (lowrank_grad_A)
           dX += drop'(dS @ A)                         (lowrank_dx_)

Precision. Every product is accumulated in fp32. Two kinds of dots occur:

* storage x storage (x @ A.T, dY @ B, x @ W.T): both operands in the same 16-bit dtype use the
  tensor-core dot; anything else (fp32, or two different dtypes) is cast to fp32 and uses
  ``input_precision="ieee"`` so results match torch's fp32 matmul (not tf32).
* fp32 intermediate x storage (S @ B.T, S.T @ dY, dS.T @ x, dS @ A): the fp32 operand is split into
  ``hi + lo`` bf16 parts and two tensor-core dots are summed (three when the storage operand is fp16,
  which is then split exactly into two bf16 parts, avoiding fp16 overflow of S). The error is
  ~2**-17 relative per product instead of 2**-9 if S were rounded to bf16, and it stays on the tensor
  cores: an fp32 IEEE dot runs on the FMA units and would make the backward (R = 64) compute-bound.
  With an fp32 storage operand the IEEE fp32 dot is used. The backward launchers also take S and dS
  already rounded to the storage dtype (``backend="auto"`` rounds them for its cuBLAS products anyway):
  then S.T @ dY and dS.T @ x are single tensor-core dots. dB is then the exact gradient of the forward
  that multiplied B with the rounded S; dA has the 2**-9 relative error per product of the torch path.

Under Triton's CPU interpreter bf16 ``tl.dot`` is broken, so the ``UPCAST`` flag
(``_common.upcast_dot``) casts bf16 dot operands to fp32 there only (exact).

Dropout. The keep-mask of element (row, col) of the logical (M, K) matrix x is
``tl.rand(seed, row * K + col) >= p`` (int64 offsets from the logical index, never from memory
strides), so keep probability is 1 - p and the same seed gives the same mask in shrink, grad_A and
dx_. Kept values are scaled by 1 / (1 - p), applied in fp32 to the accumulator (exact zeroing of x,
no rounding of a scaled x). The mask is never materialised (``dropout_mask`` does, for tests).

Reductions over many rows or columns are split across programs when there would otherwise be too
few programs to fill the GPU (``_split_count``); split partial sums go through fp32 ``atomic_add``
into a zero-initialised output (so those outputs are deterministic only up to fp32 summation order),
with ``sem="relaxed"``: a sum needs no ordering, and Triton's default (acq_rel) makes each add a
returning ``atom`` with acquire/release semantics instead of a fire-and-forget ``red``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import _common, configs
from ._common import block_r as _block_r
from ._common import check_device, launch_guard, upcast_dot

__all__ = [
    "dropout_mask",
    "launch_backward_dS_dB",
    "launch_dx_",
    "launch_expand_",
    "launch_grad_A",
    "launch_shrink",
    "lowrank_backward_dS_dB",
    "lowrank_dx_",
    "lowrank_expand_",
    "lowrank_grad_A",
    "lowrank_shrink",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Programs per launch wanted before a reduction is split across programs. Small under the interpreter
# so that the tests exercise both the split (atomic) and the unsplit (plain store) paths.
_INTERPRET_TARGET_PROGRAMS = 8

# Width of the reduction steps of fp32 dots. Those run on the FMA units with both operands held whole
# in registers per thread, so a 64-deep reduction spills (``tests/test_compile_sm90.py``): the kernels
# reduce CHUNK at a time instead (the minimum of tl.dot; below the interpreter's 32-wide tiles too, so
# the tests take the chunk loops more than once).
_CHUNK = 16


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv costs ~1.5 us a call on the host; launches make several)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """Host-side next power of two, as triton.next_power_of_2 (0 for 0) without its host cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _split_count(t: torch.Tensor, programs: int, max_split: int) -> int:
    """Power-of-two split of a reduction so that ``programs * split`` fills the GPU (about 2 waves).

    Powers of two bound the number of compiled variants (the split is a constexpr)."""
    if t.device.type == "cuda":
        target = 2 * _common.sm_count(t.device.index if t.device.index is not None else 0)
    else:
        target = _INTERPRET_TARGET_PROGRAMS
    want = min(_cdiv(target, max(programs, 1)), max(max_split, 1))
    return 1 << (want.bit_length() - 1)


def _alloc(
    shape: tuple[int, ...],
    device: torch.device,
    kernel: str,
    dims: tuple[int, ...],
    split: Callable[[dict], int],
) -> torch.Tensor:
    """The fp32 output of a reduction kernel: zero-filled only where one of the kernel's configs in force
    would split the reduction (``split(config) > 1``: partial sums are atomically added); otherwise
    every element is stored once and the memset (a launch on CUDA) is skipped. The autotuner zeroes it
    (``reset_to_zero``) between the configs it times. The answer is cached per kernel, ``dims`` (the
    sizes ``split`` reads) and device."""
    key = (kernel, dims, device, configs.mode())
    zero = _NEEDS_ZERO.get(key)
    if zero is None:
        zero = any(split(c) > 1 for c in configs.configs(kernel))
        if len(_NEEDS_ZERO) >= 4096:
            _NEEDS_ZERO.clear()
        _NEEDS_ZERO[key] = zero
    return (torch.zeros if zero else torch.empty)(shape, dtype=torch.float32, device=device)


_NEEDS_ZERO: dict[tuple, bool] = {}


# Widest R block for which the backward's dB takes a 16-bit S in one tensor-core dot. At 64 the dot's
# (BLOCK_N, 64) fp32 tile spills in the 4-warp configs (tests/compile_sm90.py): a 16-bit S goes through
# the fp32 split path there, loaded as fp32 (its lo part is zero: the same sums).
_S16_MAX_BLOCK_R = 32


_SPLIT_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _split_mode(dtype: torch.dtype) -> int:
    """How ``fp32 intermediate @ operand-of-this-dtype`` is computed (see ``_dot_split``)."""
    return _SPLIT_MODES[dtype]


def _split_upcast(dtype: torch.dtype) -> bool:
    return _split_mode(dtype) != 0 and upcast_dot(torch.bfloat16)


def _plain_f32(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether a storage x storage dot must run in fp32 (IEEE) rather than on 16-bit tensor cores."""
    return a != b or a == torch.float32 or upcast_dot(a, b)


def _dropout_args(dropout_p: float, seed: int) -> tuple[bool, float, float, int]:
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    inv_keep = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return p > 0.0, p, inv_keep, int(seed) % (1 << 63)


def _check_float(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"expected a float32/float16/bfloat16 tensor, got {t.dtype}")


def _check_2d(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({rows}, {cols})")


def _check_intermediate(name: str, t: torch.Tensor, operand: torch.Tensor) -> None:
    """S and dS enter the backward dots as fp32 (hi + lo split) or already rounded to the big operand's
    dtype (one tensor-core dot); a third dtype has no kernel path."""
    if t.dtype not in (torch.float32, operand.dtype):
        raise TypeError(f"{name} must be float32 or {operand.dtype} (the operand's dtype), got {t.dtype}")


def _check_split(row_split: int | None, M: int) -> tuple[int, int]:
    """(m1, G): rows [0, m1) form group 0 and [m1, M) group 1; without a split m1 = M and G = 1."""
    if row_split is None:
        return M, 1
    m1 = int(row_split)
    if not 0 <= m1 <= M:
        raise ValueError(f"row_split must be in [0, {M}], got {row_split}")
    return m1, 2


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, rows, cols, K, p):
    """Dropout keep-mask of the logical elements (rows x cols) of an (M, K) matrix: rand >= p."""
    offs = rows[:, None] * K + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def _dot_tc(acc, a, b, UPCAST: tl.constexpr):
    """acc += a @ b on 16-bit tensor cores; fp32 (exact) under the interpreter, whose bf16 dot is broken."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_plain(acc, a, b, F32: tl.constexpr):
    """acc += a @ b for two storage operands: native 16-bit dot, or IEEE fp32 when F32."""
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _hi_lo(v):
    """An fp32 ``v`` as ``hi + lo``, both bf16 (exact to about 2**-17 of v)."""
    hi = v.to(tl.bfloat16)
    return hi, (v - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot_split(acc, a, b, MODE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b for an fp32 intermediate ``a`` (S or dS) and ``b`` in its storage dtype.

    MODE 0 (b fp32): IEEE fp32 dot. MODE 1 (b bf16): a = a_hi + a_lo in bf16, two tensor-core dots.
    MODE 2 (b fp16): b is split exactly into two bf16 parts too (fp16 a_hi could overflow), three dots.
    """
    if MODE == 0:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        a_hi, a_lo = _hi_lo(a)
        if MODE == 1:
            acc = _dot_tc(acc, a_lo, b, UPCAST)
            acc = _dot_tc(acc, a_hi, b, UPCAST)
        else:
            b_hi, b_lo = _hi_lo(b.to(tl.float32))
            acc = _dot_tc(acc, a_lo, b_hi, UPCAST)
            acc = _dot_tc(acc, a_hi, b_lo, UPCAST)
            acc = _dot_tc(acc, a_hi, b_hi, UPCAST)
    return acc


@triton.jit
def _dot_split_b(acc, a, b, MODE: tl.constexpr, UPCAST: tl.constexpr):
    """``_dot_split`` with the fp32 intermediate as ``b``: for products whose wide dim is a's rows
    (the MMA's M side)."""
    if MODE == 0:
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision="ieee")
    else:
        b_hi, b_lo = _hi_lo(b)
        if MODE == 1:
            acc = _dot_tc(acc, a, b_lo, UPCAST)
            acc = _dot_tc(acc, a, b_hi, UPCAST)
        else:
            a_hi, a_lo = _hi_lo(a.to(tl.float32))
            acc = _dot_tc(acc, a_hi, b_lo, UPCAST)
            acc = _dot_tc(acc, a_lo, b_hi, UPCAST)
            acc = _dot_tc(acc, a_hi, b_hi, UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.autotune(configs=configs.triton_configs("lowrank.shrink"), key=["M_BUCKET", "K", "BLOCK_R"],
                 reset_to_zero=["s_ptr"])
@triton.heuristics({"SPLIT_K": lambda a: _split_count(a["x_ptr"], _cdiv(a["M"], a["BLOCK_M"]),
                                                      _cdiv(a["K"], a["BLOCK_K"]))})
@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, scale_ptr, s_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed, p_drop, inv_keep,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DROPOUT: tl.constexpr, F32_DOT: tl.constexpr, CHUNK: tl.constexpr,
):
    """S[rows] = (drop(x[rows]) @ A.T) * scale: each program streams BLOCK_M rows of x once.

    x is the only big operand, so the kernel is a bandwidth-bound stream over x; A (R x K) stays in
    L2. When M is small the K loop is split over SPLIT_K programs that atomically add into S.
    An fp32 dot runs on the FMA units, whose operands sit in registers whole: it steps through K
    ``CHUNK`` columns at a time (``_CHUNK``), or it would spill.
    """
    if F32_DOT:
        STEP: tl.constexpr = CHUNK
    else:
        STEP: tl.constexpr = BLOCK_K
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_mask = rows < M
    r_mask = offs_r < R
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per
    k_stop = tl.minimum(k_start + k_per, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_stop, STEP):
        cols = (k0 + tl.arange(0, STEP)).to(tl.int64)
        k_mask = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, cols, K, p_drop), x, 0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _dot_plain(acc, x, a, F32_DOT)
    sc = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    acc = acc * (sc * inv_keep)[None, :]
    s_ptrs = s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr
    s_mask = row_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(s_ptrs, acc, mask=s_mask)
    else:
        tl.atomic_add(s_ptrs, acc, mask=s_mask, sem="relaxed")


@triton.autotune(configs=configs.triton_configs("lowrank.expand"), key=["M_BUCKET", "N", "BLOCK_R"],
                 restore_value=["y_ptr"])
@triton.jit
def _expand_kernel(
    y_ptr, s_ptr, b_ptr,
    M, N, R, M_BUCKET,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_br, stride_bn,
    seed, p_drop, inv_keep,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
):
    """y[M, N] += drop'(S @ Bt) with Bt (R, N) given by strides (B.T for expand, A for dx).

    One program per (BLOCK_M, BLOCK_N) tile of y: y is read and written once, the sum is formed in fp32
    and rounded once on store; S and Bt are tiny and come from L2. An fp32 dot (FMA units) takes R
    ``CHUNK`` at a time.
    """
    if MODE == 0 or UPCAST:
        STEP: tl.constexpr = CHUNK
    else:
        STEP: tl.constexpr = BLOCK_R
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, STEP):
        offs_r = r0 + tl.arange(0, STEP)
        r_mask = offs_r < R
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                     mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot_split(acc, s, bt, MODE, UPCAST)
    if DROPOUT:
        acc = tl.where(_keep_mask(seed, rows, cols, N, p_drop), acc * inv_keep, 0.0)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y_mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=y_mask)


def _bwd_split(a: dict) -> int:
    m_blocks = _cdiv(a["m1"], a["BLOCK_M"]) + _cdiv(a["M"] - a["m1"], a["BLOCK_M"])
    return _split_count(a["dy_ptr"], m_blocks, _cdiv(a["N"], a["BLOCK_N"]))


@triton.autotune(configs=configs.triton_configs("lowrank.bwd_ds_db"), key=["M_BUCKET", "N", "BLOCK_R"],
                 reset_to_zero=["ds_ptr", "db_ptr"])
@triton.heuristics({"SPLIT_N": _bwd_split})
@triton.jit
def _bwd_ds_db_kernel(
    dy_ptr, b_ptr, s_ptr, scale_ptr, ds_ptr, db_ptr,
    M, N, R, m1, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbg, stride_dbn, stride_dbr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    F32_DOT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
    S16: tl.constexpr,
):
    """One pass over dY: dS = (dY @ B) * scale and dB[g] += dY.T @ S, each dY tile loaded once.

    Program (i, j) owns one BLOCK_M row block and the j-th of SPLIT_N column ranges. Row blocks are laid
    out per group (group 0 = rows [0, m1), group 1 = rows [m1, M), each starting a fresh block), so no
    block straddles m1 and each program adds into a single dB[g] without masking rows by group. dS for
    the block accumulates in registers over its columns (stored, or atomically added when SPLIT_N > 1);
    the dB partial of each (BLOCK_M x BLOCK_N) tile is atomically added in fp32 into the L2-resident
    dB (N x R), which avoids a second pass over dY or an (M/BLOCK_M) x N x R workspace.

    fp32 dots (FMA units) reduce over N (dS) and over the rows (dB): they run on CHUNK x CHUNK
    sub-tiles, the block's rows taken CHUNK at a time, each over all its columns (or they would spill).
    S16: S is already in dY's 16-bit dtype (what the forward multiplied B with): dB.T = dY.T @ S is one
    tensor-core dot with the wide N tile on the MMA's M side, instead of a hi + lo pair of dots with
    BLOCK_R there (up to ``_S16_MAX_BLOCK_R``).
    """
    if F32_DOT or MODE == 0 or UPCAST:
        SUB_M: tl.constexpr = CHUNK
        STEP_N: tl.constexpr = CHUNK
    else:
        SUB_M: tl.constexpr = BLOCK_M
        STEP_N: tl.constexpr = BLOCK_N
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    nb0 = tl.cdiv(m1, BLOCK_M)
    in_g1 = pid_m >= nb0
    row0 = tl.where(in_g1, m1 + (pid_m - nb0) * BLOCK_M, pid_m * BLOCK_M).to(tl.int64)
    row_end = tl.where(in_g1, M, m1)
    g = in_g1.to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    sc = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    n_per = tl.cdiv(tl.cdiv(N, SPLIT_N), BLOCK_N) * BLOCK_N
    n_start = pid_s * n_per
    n_stop = tl.minimum(n_start + n_per, N)
    db_base = db_ptr + g * stride_dbg
    for m0 in range(0, tl.minimum(row_end - row0, BLOCK_M), SUB_M):  # one trip unless SUB_M < BLOCK_M
        rows = row0 + m0 + tl.arange(0, SUB_M)
        row_mask = rows < row_end
        if S16:  # S tile (SUB_M, BLOCK_R): dB.T tile = dY.T @ S, the wide N tile on the MMA's M side
            s_t = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                          mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        else:  # S.T tile (BLOCK_R, SUB_M), split hi + lo: at R 64 the transposed pair of dots spills
            s_t = tl.load(s_ptr + rows[None, :] * stride_sm + offs_r[:, None] * stride_sr,
                          mask=r_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
        ds_acc = tl.zeros((SUB_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(n_start, n_stop, STEP_N):
            cols = (n0 + tl.arange(0, STEP_N)).to(tl.int64)
            col_mask = cols < N
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=col_mask[:, None] & r_mask[None, :], other=0.0)
            ds_acc = _dot_plain(ds_acc, dy, b, F32_DOT)
            if S16:
                db_nr = tl.zeros((STEP_N, BLOCK_R), dtype=tl.float32)
                db_nr = _dot_tc(db_nr, tl.trans(dy), s_t, UPCAST)
                tl.atomic_add(db_base + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db_nr,
                              mask=col_mask[:, None] & r_mask[None, :], sem="relaxed")
            else:
                db_t = tl.zeros((BLOCK_R, STEP_N), dtype=tl.float32)
                db_t = _dot_split(db_t, s_t, dy, MODE, UPCAST)
                tl.atomic_add(db_base + cols[None, :] * stride_dbn + offs_r[:, None] * stride_dbr, db_t,
                              mask=r_mask[:, None] & col_mask[None, :], sem="relaxed")
        ds_acc = ds_acc * sc[None, :]
        ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
        ds_mask = row_mask[:, None] & r_mask[None, :]
        if SPLIT_N == 1:
            tl.store(ds_ptrs, ds_acc, mask=ds_mask)
        else:
            tl.atomic_add(ds_ptrs, ds_acc, mask=ds_mask, sem="relaxed")


def _grad_a_transposed(x_dtype: torch.dtype, block_r: int) -> bool:
    """Whether grad A computes dA.T = x.T @ dS: always, but for fp32 x at BLOCK_R 64, whose FMA dot
    spills that way (tests/compile_sm90.py)."""
    return x_dtype != torch.float32 or block_r <= 32


def _grad_a_split(a: dict) -> int:
    programs = _cdiv(a["K"], a["BLOCK_K"]) * a["G"]
    return _split_count(a["x_ptr"], programs, _cdiv(a["M"], a["BLOCK_M"]))


@triton.autotune(configs=configs.triton_configs("lowrank.grad_a"), key=["M_BUCKET", "K", "BLOCK_R", "G"],
                 reset_to_zero=["da_ptr"])
@triton.heuristics({"SPLIT_M": _grad_a_split})
@triton.jit
def _grad_a_kernel(
    ds_ptr, x_ptr, da_ptr,
    M, K, R, m1, M_BUCKET, G,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dag, stride_dar, stride_dak,
    seed, p_drop, inv_keep,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_M: tl.constexpr,
    DROPOUT: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
    DS16: tl.constexpr, TRANS: tl.constexpr,
):
    """dA[g][:, cols] = sum over the group's rows of dS.T @ drop(x): a reduction over M.

    Program (j, s) owns a BLOCK_K column strip and the (s % SPLIT_M)-th row range of group
    s // SPLIT_M, so x is read once. The (R x BLOCK_K) result is stored, or atomically added when
    the rows are split over SPLIT_M programs (small K would otherwise leave the GPU idle).
    An fp32 dot (FMA units) takes the rows ``CHUNK`` at a time. DS16: dS is already in x's 16-bit
    dtype, one tensor-core dot instead of a hi + lo pair. TRANS (``_grad_a_transposed``): the tile is
    dA.T = x.T @ dS, so the MMA's M side is BLOCK_K (Hopper's warpgroup MMA; with BLOCK_R = 16 there
    the compiler falls back to the older warp-level MMA).
    """
    if MODE == 0 or UPCAST:
        STEP: tl.constexpr = CHUNK
    else:
        STEP: tl.constexpr = BLOCK_M
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = pid_s // SPLIT_M
    part = pid_s % SPLIT_M
    g_start = tl.where(g == 0, 0, m1)
    g_stop = tl.where(g == 0, m1, M)
    rows_per = tl.cdiv(tl.cdiv(g_stop - g_start, SPLIT_M), BLOCK_M) * BLOCK_M
    m_start = g_start + part * rows_per
    m_stop = tl.minimum(m_start + rows_per, g_stop)

    cols = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = cols < K
    r_mask = offs_r < R
    if TRANS:  # dA.T tile = x.T @ dS: the wide K tile on the MMA's M side
        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_stop, STEP):
        rows = (m0 + tl.arange(0, STEP)).to(tl.int64)
        row_mask = rows < m_stop
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(seed, rows, cols, K, p_drop), x, 0.0)
        if TRANS:
            ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                         mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            if DS16:
                acc = _dot_tc(acc, tl.trans(x), ds, UPCAST)
            else:
                acc = _dot_split_b(acc, tl.trans(x), ds.to(tl.float32), MODE, UPCAST)
        else:
            ds_t = tl.load(ds_ptr + rows[None, :] * stride_dsm + offs_r[:, None] * stride_dsr,
                           mask=r_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
            acc = _dot_split(acc, ds_t, x, MODE, UPCAST)
    acc = acc * inv_keep
    da_g = da_ptr + g.to(tl.int64) * stride_dag
    if TRANS:
        da_ptrs = da_g + cols[:, None] * stride_dak + offs_r[None, :] * stride_dar
        da_mask = k_mask[:, None] & r_mask[None, :]
    else:
        da_ptrs = da_g + offs_r[:, None] * stride_dar + cols[None, :] * stride_dak
        da_mask = r_mask[:, None] & k_mask[None, :]
    if SPLIT_M == 1:
        tl.store(da_ptrs, acc, mask=da_mask)
    else:
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise the keep-mask of ``_keep_mask`` (tests and debugging only)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, cols, K, p_drop)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def lowrank_shrink(x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0,
                   seed: int = 0) -> torch.Tensor:
    """S = (drop(x) @ A.T) * scale, shape (M, R) float32, in one pass over x (any 2-D strides)."""
    check_device(x, A, scale)
    _check_float(x, A)
    _check_2d("x", x)
    _check_2d("A", A, cols=x.shape[1])
    R = A.shape[0]
    if scale.shape != (R,):
        raise ValueError(f"scale must have shape ({R},), got {tuple(scale.shape)}")
    return launch_shrink(x, A, scale.to(torch.float32).contiguous(), dropout_p=dropout_p, seed=seed)


@launch_guard("x")
def launch_shrink(x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0,
                  seed: int = 0) -> torch.Tensor:
    """``lowrank_shrink`` without its argument checks, for callers that hold the invariants (the
    ``MuScleLinear`` autograd function: shapes fixed per weight, ``scale`` contiguous fp32)."""
    M, K = x.shape
    R = A.shape[0]
    dropout, p, inv_keep, seed = _dropout_args(dropout_p, seed)
    if M == 0 or K == 0 or R == 0:
        return torch.zeros((M, R), dtype=torch.float32, device=x.device)
    S = _alloc((M, R), x.device, "lowrank.shrink", (M, K),
               lambda c: _split_count(x, _cdiv(M, c["BLOCK_M"]), _cdiv(K, c["BLOCK_K"])))

    def grid(meta: dict) -> tuple[int, int]:
        return _cdiv(M, meta["BLOCK_M"]), meta["SPLIT_K"]

    _shrink_kernel[grid](
        x, A, scale, S, M, K, R, _pow2(M),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), S.stride(0), S.stride(1),
        seed, p, inv_keep,
        BLOCK_R=_block_r(R), DROPOUT=dropout, F32_DOT=_plain_f32(x.dtype, A.dtype), CHUNK=_CHUNK,
    )
    return S


@launch_guard("y")
def _expand_launch(y: torch.Tensor, S: torch.Tensor, bt: torch.Tensor, dropout_p: float, seed: int) -> None:
    """y (M, N) += drop'(S (M, R) @ bt (R, N)) in place."""
    M, N = y.shape
    R = S.shape[1]
    if M == 0 or N == 0 or R == 0:
        return
    dropout, p, inv_keep, seed = _dropout_args(dropout_p, seed)

    def grid(meta: dict) -> tuple[int]:
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    _expand_kernel[grid](
        y, S, bt, M, N, R, _pow2(M),
        y.stride(0), y.stride(1), S.stride(0), S.stride(1), bt.stride(0), bt.stride(1),
        seed, p, inv_keep,
        BLOCK_R=_block_r(R), DROPOUT=dropout, MODE=_split_mode(bt.dtype), UPCAST=_split_upcast(bt.dtype),
        CHUNK=_CHUNK,
    )


def lowrank_expand_(y: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y += S @ B.T in place (y any float dtype and strides); fp32 sum, one rounding; returns y."""
    check_device(y, S, B)
    _check_float(y, S, B)
    _check_2d("y", y)
    M, N = y.shape
    _check_2d("B", B, rows=N)
    _check_2d("S", S, rows=M, cols=B.shape[1])
    return launch_expand_(y, S, B)


def launch_expand_(y: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``lowrank_expand_`` without its argument checks (see ``launch_shrink``)."""
    _expand_launch(y, S, B.t(), 0.0, 0)
    return y


def lowrank_backward_dS_dB(dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *,
                           row_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over dY (M, N): dS = (dY @ B) * scale (M, R) fp32 and dB = dY.T @ S as (G, N, R) fp32.

    With ``row_split = m1``: G = 2, dB[0] from rows [0, m1), dB[1] from rows [m1, M); else G = 1.
    ``S`` is fp32, or in dY's dtype when the forward rounded it there (one tensor-core dot for dB).
    """
    check_device(dY, B, S, scale)
    _check_float(dY, B, S)
    _check_2d("dY", dY)
    M, N = dY.shape
    _check_2d("B", B, rows=N)
    R = B.shape[1]
    _check_2d("S", S, rows=M, cols=R)
    _check_intermediate("S", S, dY)
    if scale.shape != (R,):
        raise ValueError(f"scale must have shape ({R},), got {tuple(scale.shape)}")
    m1, G = _check_split(row_split, M)
    split = None if G == 1 else m1  # an int: numpy and tensor scalars become one here
    return launch_backward_dS_dB(dY, B, S, scale.to(torch.float32).contiguous(), row_split=split)


@launch_guard("dY")
def launch_backward_dS_dB(dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *,
                          row_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lowrank_backward_dS_dB`` without its argument checks (see ``launch_shrink``)."""
    M, N = dY.shape
    R = B.shape[1]
    m1, G = (M, 1) if row_split is None else (row_split, 2)
    dB = torch.zeros((G, N, R), dtype=torch.float32, device=dY.device)  # a sum over row blocks: atomics
    if M == 0 or N == 0 or R == 0:
        return torch.zeros((M, R), dtype=torch.float32, device=dY.device), dB
    dS = _alloc((M, R), dY.device, "lowrank.bwd_ds_db", (m1, M, N),
                lambda c: _bwd_split({"m1": m1, "M": M, "N": N, "dy_ptr": dY, **c}))

    def grid(meta: dict) -> tuple[int, int]:
        bm = meta["BLOCK_M"]
        return _cdiv(m1, bm) + _cdiv(M - m1, bm), meta["SPLIT_N"]

    _bwd_ds_db_kernel[grid](
        dY, B, S, scale, dS, dB, M, N, R, m1, _pow2(M),
        dY.stride(0), dY.stride(1), B.stride(0), B.stride(1), S.stride(0), S.stride(1),
        dS.stride(0), dS.stride(1), dB.stride(0), dB.stride(1), dB.stride(2),
        BLOCK_R=_block_r(R), F32_DOT=_plain_f32(dY.dtype, B.dtype),
        MODE=_split_mode(dY.dtype), UPCAST=_split_upcast(dY.dtype), CHUNK=_CHUNK,
        S16=S.dtype != torch.float32 and _block_r(R) <= _S16_MAX_BLOCK_R,
    )
    return dS, dB


def lowrank_grad_A(dS: torch.Tensor, x: torch.Tensor, *, row_split: int | None = None,
                   dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """dA = dS.T @ drop(x) as (G, R, K) fp32, grouped by ``row_split`` like ``lowrank_backward_dS_dB``.

    The dropout mask is the one ``lowrank_shrink`` used with the same ``seed`` and ``dropout_p``.
    ``dS`` is fp32, or in x's dtype (one tensor-core dot instead of a hi + lo pair).
    """
    check_device(dS, x)
    _check_float(dS, x)
    _check_2d("x", x)
    _check_2d("dS", dS, rows=x.shape[0])
    _check_intermediate("dS", dS, x)
    m1, G = _check_split(row_split, x.shape[0])
    split = None if G == 1 else m1
    return launch_grad_A(dS, x, row_split=split, dropout_p=dropout_p, seed=seed)


@launch_guard("dS")
def launch_grad_A(dS: torch.Tensor, x: torch.Tensor, *, row_split: int | None = None,
                  dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``lowrank_grad_A`` without its argument checks (see ``launch_shrink``)."""
    M, K = x.shape
    R = dS.shape[1]
    m1, G = (M, 1) if row_split is None else (row_split, 2)
    dropout, p, inv_keep, seed = _dropout_args(dropout_p, seed)
    if M == 0 or K == 0 or R == 0:
        return torch.zeros((G, R, K), dtype=torch.float32, device=x.device)
    dA = _alloc((G, R, K), x.device, "lowrank.grad_a", (G, M, K),
                lambda c: _grad_a_split({"K": K, "G": G, "M": M, "x_ptr": x, **c}))

    def grid(meta: dict) -> tuple[int, int]:
        return _cdiv(K, meta["BLOCK_K"]), G * meta["SPLIT_M"]

    _grad_a_kernel[grid](
        dS, x, dA, M, K, R, m1, _pow2(M), G,
        dS.stride(0), dS.stride(1), x.stride(0), x.stride(1), dA.stride(0), dA.stride(1), dA.stride(2),
        seed, p, inv_keep,
        BLOCK_R=_block_r(R), DROPOUT=dropout, MODE=_split_mode(x.dtype), UPCAST=_split_upcast(x.dtype),
        CHUNK=_CHUNK, DS16=dS.dtype != torch.float32, TRANS=_grad_a_transposed(x.dtype, _block_r(R)),
    )
    return dA


def lowrank_dx_(dX: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, *, dropout_p: float = 0.0,
                seed: int = 0) -> torch.Tensor:
    """dX += (dS @ A) * keep / (1 - p) in place, with the mask of ``lowrank_shrink``; returns dX."""
    check_device(dX, dS, A)
    _check_float(dX, dS, A)
    _check_2d("dX", dX)
    M, K = dX.shape
    _check_2d("A", A, cols=K)
    _check_2d("dS", dS, rows=M, cols=A.shape[0])
    return launch_dx_(dX, dS, A, dropout_p=dropout_p, seed=seed)


def launch_dx_(dX: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, *, dropout_p: float = 0.0,
               seed: int = 0) -> torch.Tensor:
    """``lowrank_dx_`` without its argument checks (see ``launch_shrink``)."""
    _expand_launch(dX, dS, A, dropout_p, seed)
    return dX


@launch_guard("device")
def dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The (M, K) bool keep-mask the kernels use for ``dropout_p=p`` and ``seed`` (for tests)."""
    out = torch.zeros((M, K), dtype=torch.int8, device=device)
    check_device(out)
    _, p, _, seed = _dropout_args(p, seed)
    if M == 0 or K == 0:
        return out.bool()
    grid = (_cdiv(M, 32), _cdiv(K, 128))
    _dropout_mask_kernel[grid](out, M, K, seed, p, BLOCK_M=32, BLOCK_K=128)
    return out.bool()
