"""Fused gradient alignment (SPEC section 4): the whole rule in two launches.

Design
------
* **Pointer table, no copies.** The gradients ``g`` (``p.grad``) and reference
  gradients ``c`` stay where they are. Each step the launcher writes their
  ``data_ptr()`` values into an int64 table, four columns of T entries (g and c
  addresses, g and c dtype codes), re-uploaded only when an entry changes;
  kernels cast them back to typed pointers (``int.to(tl.pointer_type)``, the
  grouped-GEMM tutorial idiom, which the interpreter also supports). This
  avoids the ``torch.cat`` of the reference gradients and the re-pointing of
  ``p.grad`` into a flat buffer (which ``zero_grad(set_to_none=True)`` undoes
  every step). Element dtypes fp32 / bf16 / fp16 are compile-time constants when
  all tensors share one, else read per tensor from the table.
* **Chunk table.** Built once from the tensor sizes: chunk -> (tensor id, start),
  ``block * iters`` elements per chunk (8192 by default). Every tensor has at least
  one chunk (so that empty tensors still take part in the reduction). One program
  per chunk in both kernels. Full chunks use unmasked loads on pointers hinted
  16-byte aligned (``tl.multiple_of``; the launcher checks every address and drops
  the hint otherwise), so they compile to 128-bit accesses; only the tail chunk of
  each tensor is masked (a mask against a runtime length defeats vectorization).
* **Kernel 1 (stats + decision).** Each program reduces <g,c>, ||g||^2, ||c||^2
  over its chunk in fp32 and stores the three partials. It then bumps the
  tensor's arrival counter (acq_rel atomic, after a CTA barrier); the last
  chunk of a tensor sums that tensor's partials in a fixed order in fp64, and
  bumps the global counter; the last tensor computes the step decision (mean
  ||c||, ref loss, mode) and per-tensor coefficients ``a, b, apply`` with
  ``g := a c + b g``. The counters reset themselves. The reduction is therefore
  deterministic (no float atomics) and the decision is made once, on the device,
  instead of every kernel-2 program re-reducing T tensors' stats. Memory ordering:
  partial stores, ``tl.debug_barrier()``, then the acq_rel gpu-scope atomic (one
  thread; the PTX shows ``atom.global.gpu.acq_rel``); the reader side loads with
  ``.cg`` (L2, bypassing a possibly stale L1) -- the threadfence-reduction pattern.
* **Kernel 2 (update).** Each program reads its tensor's ``(a, b, apply)``; kept
  tensors are not touched at all, aligned tensors (``b == 0``) never read ``g``.

Host work per step is a few C-level ``map`` passes over each tensor list (``data_ptr``,
dtype, device, contiguity, shape; a Python loop only for None entries or to name a bad
tensor) and, when an entry changed, one pinned non-blocking copy of the table: no host
sync anywhere.

Non-finite handling: a tensor whose ||g||^2, ||c||^2 or <g,c> is not finite
(any NaN/inf element, or overflow of the fp32 partial sums) keeps its raw ``g``,
is left out of the mean ||c|| and is counted in the step stats.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import chain

import torch
import triton
import triton.language as tl

from . import configs
from ._common import (
    INTERPRET,
    N_STATS,
    STAT_MEAN_REF_NORM,
    STAT_MODE,
    STAT_N_NONFINITE,
    STAT_N_NONFINITE_GRAD,
    STAT_N_REF,
    STAT_N_UPDATED,
    STAT_REF_LOSS,
    STAT_RHO,
    check_device,
    launch_guard,
    resolve_device,
)
from ._common import round_f32 as _f32

#: Element-type codes used in the pointer table.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Layout of the per-step stats vector (float64) written by the kernels: mode (0 kept / 1 aligned /
#: 2 mixed), mean ||c||, rho applied, non-finite tensors, of which non-finite g, tensors rewritten, ref
#: loss, tensors in the mean. Defined in ``_common`` (triton-free) for the torch path too.

@triton.jit
def _typed(addr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Integer address -> typed pointer. The alignment hint must sit in the function that does the
    cast (a hint on a callee's argument is lost when Triton inlines it)."""
    ptr = addr.to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # lets full chunks use 16-byte vector accesses
    return ptr


@triton.jit
def _ld(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _st(ptr, offs, val, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty))


