"""Fused 4-bit (NF4/FP4) dequantize + matmul for small M (decode-sized batches).

``y[m, n] = sum_k x[m, k] * W[n, k]`` with ``W`` the bitsandbytes-packed 4-bit weight ``[N, K]``
(layout: ``csrc_triton/nf4.py``). At small M a dequantize + cuBLAS pair writes the whole weight
in 16 bits and reads it back (5x the packed bytes) to do very little arithmetic (measured figures:
docs/kernels.md). This kernel reads the packed bytes once and dequantizes in registers.

Numerics are those of dequantize-then-matmul: each weight is ``code[nibble] * absmax`` in fp32
(double-quantized absmax decoded as in ``nf4.py``), rounded once to x's dtype, then multiplied with
an fp32 accumulator (``ieee`` dots for fp32 inputs, not tf32).

Up to ``GEMV_MAX_M`` rows a program multiplies one row of x with its weight tile and sums (a
GEMV, CUDA cores); more rows go 16 at a time through ``tl.dot``. The even and odd K columns are
kept apart (two half-width products) rather than interleaved, which saves a register shuffle.
Grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: at M=1 an ``N x K`` weight gives only
``N / BLOCK_N`` output tiles, too few programs to pull full bandwidth, so K is split too. Each split
writes its fp32 partial sums to ``part[SPLIT_K, M, N]`` and the launcher adds them in a fixed order:
deterministic, no atomics. ``K`` must be even (a byte never straddles two rows); a quantization
block may straddle rows (its absmax is looked up per byte).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import configs
from ._common import INTERPRET, check_device, launch_guard, sm_count, upcast_dot
from .nf4 import SUPPORTED_BLOCKSIZES, check_scale_args, round_bf16_rne

#: Up to this many rows of x, each program takes one row and reduces with multiply + row sums
#: (a GEMV: no tensor cores, no padding of M to 16); above it, 16 rows per program and tl.dot.
GEMV_MAX_M = 4
#: Rows of x per program on the tl.dot path (its minimum).
DOT_BLOCK_M = 16


@triton.autotune(
    configs=configs.triton_configs("nf4.matmul"), key=["N", "K", "SPLIT_K", "BS", "NESTED", "BLOCK_M"]
)
@triton.jit
def _matmul_4bit_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, row stride stride_xm, unit column stride
    a_ptr,  # uint8 [N * K / 2] packed nibbles
    absmax_ptr,  # fp32 [n_blocks], or uint8 codes when NESTED
    code_ptr,  # fp32 [16]
    code2_ptr,  # fp32 [256] (NESTED only)
    absmax2_ptr,  # fp32 [ceil(n_blocks / blocksize2)] (NESTED only)
    offset_ptr,  # fp32 [1] (NESTED only)
    part_ptr,  # fp32 [SPLIT_K, M, N] partial sums
    M,
    N,
    K,
    half_k,  # K // 2, packed bytes per weight row (an argument, so that its divisibility is known)
    stride_xm,
    blocksize2,
    BS: tl.constexpr,  # quantization blocksize (elements)
    NESTED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16: fp32 dots, weights rounded to bf16 by hand
    IEEE: tl.constexpr,  # fp32 inputs: ieee dots (tf32 would round the operands)
    BLOCK_M: tl.constexpr,  # 1: GEMV (multiply + row sums, no tensor cores); >= 16: tl.dot
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    HALF: tl.constexpr = BLOCK_K // 2  # packed bytes per K step
    pair = tl.arange(0, HALF)
    row_byte = offs_n.to(tl.int64) * half_k
    x_row = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    bytes_per_split = tl.cdiv(tl.cdiv(half_k, HALF), SPLIT_K) * HALF
    b_lo = pid_k * bytes_per_split
    b_hi = tl.minimum(b_lo + bytes_per_split, half_k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(b_lo, b_hi, HALF):
        bj = b0 + pair  # byte j of the row: elements 2j (high nibble) and 2j + 1 (low nibble)
        b_mask = bj < b_hi
        w_mask = n_mask[:, None] & b_mask[None, :]
        byte = row_byte[:, None] + bj[None, :]  # [BLOCK_N, HALF], contiguous along the row
        raw = tl.load(a_ptr + byte, mask=w_mask, other=0)
        blk = byte // (BS // 2)  # both elements of a byte share a quantization block
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=w_mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // blocksize2, mask=w_mask, other=0.0)
            scale = scale + tl.load(offset_ptr)  # separate rounding: launched with fp fusion off
        else:
            scale = tl.load(absmax_ptr + blk, mask=w_mask, other=0.0)
        # The even and odd K columns stay apart (two half-width products) instead of being
        # interleaved: same sum, no register shuffle through shared memory.
        w_hi = tl.load(code_ptr + (raw >> 4).to(tl.int32)) * scale  # W[n, 2j], fp32
        w_lo = tl.load(code_ptr + (raw & 0xF).to(tl.int32)) * scale  # W[n, 2j + 1]
        x_mask = m_mask[:, None] & b_mask[None, :]
        x_even = tl.load(x_row + 2 * bj[None, :], mask=x_mask, other=0.0)  # [BLOCK_M, HALF]
        x_odd = tl.load(x_row + 2 * bj[None, :] + 1, mask=x_mask, other=0.0)
        if UPCAST:  # the rounding dequantize_4bit would apply, done by hand for the interpreter
            w_hi = round_bf16_rne(w_hi).to(tl.float32)
            w_lo = round_bf16_rne(w_lo).to(tl.float32)
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        else:
            w_hi = w_hi.to(x_ptr.dtype.element_ty)
            w_lo = w_lo.to(x_ptr.dtype.element_ty)
        if BLOCK_M == 1:
            part = tl.sum(w_hi.to(tl.float32) * x_even.to(tl.float32), axis=1)
            part += tl.sum(w_lo.to(tl.float32) * x_odd.to(tl.float32), axis=1)
            acc += part[None, :]
        elif IEEE or UPCAST:
            acc = tl.dot(x_even, tl.trans(w_hi), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_lo), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, tl.trans(w_hi), acc)
            acc = tl.dot(x_odd, tl.trans(w_lo), acc)

    p = part_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(p, acc, mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def default_split_k(m: int, n: int, k: int) -> int:
    """K splits that give the GPU about two programs per SM at decode sizes (1 on the interpreter)."""
    if INTERPRET:
        return 1
    sms = sm_count(torch.cuda.current_device())
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, 1 if m <= GEMV_MAX_M else DOT_BLOCK_M)
    return max(1, min(16, triton.cdiv(2 * sms, max(tiles, 1)), k // 256))


@launch_guard("x")
def matmul_4bit_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    *,
    code2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for a flat packed 4-bit ``W [n, K]``; returns ``[M, n]`` in x's dtype.

    Low-level launcher (``muscle_fast.nf4.matmul_4bit`` validates a ``QuantState`` and calls this).
    ``x`` is 2-D ``[M, K]`` with unit column stride; ``absmax``/``code2``/``absmax2``/``offset`` as in
    ``dequantize_4bit_packed``. ``split_k``: K splits (default ``default_split_k``).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"x must be 2-D with unit column stride, got shape {tuple(x.shape)} strides {x.stride()}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype must be fp16, bf16 or fp32, got {x.dtype}")
    m, k = x.shape
    if k % 2:
        raise ValueError(f"the fused 4-bit matmul needs an even K (in_features), got {k}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        raise ValueError(
            f"packed must be uint8 with {n * k // 2} bytes for [{n}, {k}], "
            f"got {packed.numel()} {packed.dtype}"
        )
    nested = code2 is not None
    code2, absmax2, offset = check_scale_args(
        absmax, code, code2, absmax2, offset, -(-(n * k) // blocksize), blocksize2
    )
    check_device(x, packed, absmax, code, code2, absmax2, offset)
    devices = {t.device for t in (x, packed, absmax, code, code2, absmax2, offset)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    split_k = default_split_k(m, n, k) if split_k is None else split_k
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=x.dtype, device=x.device)

    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    block_m = 1 if m <= GEMV_MAX_M else DOT_BLOCK_M
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split_k, triton.cdiv(m, block_m))  # noqa: E731
    _matmul_4bit_kernel[grid](
        x, packed, absmax, code, code2, absmax2, offset, part,
        m, n, k, k // 2, x.stride(0), blocksize2,
        BS=blocksize, NESTED=nested, SPLIT_K=split_k, UPCAST=upcast_dot(x.dtype),
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
        enable_fp_fusion=False,  # bitsandbytes rounds code2*absmax2 before adding offset
    )  # fmt: skip
    out = part[0] if split_k == 1 else part.sum(0)  # fixed order: deterministic
    return out.to(x.dtype)
