"""The frozen GEMM of a low-rank layer with its low-rank term fused in: one pass, no M x N temporary.

    out (M, N) = P (M, K) @ Q (K, N) + rnd(U (M, R) @ V (R, N) + bias (N,))

Forward: P = x, Q = W.T, U = S, V = B.T (y = x W^T + b + S B^T). Input gradient: P = dY, Q = W, U = dS,
V = A (dX = dY W + dS A). ``rnd`` rounds to the output dtype: the sum is what the cuBLAS composition of
``backend="auto"`` computes (``torch.addmm(bias, U, V)`` rounded to the output dtype, then the frozen
GEMM accumulating into it with beta = 1), up to fp32 summation order, so either can run at a shape
(``muscle_fast.ops.lowrank``: measured per shape). The composition writes and reads the M x N low-rank
term once more than this kernel (2MN 16-bit elements per GEMM).

Each program computes one (BLOCK_M, BLOCK_N) tile (or, ``PERSISTENT``, one program per SM takes
every SM-count-th tile in a flattened loop, overlapping a tile's store with the next one's loads; the
autotuner picks per shape): first the low-rank term (a K = R dot from U and V in
L2, plus the bias), rounded once and kept in the fp32 accumulator, then the K loop of the frozen GEMM on
top of it, then one store. P, Q and the output go through TMA tensor descriptors (Hopper's bulk copies,
pipelined ``num_stages`` deep); U, V and the bias are small pointer loads. Q is read in whichever layout
has unit column stride: (K, N) rows as given, or (N, K) rows (``TRANS_Q``, the Linear weight W) with the
tile transposed in registers. Programs walk the tiles in groups of ``GROUP_M`` row blocks, so that a
group reuses Q's column blocks from L2.

TMA needs 16-byte aligned base pointers and row strides and a unit column stride: ``tma_compatible``
says whether tensors qualify; the launcher raises otherwise.

Under Triton's CPU interpreter bf16 ``tl.dot`` is broken, so ``UPCAST`` casts bf16 operands to fp32
there (exact). fp32 operands use IEEE fp32 dots (not tf32), as torch's matmul with TF32 off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs
from ._common import block_r, check_device, launch_guard, sm_count, upcast_dot

__all__ = ["MAX_R", "launch_linear_lowrank", "linear_lowrank", "tma_compatible"]

#: Largest rank: the U and V tiles take (BLOCK_M + BLOCK_N) x BLOCK_R 16-bit elements of shared memory
#: beside the pipeline's, within the 227 KiB of an sm_90 block at 64 (tests/test_compile_sm90.py).
MAX_R = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (3 under the interpreter: several tiles each)."""
    return sm_count(device.index if device.index is not None else 0) if device.type == "cuda" else 3


def _set_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["p_desc"].block_shape = [bm, bk]
    nargs["q_desc"].block_shape = [bn, bk] if nargs["TRANS_Q"] else [bk, bn]
    nargs["out_desc"].block_shape = [bm, bn]