@triton.jit
def _load_f32(addr, code, offs, mask, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Load elements at integer address ``addr`` as fp32 (code: 0 fp32, 1 bf16, 2 fp16)."""
    if code == 0:
        x = _ld(_typed(addr, tl.float32, ALIGNED), offs, mask, MASKED)
    elif code == 1:
        x = _ld(_typed(addr, tl.bfloat16, ALIGNED), offs, mask, MASKED)
    else:
        x = _ld(_typed(addr, tl.float16, ALIGNED), offs, mask, MASKED)
    return x


@triton.jit
def _store_f32(addr, code, offs, val, mask, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Store fp32 ``val`` at integer address ``addr`` converted to the element type ``code``."""
    if code == 0:
        _st(_typed(addr, tl.float32, ALIGNED), offs, val, mask, MASKED)
    elif code == 1:
        _st(_typed(addr, tl.bfloat16, ALIGNED), offs, val, mask, MASKED)
    else:
        _st(_typed(addr, tl.float16, ALIGNED), offs, val, mask, MASKED)


@triton.jit
def _chunk_offsets(start, i, offs0, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + i * BLOCK + offs0
    if not MASKED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)  # true: chunk starts are multiples
    return offs


@triton.jit
def _apply_chunk(gaddr, gcode, caddr, ccode, start, numel, a, b, offs0, READ_G: tl.constexpr,
                 MASKED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    for i in tl.static_range(ITERS):
        offs = _chunk_offsets(start, i, offs0, BLOCK, MASKED)
        m = offs < numel
        c = _load_f32(caddr, ccode, offs, m, MASKED, ALIGNED)
        if READ_G:
            g = _load_f32(gaddr, gcode, offs, m, MASKED, ALIGNED)
            new = a * c + b * g
        else:
            new = a * c  # pure alignment: g is overwritten, never read
        _store_f32(gaddr, gcode, offs, new, m, MASKED, ALIGNED)


@triton.jit
def _finalize(
    tstat_ptr, coef_ptr, out_ptr, ref_loss_ptr, ref_loss_val, T,
    min_ref_grad_norm, min_ref_loss, rho, mixed_ok, keep_cos,
    LOSS_FROM_PTR: tl.constexpr, RBLOCK: tl.constexpr,
):
    """Step decision and per-tensor coefficients; run by exactly one program."""
    r = tl.arange(0, RBLOCK)
    sum_norm = tl.zeros([RBLOCK], dtype=tl.float64)
    n_valid = tl.zeros([RBLOCK], dtype=tl.float64)
    n_nf = tl.zeros([RBLOCK], dtype=tl.float64)
    n_nf_g = tl.zeros([RBLOCK], dtype=tl.float64)
    for j in range(0, T, RBLOCK):
        idx = j + r
        m = idx < T
        dot, gg, cc = _load_tstat(tstat_ptr, idx, m)
        g_fin = gg < float("inf")  # gg >= 0, so this is false exactly for inf and NaN
        c_fin = cc < float("inf")
        d_fin = tl.abs(dot) < float("inf")
        c_ok = m & c_fin & (cc > 0.0)
        sum_norm += tl.where(c_ok, tl.sqrt(tl.where(c_ok, cc, 1.0)), 0.0)
        n_valid += tl.where(c_ok, 1.0, 0.0)
        n_nf += tl.where(m & ~(g_fin & c_fin & d_fin), 1.0, 0.0)
        n_nf_g += tl.where(m & ~g_fin, 1.0, 0.0)
    total_norm = tl.sum(sum_norm, 0)
    n_valid_s = tl.sum(n_valid, 0)
    mean_norm = total_norm / tl.maximum(n_valid_s, 1.0)
    if LOSS_FROM_PTR:
        loss = tl.load(ref_loss_ptr).to(tl.float32).to(tl.float64)  # fp32, like the fp32 thresholds
    else:
        loss = tl.cast(ref_loss_val, tl.float64)
    aligned = (mean_norm > min_ref_grad_norm) & (loss > min_ref_loss)
    mode = tl.where(aligned, 1.0, tl.where(mixed_ok != 0, 2.0, 0.0))
    w_raw = tl.where(aligned, 0.0, tl.cast(rho, tl.float64))  # weight of the raw gradient
    # Upper bound for the coefficient: inf when the step updates, 0 (nothing passes) when g is kept.
    # (A bound rather than `& (mode != 0)`: the interpreter cannot `&` a scalar with a block.)
    coef_lim = tl.where(mode != 0.0, float("inf"), 0.0)
    # keep_raw_cos: in aligned mode a tensor with cos(g, c) >= keep_cos keeps g (inf: never)
    cos_lim = tl.where(mode == 1.0, tl.cast(keep_cos, tl.float64), float("inf"))
    n_upd = tl.zeros([RBLOCK], dtype=tl.float64)
    for j in range(0, T, RBLOCK):
        idx = j + r
        m = idx < T
        dot, gg, cc = _load_tstat(tstat_ptr, idx, m)
        ok = m & (gg < float("inf")) & (gg > 0.0) & (cc < float("inf")) & (cc > 0.0)
        ok = ok & (tl.abs(dot) < float("inf"))
        coef = tl.abs(dot) / tl.where(ok, cc, 1.0)
        ok = ok & (coef < coef_lim)
        cos = dot / tl.sqrt(tl.where(ok, gg * cc, 1.0))
        ok = ok & ~(cos >= cos_lim)
        a = tl.where(ok, (1.0 - w_raw) * coef, 0.0)
        b = tl.where(ok, w_raw, 1.0)
        tl.store(coef_ptr + idx * 3 + 0, a.to(tl.float32), mask=m)
        tl.store(coef_ptr + idx * 3 + 1, b.to(tl.float32), mask=m)
        tl.store(coef_ptr + idx * 3 + 2, tl.where(ok, 1.0, 0.0).to(tl.float32), mask=m)
        n_upd += tl.where(ok, 1.0, 0.0)
    tl.store(out_ptr + 0, mode)
    tl.store(out_ptr + 1, mean_norm)
    tl.store(out_ptr + 2, tl.where(mode == 2.0, w_raw, 0.0))
    tl.store(out_ptr + 3, tl.sum(n_nf, 0))
    tl.store(out_ptr + 4, tl.sum(n_nf_g, 0))
    tl.store(out_ptr + 5, tl.sum(n_upd, 0))
    tl.store(out_ptr + 6, loss)
    tl.store(out_ptr + 7, n_valid_s)


@triton.jit
def _load_tstat(tstat_ptr, idx, m):
    """Per-tensor (<g,c>, ||g||^2, ||c||^2), read past L1: other programs wrote them this launch."""
    dot = tl.load(tstat_ptr + idx * 3 + 0, mask=m, other=0.0, cache_modifier=".cg")
    gg = tl.load(tstat_ptr + idx * 3 + 1, mask=m, other=0.0, cache_modifier=".cg")
    cc = tl.load(tstat_ptr + idx * 3 + 2, mask=m, other=0.0, cache_modifier=".cg")
    return dot, gg, cc


@triton.jit
def _tensor_entry(dyn_ptr, t, T, G_CODE: tl.constexpr, C_CODE: tl.constexpr):
    """Tensor t's (g address, g dtype code, c address, c dtype code); codes fixed at compile time if >= 0."""
    gaddr = tl.load(dyn_ptr + t)
    caddr = tl.load(dyn_ptr + T + t)
    if G_CODE >= 0:
        gcode = G_CODE
    else:
        gcode = tl.load(dyn_ptr + 2 * T + t)
    if C_CODE >= 0:
        ccode = C_CODE
    else:
        ccode = tl.load(dyn_ptr + 3 * T + t)
    return gaddr, gcode, caddr, ccode


@triton.jit
def _align_stats_kernel(
    chunk_tid_ptr, chunk_start_ptr, t_cfirst_ptr, t_nch_ptr, t_numel_ptr, dyn_ptr,
    partial_ptr, tstat_ptr, coef_ptr, count_ptr, out_ptr, ref_loss_ptr, ref_loss_val, T,
    min_ref_grad_norm, min_ref_loss, rho, mixed_ok, keep_cos,
    G_CODE: tl.constexpr, C_CODE: tl.constexpr, LOSS_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, RBLOCK: tl.constexpr,
):
    """Launch 1: per-chunk partials, per-tensor totals (last chunk) and the decision (last tensor)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tid_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    numel = tl.load(t_numel_ptr + t)
    gaddr, gcode, caddr, ccode = _tensor_entry(dyn_ptr, t, T, G_CODE, C_CODE)
    # A missing tensor (address 0) reads as zeros: its mask limit is 0.
    g_lim = tl.where(gaddr != 0, numel, 0)
    c_lim = tl.where(caddr != 0, numel, 0)
    offs0 = tl.arange(0, BLOCK)
    acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_cc = tl.zeros([BLOCK], dtype=tl.float32)
    end = start + BLOCK * ITERS
    if (end <= g_lim) & (end <= c_lim):
        # Full chunk: unmasked (vectorizable) loads; the masked copy below serves tensor tails.
        for i in tl.static_range(ITERS):
            offs = _chunk_offsets(start, i, offs0, BLOCK, False)
            g = _load_f32(gaddr, gcode, offs, None, False, ALIGNED)
            c = _load_f32(caddr, ccode, offs, None, False, ALIGNED)
            acc_dot += g * c
            acc_gg += g * g
            acc_cc += c * c
    else:
        for i in tl.static_range(ITERS):
            offs = _chunk_offsets(start, i, offs0, BLOCK, True)
            g = _load_f32(gaddr, gcode, offs, offs < g_lim, True, ALIGNED)
            c = _load_f32(caddr, ccode, offs, offs < c_lim, True, ALIGNED)
            acc_dot += g * c
            acc_gg += g * g
            acc_cc += c * c
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(acc_dot, 0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(acc_gg, 0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(acc_cc, 0))
    # Make every thread's partial stores happen-before the (single-thread) release atomic.
    tl.debug_barrier()
    nch = tl.load(t_nch_ptr + t)
    arrived = tl.atomic_add(count_ptr + t, 1)  # sem acq_rel, scope gpu (defaults)
    if arrived == nch - 1:
        # Last chunk of tensor t: fixed-order fp64 sum of its partials (deterministic).
        cfirst = tl.load(t_cfirst_ptr + t)
        r = tl.arange(0, RBLOCK)
        s_dot = tl.zeros([RBLOCK], dtype=tl.float64)
        s_gg = tl.zeros([RBLOCK], dtype=tl.float64)
        s_cc = tl.zeros([RBLOCK], dtype=tl.float64)
        for j in range(0, nch, RBLOCK):
            idx = j + r
            mm = idx < nch
            p = partial_ptr + (cfirst + idx) * 3
            s_dot += tl.load(p + 0, mask=mm, other=0.0, cache_modifier=".cg").to(tl.float64)
            s_gg += tl.load(p + 1, mask=mm, other=0.0, cache_modifier=".cg").to(tl.float64)
            s_cc += tl.load(p + 2, mask=mm, other=0.0, cache_modifier=".cg").to(tl.float64)
        tl.store(tstat_ptr + t * 3 + 0, tl.sum(s_dot, 0))
        tl.store(tstat_ptr + t * 3 + 1, tl.sum(s_gg, 0))
        tl.store(tstat_ptr + t * 3 + 2, tl.sum(s_cc, 0))
        tl.store(count_ptr + t, 0)  # every chunk of t has arrived: reset for the next step
        tl.debug_barrier()
        finished = tl.atomic_add(count_ptr + T, 1)
        if finished == T - 1:
            _finalize(
                tstat_ptr, coef_ptr, out_ptr, ref_loss_ptr, ref_loss_val, T,
                min_ref_grad_norm, min_ref_loss, rho, mixed_ok, keep_cos, LOSS_FROM_PTR, RBLOCK,
            )
            tl.store(count_ptr + T, 0)


@triton.jit
def _align_apply_kernel(
    chunk_tid_ptr, chunk_start_ptr, t_numel_ptr, dyn_ptr, coef_ptr, T,
    G_CODE: tl.constexpr, C_CODE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Launch 2: ``g := a c + b g`` on the chunks of tensors the decision updates."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tid_ptr + pid)
    apply = tl.load(coef_ptr + t * 3 + 2)
    if apply != 0.0:
        start = tl.load(chunk_start_ptr + pid)
        numel = tl.load(t_numel_ptr + t)
        a = tl.load(coef_ptr + t * 3 + 0)
        b = tl.load(coef_ptr + t * 3 + 1)
        gaddr, gcode, caddr, ccode = _tensor_entry(dyn_ptr, t, T, G_CODE, C_CODE)
        offs0 = tl.arange(0, BLOCK)
        if start + BLOCK * ITERS <= numel:
            if b == 0.0:
                _apply_chunk(gaddr, gcode, caddr, ccode, start, numel, a, b, offs0, False, False, ALIGNED,
                             BLOCK, ITERS)
            else:
                _apply_chunk(gaddr, gcode, caddr, ccode, start, numel, a, b, offs0, True, False, ALIGNED,
                             BLOCK, ITERS)
        else:
            if b == 0.0:
                _apply_chunk(gaddr, gcode, caddr, ccode, start, numel, a, b, offs0, False, True, ALIGNED,
                             BLOCK, ITERS)
            else:
                _apply_chunk(gaddr, gcode, caddr, ccode, start, numel, a, b, offs0, True, True, ALIGNED,
                             BLOCK, ITERS)


@dataclass
class AlignPlan:
    """Static launch data for one list of tensor sizes: chunk table and persistent workspace."""

    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    device: torch.device
    block: int
    iters: int
    num_warps: int
    rblock: int
    chunk_tid: torch.Tensor
    chunk_start: torch.Tensor
    t_cfirst: torch.Tensor
    t_nch: torch.Tensor
    t_numel: torch.Tensor
    partials: torch.Tensor  # fp32 [n_chunks, 3]
    tstats: torch.Tensor  # fp64 [T, 3]: <g,c>, ||g||^2, ||c||^2
    coefs: torch.Tensor  # fp32 [T, 3]: a, b, apply
    counters: torch.Tensor  # int32 [T + 1], all zero between launches
    _dyn_key: list[int] | None = field(default=None, repr=False)
    _dyn: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_tid.numel())

    @property
    def n_tensors(self) -> int:
        return len(self.numels)


def build_plan(
    shapes: Sequence[Sequence[int]], device: torch.device | str, block: int | None = None,
    iters: int | None = None, num_warps: int | None = None, rblock: int | None = None,
) -> AlignPlan:
    """Precompute the chunk table (chunk -> tensor, start) and the workspace, once per tensor list.

    One program handles ``block * iters`` elements. ``rblock`` is the vector width of the
    small reductions over chunk partials and over tensors (tests shrink it to cover their loops).
    Unset geometry comes from ``configs.CONFIGS["align.fused"]``.
    """
    cfg = configs.launch_config("align.fused")
    block = cfg["BLOCK"] if block is None else block
    iters = cfg["ITERS"] if iters is None else iters
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    rblock = cfg["RBLOCK"] if rblock is None else rblock
    if not shapes:
        raise ValueError("build_plan needs at least one tensor")
    shapes = tuple(torch.Size(s) for s in shapes)
    numels = [s.numel() for s in shapes]
    for name, v in (("block", block), ("rblock", rblock)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    device = resolve_device(device)
    chunk = block * iters
    tids: list[int] = []
    starts: list[int] = []
    cfirst: list[int] = []
    nch: list[int] = []
    for t, n in enumerate(numels):
        if n >= 2**31 - chunk:
            raise ValueError(f"tensor {t} has {n} elements; the fused kernels index with int32")
        k = max(1, -(-n // chunk))  # at least one chunk, so empty tensors still report in
        cfirst.append(len(tids))
        nch.append(k)
        tids.extend([t] * k)
        starts.extend(range(0, k * chunk, chunk))
    T = len(numels)
    i32 = dict(dtype=torch.int32, device=device)
    return AlignPlan(
        shapes=shapes, numels=tuple(numels), device=device, block=block, iters=iters, num_warps=num_warps,
        rblock=rblock,
        chunk_tid=torch.tensor(tids, **i32), chunk_start=torch.tensor(starts, **i32),
        t_cfirst=torch.tensor(cfirst, **i32), t_nch=torch.tensor(nch, **i32),
        t_numel=torch.tensor(list(numels), **i32),
        partials=torch.zeros(len(tids), 3, dtype=torch.float32, device=device),
        tstats=torch.zeros(T, 3, dtype=torch.float64, device=device),
        coefs=torch.zeros(T, 3, dtype=torch.float32, device=device),
        counters=torch.zeros(T + 1, dtype=torch.int32, device=device),
    )


class UnsupportedDtypeError(TypeError):
    """A gradient dtype the fused kernels do not handle (they take fp32, bf16 and fp16)."""


class NonContiguousError(ValueError):
    """A gradient the fused kernels cannot address flat (they need contiguous tensors)."""


_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_get_device = torch.Tensor.get_device


def _fast_column(
    ts: Sequence[torch.Tensor | None], plan: AlignPlan, dev: int
) -> tuple[list[int], list[int], int] | None:
    """(addresses, dtype codes, the one code or -1) of a tensor list, every check a C-level ``map``.

    The per-step host cost of the fused path is these checks over hundreds of tensors: ``map`` over
    the bound methods does them at about a third of a Python loop's cost. Returns None when an entry
    is None or fails a check; the per-tensor loop (:func:`_table_rows`) then skips it or names it.
    """
    try:
        ptrs = list(map(_data_ptr, ts))
    except TypeError:  # a None entry (no gradient, or no reference)
        return None
    dtypes = set(map(_DTYPE, ts))
    if len(dtypes) == 1:
        code = DTYPE_CODES.get(dtypes.pop(), -1)
        codes = [code] * len(ts)
    else:
        code = -1
        codes = [DTYPE_CODES.get(d, -1) for d in map(_DTYPE, ts)]
    if -1 in codes or not all(map(_is_contiguous, ts)) or set(map(_get_device, ts)) != {dev}:
        return None
    if tuple(map(_SHAPE, ts)) != plan.shapes:
        return None
    return ptrs, codes, code


def _bad_tensor(what: str, i: int, t: torch.Tensor, plan: AlignPlan) -> None:
    """Raise the error that explains why tensor ``i`` cannot go into the pointer table."""
    if t.dtype not in DTYPE_CODES:
        raise UnsupportedDtypeError(f"{what}[{i}] is {t.dtype}; the fused kernels take fp32, bf16 and fp16")
    if t.shape != plan.shapes[i]:
        raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)} but param {i} has shape "
                         f"{tuple(plan.shapes[i])}")
    if t.device != plan.device:
        raise ValueError(f"{what}[{i}] is on {t.device} but param {i} is on {plan.device}")
    raise NonContiguousError(f"{what}[{i}] must be contiguous for the fused kernels (strides {t.stride()})")


def _upload_table(plan: AlignPlan, rows: list[int]) -> torch.Tensor:
    """Device copy of the pointer table, re-uploaded only when an address or dtype changed.

    On CUDA the host copy is pinned and the copy is non-blocking, so no host sync.
    """
    if plan._dyn is not None and plan._dyn_key == rows:
        return plan._dyn
    # frombuffer over an array: about half of torch.tensor(list)'s cost; the tensor owns the array
    host = torch.frombuffer(array("q", rows), dtype=torch.int64)
    dyn = host.pin_memory().to(plan.device, non_blocking=True) if plan.device.type == "cuda" else host
    plan._dyn_key, plan._dyn = rows, dyn
    return dyn


def _table_rows(
    plan: AlignPlan, grads: Sequence[torch.Tensor | None], refs: Sequence[torch.Tensor | None], dev: int
) -> tuple[list[int], int, int, int]:
    """The pointer table tensor by tensor: for None entries (address 0), and to name a bad tensor."""
    shapes, codes = plan.shapes, DTYPE_CODES
    T = plan.n_tensors
    rows = [0] * (4 * T)
    addr_bits = 0
    g_set: set[int] = set()
    c_set: set[int] = set()

    def entry(t: torch.Tensor | None, what: str, i: int, seen: set[int]) -> tuple[int, int]:
        """(address, dtype code) of one table cell; a missing tensor is (0, 0)."""
        if t is None:
            return 0, 0
        code = codes.get(t.dtype, -1)
        if code < 0 or t.get_device() != dev or not t.is_contiguous() or t.shape != shapes[i]:
            _bad_tensor(what, i, t, plan)
        seen.add(code)
        return t.data_ptr(), code

    for i in range(T):
        gaddr, gcode = entry(grads[i], "grads", i, g_set)
        caddr, ccode = entry(refs[i], "ref_grads", i, c_set)
        rows[i], rows[T + i], rows[2 * T + i], rows[3 * T + i] = gaddr, caddr, gcode, ccode
        addr_bits |= gaddr | caddr
    g_code = g_set.pop() if len(g_set) == 1 else -1
    c_code = c_set.pop() if len(c_set) == 1 else -1
    return rows, addr_bits, g_code, c_code


@launch_guard("plan")
def align_fused(
    plan: AlignPlan,
    grads: Sequence[torch.Tensor | None],
    refs: Sequence[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    *,
    min_ref_grad_norm: float,
    min_ref_loss: float,
    rho: float,
    mixed_ok: bool,
    keep_raw_cos: float | None = None,
) -> torch.Tensor:
    """Apply the SPEC section 4 rule in place to ``grads`` in two launches; no host sync.

    ``grads[i]`` / ``refs[i]``: contiguous tensors of shape ``plan.shapes[i]`` on
    ``plan.device`` (dtype fp32, bf16 or fp16), or None (no gradient: skipped; no
    reference: kept). ``rho`` is the raw-gradient weight of the mixed branch,
    ``mixed_ok`` whether that branch is open this step (both host-side: they depend
    only on the epoch). ``keep_raw_cos``: in aligned mode a tensor with cos(g, c) at or
    above it keeps ``g`` (None: never). Returns the float64 stats vector (layout: ``STAT_*``).
    """
    T = plan.n_tensors
    if len(grads) != T or len(refs) != T:
        raise ValueError(f"plan has {T} tensors, got {len(grads)} grads and {len(refs)} refs")
    check_device(plan.chunk_tid)
    dev = plan.chunk_tid.get_device()  # -1 on CPU
    g_col = _fast_column(grads, plan, dev)
    c_col = _fast_column(refs, plan, dev) if g_col is not None else None
    if g_col is not None and c_col is not None:
        (gptr, gcodes, g_code), (cptr, ccodes, c_code) = g_col, c_col
        rows = gptr + cptr + gcodes + ccodes
        addr_bits = reduce(operator.or_, chain(gptr, cptr), 0)
    else:
        rows, addr_bits, g_code, c_code = _table_rows(plan, grads, refs, dev)
    aligned = addr_bits % 16 == 0  # views at odd offsets (flat-buffer grads) fall back to scalar access
    dyn = _upload_table(plan, rows)

    if isinstance(ref_loss, torch.Tensor) and ref_loss.device == plan.device:
        loss_ptr, loss_val, loss_from_ptr = ref_loss.detach(), 0.0, True
    else:
        loss_ptr, loss_val, loss_from_ptr = plan.tstats, _f32(float(ref_loss)), False  # host value
    out = torch.empty(N_STATS, dtype=torch.float64, device=plan.device)
    grid = (plan.n_chunks,)
    try:
        _align_stats_kernel[grid](
            plan.chunk_tid, plan.chunk_start, plan.t_cfirst, plan.t_nch, plan.t_numel, dyn,
            plan.partials, plan.tstats, plan.coefs, plan.counters, out, loss_ptr, loss_val, T,
            _f32(min_ref_grad_norm), _f32(min_ref_loss), float(rho), int(bool(mixed_ok)),
            math.inf if keep_raw_cos is None else float(keep_raw_cos),
            G_CODE=g_code, C_CODE=c_code, LOSS_FROM_PTR=loss_from_ptr, ALIGNED=aligned,
            BLOCK=plan.block, ITERS=plan.iters, RBLOCK=plan.rblock, num_warps=plan.num_warps,
        )
        _align_apply_kernel[grid](
            plan.chunk_tid, plan.chunk_start, plan.t_numel, dyn, plan.coefs, T,
            G_CODE=g_code, C_CODE=c_code, ALIGNED=aligned, BLOCK=plan.block, ITERS=plan.iters,
            num_warps=plan.num_warps,
        )
    except Exception:
        plan.counters.zero_()  # a launch that died half-way must not poison the next step
        raise
    return out


__all__ = [
    "AlignPlan", "DTYPE_CODES", "INTERPRET", "N_STATS", "NonContiguousError", "STAT_MEAN_REF_NORM",
    "STAT_MODE", "STAT_N_NONFINITE",
    "STAT_N_NONFINITE_GRAD", "STAT_N_REF", "STAT_N_UPDATED", "STAT_REF_LOSS", "STAT_RHO",
    "UnsupportedDtypeError", "align_fused", "build_plan",
]