@triton.jit
def _tile(
    tile, p_desc, q_desc, out_desc, u_ptr, v_ptr, bias_ptr, M, N, K, R,
    stride_um, stride_ur, stride_vr, stride_vn, stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, TRANS_Q: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Output tile ``tile`` (grouped order): rnd(U @ V + bias) into the fp32 accumulator, then += P @ Q
    over K, one store."""
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    off_m = (first_m + (tile % in_group) % size_m) * BLOCK_M
    off_n = ((tile % in_group) // size_m) * BLOCK_N
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=(rows < M)[:, None] & (offs_r < R)[None, :], other=0.0)
    v = tl.load(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                mask=(offs_r < R)[:, None] & (cols < N)[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if F32_DOT:
        acc = tl.dot(u.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(u, v, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    # cuBLAS's beta = 1 operand is the low-rank term already stored in the output dtype
    acc = acc.to(OUT_DTYPE).to(tl.float32)
    for k in range(0, K, BLOCK_K):
        p = p_desc.load([off_m, k])
        if TRANS_Q:
            q = q_desc.load([off_n, k]).T
        else:
            q = q_desc.load([k, off_n])
        if F32_DOT:
            acc = tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
    out_desc.store([off_m, off_n], acc.to(OUT_DTYPE))


def _bench(kernel_call: Callable[[], object], quantiles: list[float]) -> Any:
    """The autotuner's timing of one config: 5 ms of warm-up and 25 ms of runs instead of Triton's 25 and
    100, so that a new key costs about 0.2 s for the 7 configs, not 1 s (a run meets a few keys per layer
    shape, one per row bucket); a layer-sized GEMM still runs 10 times or more."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.autotune(
    configs=configs.triton_configs("lowrank.linear", pre_hook=_set_blocks),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "TRANS_Q", "HAS_BIAS"],
    do_bench=_bench,
)
@triton.jit
def _linear_lowrank_kernel(
    p_desc, q_desc, out_desc, u_ptr, v_ptr, bias_ptr,
    M, N, K, R, M_BUCKET,
    stride_um, stride_ur, stride_vr, stride_vn, stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, TRANS_Q: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
    OUT_DTYPE: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One output tile per program, or (``PERSISTENT``) one program per SM walking the tiles in a
    flattened loop, so that the next tile's loads overlap this tile's store."""
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            _tile(tile, p_desc, q_desc, out_desc, u_ptr, v_ptr, bias_ptr, M, N, K, R,
                  stride_um, stride_ur, stride_vr, stride_vn, stride_bias,
                  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, TRANS_Q, HAS_BIAS, F32_DOT, OUT_DTYPE)
    else:
        _tile(tl.program_id(0), p_desc, q_desc, out_desc, u_ptr, v_ptr, bias_ptr, M, N, K, R,
              stride_um, stride_ur, stride_vr, stride_vn, stride_bias,
              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, TRANS_Q, HAS_BIAS, F32_DOT, OUT_DTYPE)


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether each 2-D tensor can back a TMA descriptor, as is or transposed: 16-byte aligned base,
    one unit stride and the other a multiple of 16 bytes that steps past a whole row (no zero or
    overlapping strides: a broadcast row is not a matrix to TMA)."""
    for t in tensors:
        size = t.element_size()
        if t.dim() != 2 or t.data_ptr() % 16:
            return False
        (s0, s1), (n0, n1) = t.stride(), t.shape
        if not (
            (s1 == 1 and (s0 * size) % 16 == 0 and s0 >= n1)
            or (s0 == 1 and (s1 * size) % 16 == 0 and s1 >= n0)
        ):
            return False
    return True


def linear_lowrank(P: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out = P @ Q + rnd(U @ V + bias) in P's dtype (module docstring); all operands share that dtype.

    P (M, K) and Q (K, N) must be TMA-compatible (``tma_compatible``; Q may be a transposed view, as
    ``W.t()``), and N and K multiples of 16 bytes of elements so the output rows are too."""
    check_device(P, Q, U, V, *(() if bias is None else (bias,)))
    for name, t in (("P", P), ("Q", Q), ("U", U), ("V", V), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in _DTYPES or t.dtype != P.dtype:
            raise TypeError(f"linear_lowrank: {name} must be float32/float16/bfloat16 like P ({P.dtype}), "
                            f"got {t.dtype}")  # fmt: skip
        if t.dim() != (1 if name == "bias" else 2):
            raise ValueError(f"linear_lowrank: {name} has shape {tuple(t.shape)}, expected "
                             f"{'1' if name == 'bias' else '2'}-D")  # fmt: skip
    M, K = P.shape
    N = Q.shape[1]
    R = U.shape[1]
    want = {"Q": (K, N), "U": (M, R), "V": (R, N), "bias": (N,)}
    for name, t in (("Q", Q), ("U", U), ("V", V), ("bias", bias)):
        if t is not None and tuple(t.shape) != want[name]:
            raise ValueError(f"linear_lowrank: {name} has shape {tuple(t.shape)}, expected {want[name]} "
                             f"(P is {M} x {K})")  # fmt: skip
    if R > MAX_R:
        raise ValueError(f"linear_lowrank: rank {R} > {MAX_R}: the U and V tiles would not fit shared memory")
    if P.stride(1) != 1 or not tma_compatible(P, Q) or (N * P.element_size()) % 16:
        raise ValueError(
            f"linear_lowrank: P (strides {P.stride()}) needs unit column stride, P and Q (strides "
            f"{Q.stride()}) 16-byte aligned rows or columns and N * itemsize ({N} * {P.element_size()}) "
            f"a multiple of 16 for the TMA descriptors; use the cuBLAS composition for these"
        )
    return launch_linear_lowrank(P, Q, U, V, bias)


@launch_guard("P")
def launch_linear_lowrank(P: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                          bias: torch.Tensor | None = None, *,
                          config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """``linear_lowrank`` without its argument checks (the caller holds its invariants). ``config``
    (one entry of ``configs.CONFIGS["lowrank.linear"]``) launches that config instead of the autotuned
    one: for tests of every code path and for timing one config."""
    M, K = P.shape
    N = Q.shape[1]
    R = U.shape[1]
    out = torch.empty((M, N), dtype=P.dtype, device=P.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # no descriptor for an empty operand: the rounded low-rank term is the result
        lr = torch.zeros((M, N), dtype=torch.float32, device=P.device)
        if R:
            lr.addmm_(U.float(), V.float())
        if bias is not None:
            lr += bias.float()
        return out.copy_(lr)  # one rounding, as the kernel's of the low-rank term
    trans_q = Q.stride(1) != 1  # Q = W.t(): read W's (N, K) rows
    dummy = [16, 16]  # block shapes are set per config by _set_blocks
    p_desc = TensorDescriptor(P, [M, K], [P.stride(0), 1], dummy)
    if trans_q:
        q_desc = TensorDescriptor(Q.t(), [N, K], [Q.stride(1), 1], dummy)
    else:
        q_desc = TensorDescriptor(Q, [K, N], [Q.stride(0), 1], dummy)
    out_desc = TensorDescriptor(out, [M, N], [N, 1], dummy)

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _programs(P.device)) if meta["PERSISTENT"] else tiles,)

    args = (
        p_desc, q_desc, out_desc, U, V, P if bias is None else bias,
        M, N, K, R, 1 << (M - 1).bit_length(),
        U.stride(0), U.stride(1), V.stride(0), V.stride(1), 1 if bias is None else bias.stride(0),
    )  # fmt: skip
    flags = dict(
        BLOCK_R=block_r(R), TRANS_Q=trans_q, HAS_BIAS=bias is not None,
        F32_DOT=P.dtype == torch.float32 or upcast_dot(P.dtype), OUT_DTYPE=_TL[P.dtype],
    )  # fmt: skip
    if config is None:
        _linear_lowrank_kernel[grid](*args, **flags)
    else:
        meta = configs.meta(config)
        _set_blocks({"p_desc": p_desc, "q_desc": q_desc, "out_desc": out_desc, "TRANS_Q": trans_q, **meta})
        _linear_lowrank_kernel.fn[grid({**meta})](
            *args, **flags, **meta, num_warps=config["num_warps"], num_stages=config["num_stages"]
        )
    return out
