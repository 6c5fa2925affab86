"""The multi-scale low-rank linear (SPEC §2): torch reference, dispatch and autograd wiring.

Kernels: ``csrc_triton/lowrank.py``. Reference: the pure-PyTorch twins below, with the same
signatures and semantics as the Triton launchers (they accumulate in place with ``addmm_`` and skip
M x N temporaries, so they are also the fast CPU path). fp16 is the exception: its range (65504)
cannot hold the low-rank intermediates or the weight-gradient sums the kernels keep in fp32, so fp16
operands are upcast and results rounded once.

One ``torch.autograd.Function`` owns the frozen base GEMM and the low-rank path, so the low-rank
output is added into the base output in place and the low-rank input gradient into the base input
gradient in place. It saves only x and S = (x @ A^T) * scale (plus the small adapter weights): not
y0, not a dropped-out copy of x (the dropout mask is regenerated from a seed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from . import measure, nf4
from .dispatch import KERNEL_DTYPES, resolve_backend, use_kernels

# --------------------------------------------------------------------------------------------------
# Reference: pure-PyTorch twins of the csrc_triton.lowrank launchers
# --------------------------------------------------------------------------------------------------


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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Dtype of intermediates and weight gradients: float32 like the kernels' accumulators, except
    that float64 stays float64 (the exact reference path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: torch.mm(..., out_dtype=float32) on 16-bit CUDA operands (torch >= 2.8): cuBLAS writes its fp32
#: accumulator instead of a 16-bit rounding of it.
_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


@functools.cache
def _fp32_out(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on this device: torch >= 2.8, CUDA (not
    ROCm, which refuses it), compute capability 8.0 or more (cuBLAS's bf16 GEMMs)."""
    return (
        _MM_OUT_DTYPE
        and device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in ``_acc`` of a's dtype; for bf16 where cuBLAS can (``_fp32_out``) straight from its fp32
    accumulator, so the torch path's S, dS, dA and dB carry no bf16 rounding there (elsewhere the
    16-bit product is cast)."""
    acc = _acc(a.dtype)
    if a.dtype == torch.bfloat16 and a.is_cuda and _fp32_out(a.device):
        return torch.mm(a, b, out_dtype=acc)
    return (a @ b).to(acc)


def _grouped_tn(a: torch.Tensor, b: torch.Tensor, groups: list[slice]) -> torch.Tensor:
    """out[g] = a[rows_g]^T @ b[rows_g], (G, a.shape[1], b.shape[1]) in ``_acc`` of a's dtype."""
    a, b = _wide(a), _wide(b)
    out = torch.empty((len(groups), a.shape[1], b.shape[1]), dtype=_acc(a.dtype), device=a.device)
    for g, rows in enumerate(groups):
        if a.dtype == out.dtype:
            torch.mm(a[rows].t(), b[rows], out=out[g])
        else:
            out[g].copy_(_mm_acc(a[rows].t(), b[rows]))
    return out


def lowrank_shrink(
    x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """S = (drop(x) @ A^T) * scale, (M, R) in float32 (float64 for float64 x)."""
    xd = _wide(_dropped(x, dropout_p, seed))
    return _mm_acc(xd, A.to(xd.dtype).t()).mul_(scale)


def lowrank_expand_(y: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y += S @ B^T in place."""
    if y.dtype == torch.float32:
        return y.addmm_(S, B.float().t())
    if y.dtype == torch.float16:
        return y.copy_(y.float().addmm_(S, B.float().t()))  # one rounding, as the kernel does
    return y.addmm_(S.to(y.dtype), B.to(y.dtype).t())


def lowrank_backward_dS_dB(
    dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *, row_split: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = (dY @ B) * scale (M, R) and dB = dY^T @ S per row group, (G, N, R), both float32
    (float64 for float64 dY)."""
    dY = _wide(dY)
    dS = _mm_acc(dY, B.to(dY.dtype)).mul_(scale)
    groups = _groups(dY.shape[0], row_split)
    return dS, _grouped_tn(dY, S.to(dY.dtype), groups)


def lowrank_grad_A(
    dS: torch.Tensor, x: torch.Tensor, *, row_split: int | None = None, dropout_p: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """dA = dS^T @ drop(x) per row group, (G, R, K) float32 (float64 for float64 x)."""
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
    return dX.add_(_dropped((dS @ A.to(dS.dtype)).to(dX.dtype), dropout_p, seed))


# --------------------------------------------------------------------------------------------------
# Op table and dispatch
# --------------------------------------------------------------------------------------------------


class LowRankOps(NamedTuple):
    """One implementation of the five low-rank steps; ``kernels`` tells the Triton ones apart.

    ``accumulate``: compute the two M x N low-rank terms (``S @ B^T`` and ``dS @ A``) with cuBLAS
    first and let the frozen base GEMM add itself into them (``addmm_``, beta = 1) instead of
    running ``expand_`` / ``dx_`` as a read-modify-write pass over the base GEMM's output. Only for
    bf16 and fp32 (fp16 cannot hold S, see above) and, for dX, without dropout (the mask lives in
    the kernels); elsewhere ``expand_`` / ``dx_`` run as usual.
    """

    shrink: Callable[..., torch.Tensor]
    expand_: Callable[..., torch.Tensor]
    backward_dS_dB: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    grad_A: Callable[..., torch.Tensor]
    dx_: Callable[..., torch.Tensor]
    dropout_mask: Callable[..., torch.Tensor]  # the keep-mask the other steps regenerate (for tests)
    kernels: bool
    accumulate: bool = False
    measured: bool = False  # "auto": pick our kernels or the library's per shape (accumulate_ops)
    # With ``accumulate``: y = x W^T + b + S B^T and dX = dY W + dS A from the rounded S / dS, by the
    # cuBLAS composition (``compose_linear``, ``compose_dx``) or, where measured faster, one fused GEMM.
    linear: Callable[..., torch.Tensor] | None = None
    linear_dx: Callable[..., torch.Tensor] | None = None


TORCH_OPS = LowRankOps(
    lowrank_shrink, lowrank_expand_, lowrank_backward_dS_dB, lowrank_grad_A, lowrank_dx_, dropout_mask, False
)

#: Compute dtypes for which ``accumulate`` computes the low-rank term with cuBLAS (module docstring).
_ACCUMULATE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def triton_ops() -> LowRankOps:
    """The Triton launchers (imported on first use: ``TRITON_INTERPRET`` is read when triton loads).

    The unchecked ``launch_*`` entry points: ``MuScleLinearFunction`` holds their invariants (A, B and
    the fp32 scale vector are fixed per weight and cast to x's dtype, x's last dim is checked by
    ``MuScleLinear``), so the per-call shape and dtype checks of the public launchers (~8 us of host
    time each) are not repeated on every call."""
    from csrc_triton import lowrank as k

    return LowRankOps(
        k.launch_shrink,
        k.launch_expand_,
        k.launch_backward_dS_dB,
        k.launch_grad_A,
        k.launch_dx_,
        k.dropout_mask,
        True,
    )


def _twin_exact(t: torch.Tensor) -> bool:
    """Whether the cuBLAS twin sums what the kernel sums, in fp32, for operands like ``t``: bf16 products
    written in fp32 (``_fp32_out``; the CPU only in tests, where they are rounded), fp32 without TF32."""
    if t.dtype == torch.float32:
        return measure.fp32_matmul_ieee()
    return t.dtype == torch.bfloat16 and (not t.is_cuda or _fp32_out(t.device))


def _shrink_key(x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0,
                seed: int = 0) -> tuple | None:  # fmt: skip
    if dropout_p > 0.0 or not _twin_exact(x):  # the dropout mask lives in the kernels
        return None
    return (x.device, x.dtype, A.dtype, measure.bucket(x.shape[0]), x.shape[1], A.shape[0])


def _dS_dB_key(dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *,
               row_split: int | None = None) -> tuple | None:  # fmt: skip
    if S.dtype != dY.dtype or not _twin_exact(dY):  # an fp32 S (4-bit fused forward): the kernel's hi + lo
        return None
    return (dY.device, dY.dtype, measure.bucket(dY.shape[0]), dY.shape[1], B.shape[1], row_split is None)


def _grad_A_key(dS: torch.Tensor, x: torch.Tensor, *, row_split: int | None = None, dropout_p: float = 0.0,
                seed: int = 0) -> tuple | None:  # fmt: skip
    if dropout_p > 0.0 or dS.dtype != x.dtype or not _twin_exact(x):
        return None
    return (x.device, x.dtype, measure.bucket(x.shape[0]), x.shape[1], dS.shape[1], row_split is None)


def _no_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The twin as the kernel runs: a backward under autocast would cast its fp32 products to 16 bits."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        device_type = args[0].device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def compose_linear(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, Sc: torch.Tensor,
                   Bc: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """y = x2 @ W^T + (bias + Sc @ Bc^T) by cuBLAS: the low-rank term first (K = R, written once), then the
    frozen GEMM accumulating into it (beta = 1) instead of a read-modify-write ``expand_`` pass."""
    y = torch.mm(Sc, Bc.t()) if bias is None else torch.addmm(bias, Sc, Bc.t())
    return y.addmm_(x2, W.t())


def compose_dx(dY2: torch.Tensor, W: torch.Tensor, dSc: torch.Tensor, Ac: torch.Tensor) -> torch.Tensor:
    """dX = dY2 @ W + dSc @ Ac by cuBLAS, the frozen GEMM accumulating into the low-rank term."""
    return torch.mm(dSc, Ac).addmm_(dY2, W)


@functools.cache
def _fused_gemm() -> Any:
    """``csrc_triton.lowrank_linear``, or None where this Triton has no host-side TMA descriptors (the
    composition then runs alone)."""
    try:
        from csrc_triton import lowrank_linear
    except ImportError as exc:  # triton < 3.4: no triton.tools.tensor_descriptor
        logging.getLogger(__name__).info("fused low-rank GEMM unavailable (%s)", exc)
        return None
    return lowrank_linear


def _fused_linear(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, Sc: torch.Tensor,
                  Bc: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return _fused_gemm().launch_linear_lowrank(x2, W.t(), Sc, Bc.t(), bias)


def _fused_dx(dY2: torch.Tensor, W: torch.Tensor, dSc: torch.Tensor, Ac: torch.Tensor) -> torch.Tensor:
    return _fused_gemm().launch_linear_lowrank(dY2, W, dSc, Ac)


#: Rows below which the fused GEMM is not offered: its smallest tile has 64 rows, and at a few rows the
#: composition's extra M x N pass costs next to nothing while each new row bucket would autotune it.
FUSED_MIN_ROWS = 128


@functools.cache
def _tma_device(device: torch.device) -> bool:
    """TMA copies and warpgroup MMA: compute capability 9.0 or more (the CPU: the interpreter, tests)."""
    return device.type != "cuda" or (
        torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _fusable(p: torch.Tensor, w: torch.Tensor, n: int, r: int) -> bool:
    """Whether the fused GEMM takes P = ``p`` and Q = ``w`` or its transpose at rank ``r``: bf16 (its
    product of two bf16 values is exact in fp32, as cuBLAS's; fp32 would need IEEE dots off the tensor
    cores, fp16 takes the expand kernels), ``FUSED_MIN_ROWS`` rows or more, an sm_90+ device, rank up to
    ``lowrank_linear.MAX_R``, TMA operands (``lowrank_linear.tma_compatible``; P row-major) and an output
    row of ``n`` elements a multiple of 16 bytes."""
    if p.dtype != torch.bfloat16 or p.shape[0] < FUSED_MIN_ROWS or n % 8 or p.stride(1) != 1:
        return False
    gemm = _fused_gemm()
    if gemm is None or r > gemm.MAX_R or not _tma_device(p.device):
        return False
    return gemm.tma_compatible(p, w)


def _linear_key(x2: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, Sc: torch.Tensor,
                Bc: torch.Tensor) -> tuple | None:  # fmt: skip
    if not _fusable(x2, W, W.shape[0], Sc.shape[1]):
        return None
    return (x2.device, x2.dtype, measure.bucket(x2.shape[0]), x2.shape[1], W.shape[0], Sc.shape[1],
            bias is not None, W.stride(1) == 1)  # fmt: skip


def _dx_key(dY2: torch.Tensor, W: torch.Tensor, dSc: torch.Tensor, Ac: torch.Tensor) -> tuple | None:
    if not _fusable(dY2, W, W.shape[1], dSc.shape[1]):
        return None
    return (dY2.device, dY2.dtype, measure.bucket(dY2.shape[0]), dY2.shape[1], W.shape[1], dSc.shape[1],
            W.stride(1) == 1)  # fmt: skip


@functools.cache
def accumulate_ops() -> LowRankOps:
    """``backend="auto"`` on CUDA: the two M x N low-rank terms as cuBLAS GEMMs the frozen GEMM
    accumulates into, and each reduction (shrink, dS/dB, grad A) by whichever is faster at the shape,
    its Triton kernel (one pass over x or dY) or its cuBLAS twin (the torch path's function), measured
    on the first call per shape (``muscle_fast.ops.measure``; ``MUSCLE_FAST_PICK`` pins it). Only where
    the twin sums what the kernel sums (``_twin_exact``: bf16 with fp32 cuBLAS output, fp32 without
    TF32) and uses no dropout mask; elsewhere the Triton kernels run. The frozen GEMM with its low-rank
    term (forward, and dX without dropout) is measured the same way, in bf16, between that cuBLAS
    composition and one fused Triton GEMM (``csrc_triton/lowrank_linear.py``: the same rounding, without
    the M x N temporary's write and read)."""
    k = triton_ops()

    def pick(op: str, kernel: Callable[..., Any], twin: Callable[..., Any], key: Callable[..., Any]):
        return measure.Measured(
            f"lowrank.{op}",
            {"triton": kernel, "cublas": _no_autocast(twin)},
            key,
            "triton",
            reference="cublas",  # the kernel is checked against the library, not the other way round
            probe=measure.random_args,  # B = 0 at LoRA's first step: dS would be zero
        )

    def gemm(op: str, composed: Callable[..., Any], fused: Callable[..., Any], key: Callable[..., Any]):
        return measure.Measured(
            f"lowrank.{op}", {"cublas": composed, "fused": fused}, key, "cublas", probe=measure.random_args
        )

    return k._replace(
        shrink=pick("shrink", k.shrink, lowrank_shrink, _shrink_key),
        backward_dS_dB=pick("backward_dS_dB", k.backward_dS_dB, lowrank_backward_dS_dB, _dS_dB_key),
        grad_A=pick("grad_A", k.grad_A, lowrank_grad_A, _grad_A_key),
        accumulate=True,
        measured=True,
        linear=gemm("linear", compose_linear, _fused_linear, _linear_key),
        linear_dx=gemm("linear_dx", compose_dx, _fused_dx, _dx_key),
    )


def measured_choices() -> dict[str, list[dict[str, Any]]]:
    """What ``backend="auto"`` chose per reduction, and per 4-bit weight's dequantization, and shape so
    far, with the measured times."""
    steps: list[Any] = [nf4._dequantize_into, nf4.small_m_linear]
    if accumulate_ops.cache_info().currsize:  # built only where "auto" ran on CUDA (imports triton)
        ops = accumulate_ops()
        steps[:0] = [ops.shrink, ops.backward_dS_dB, ops.grad_A, ops.linear, ops.linear_dx]
    return measure.choices(*(f for f in steps if isinstance(f, measure.Measured)))


def get_ops(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> LowRankOps:
    """The implementation ``muscle_fast.ops.dispatch`` picks for this backend, device and dtype:
    the torch path, ``triton_ops()`` for ``"triton"``, ``accumulate_ops()`` for ``"auto"``."""
    if not use_kernels(backend, device, (dtype,), op="MuScleLinear"):
        return TORCH_OPS
    if dtype is not None and dtype not in KERNEL_DTYPES:  # the op table's launchers do not check
        raise TypeError(
            f"MuScleLinear: backend 'triton' runs the Triton kernels, which take "
            f"float32/float16/bfloat16 inputs, got {dtype}; use backend 'torch' or 'auto' for it"
        )
    return accumulate_ops() if resolve_backend(backend) == "auto" else triton_ops()


def rounds_intermediates(ops: LowRankOps, dtype: torch.dtype) -> bool:
    """Whether S and dS are rounded to the compute dtype once, right after their kernels.

    The accumulate path multiplies them with B and A in cuBLAS in that dtype; the backward's reductions
    then take the same rounded S and dS (one tensor-core dot each, no hi + lo split): dB is the
    exact gradient of the forward that ran, dA carries the torch path's rounding (docs/kernels.md)."""
    return ops.accumulate and dtype in _ACCUMULATE_DTYPES


def base_plus_lowrank(
    ops: LowRankOps,
    x2: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    S: torch.Tensor,
    Bc: torch.Tensor,
) -> torch.Tensor:
    """y = x2 @ W^T + bias + S @ Bc^T, in the order ``ops.accumulate`` asks for."""
    if rounds_intermediates(ops, x2.dtype):
        return (ops.linear or compose_linear)(x2, W, bias, S.to(x2.dtype), Bc)
    y = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())
    return ops.expand_(y, S, Bc)


def input_grad(
    ops: LowRankOps,
    dY2: torch.Tensor,
    W: torch.Tensor,
    dS: torch.Tensor,
    Ac: torch.Tensor,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """dX = dY2 @ W + drop'(dS @ Ac), in the order ``ops.accumulate`` asks for."""
    if dropout_p == 0.0 and rounds_intermediates(ops, dY2.dtype):
        dx = ops.linear_dx or compose_dx
        if torch.is_autocast_enabled(dY2.device.type):  # a backward run under autocast: keep dY2's dtype
            with torch.autocast(dY2.device.type, enabled=False):
                return dx(dY2, W, dS.to(dY2.dtype), Ac)
        return dx(dY2, W, dS.to(dY2.dtype), Ac)
    return ops.dx_(dY2 @ W, dS, Ac, dropout_p=dropout_p, seed=seed)


# --------------------------------------------------------------------------------------------------
# Row groups for single-pass gradient alignment (SPEC §4)
# --------------------------------------------------------------------------------------------------


class _SplitState:
    """The active row split. Process-wide, not thread-local: on CUDA, autograd runs backward on its
    own device thread, and reentrant activation checkpointing re-runs the layers' forward there; a
    thread-local split would be invisible to that recompute (reference gradients silently lost)."""

    split: tuple[int, Callable[..., None], int | None] | None = None


_state = _SplitState()


RefSink = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def split_rows(row_split: int, sink: RefSink, total: int | None = None) -> Iterator[None]:
    """Within this block, MuScleLinear forwards split their rows at sample ``row_split``.

    Samples [0, row_split) of the batch are the training batch and the rest the
    reference batch. In backward, the adapter ``.grad`` receives only the training
    rows' gradient and ``sink(module, dA_ref, dB_ref)`` the reference rows'. Inputs
    must be batch-first; with ``total`` (the concatenated batch size) a module whose
    input does not lead with it is an error rather than a silently wrong split.
    """
    prev = _state.split
    _state.split = (int(row_split), sink, total)
    try:
        yield
    finally:
        _state.split = prev


def current_split() -> tuple[int, RefSink, int | None] | None:
    return _state.split


def _row_split(x: torch.Tensor, rows: int, split: tuple[int, RefSink, int | None], module: nn.Module) -> int:
    """The split in flattened rows for an input whose leading dim is the batch."""
    n_split, _, total = split
    lead = x.shape[0] if x.dim() > 1 else 1
    name = getattr(module, "name", "") or type(module).__name__
    if total is not None and lead != total:
        raise RuntimeError(
            f"single-pass gradient alignment: {name} got input of shape {tuple(x.shape)}, whose "
            f"leading dim is not the batch size {total}"
        )
    if not 0 <= n_split <= lead:  # the kernels trust the split (their launch checks are skipped)
        raise ValueError(
            f"single-pass gradient alignment: {name} got row_split {n_split} outside [0, {lead}] "
            f"for an input of shape {tuple(x.shape)}"
        )
    return n_split * (rows // max(1, lead))


# --------------------------------------------------------------------------------------------------
# Frozen base weights as a (N, K) matrix
# --------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_kind(module: nn.Module) -> str | None:
    """ "linear", "conv1d", "4bit", or None for a layer MuScleLinear cannot wrap."""
    if nf4.is_linear4bit(module):
        return "4bit"
    if type(module).__module__.startswith("bitsandbytes"):
        return None  # 8-bit and other quantized layers: their weight is not a plain matrix
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) and module.weight.is_floating_point():
        return "linear"
    return None


def base_weight(
    module: nn.Module, kind: str, dtype: torch.dtype, kernels: bool = True, measured: bool = False
) -> torch.Tensor:
    """The base layer's weight as an (N, K) matrix in ``dtype`` (a view where possible).

    ``kernels``: a 4-bit weight is dequantized by the Triton kernel where it can run; False (the
    layer's torch backend) takes the exact torch path, so a backend choice covers the whole layer.
    ``measured`` (``backend="auto"``): by our kernel or bitsandbytes', whichever measured faster.
    """
    if kind == "linear":
        w = module.weight
    elif kind == "conv1d":
        w = module.weight.t()
    elif kind == "4bit":
        return nf4.dequantize_weight(module, dtype, kernels, measured)
    else:  # pragma: no cover - guarded by MuScleLinear
        raise TypeError(kind)
    return w if w.dtype == dtype else w.to(dtype)


# --------------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------------


class MuScleLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b + ((drop(x) @ A^T) * scale) @ B^T with the base frozen."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: torch.Tensor,
        base: nn.Module,
        kind: str,
        ops: LowRankOps,
        dropout_p: float,
        seed: int,
        split: tuple[int, RefSink, int | None] | None,
        module: nn.Module,
        casts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``casts``: A and B already in x's dtype (``MuScleLinear`` caches them between optimizer
        steps); they are not inputs of the graph, so the gradients still go to A and B."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        dtype = x.dtype
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        Ac, Bc = (A.to(dtype), B.to(dtype)) if casts is None else casts
        S = ops.shrink(x2, Ac, scale, dropout_p=dropout_p, seed=seed)
        if nf4.use_fused_forward(kind, x2, ops.kernels):  # small M: no 16-bit copy of the weight at all
            w = nf4.standard_4bit_weight(base)
            y = nf4.matmul_4bit(x2, w.data, w.quant_state, bias, backend="triton")
            ops.expand_(y, S, Bc)
        elif ops.measured and kind == "4bit" and 0 < x2.shape[0] <= nf4.SMALL_M_MAX:
            y = nf4.small_m_linear(x2, base, bias)  # decode-sized: the fastest 4-bit matmul, measured
            ops.expand_(y, S, Bc)
        else:
            if rounds_intermediates(ops, dtype):
                S = S.to(dtype)  # saved rounded too: half the bytes, and the backward's dB operand
            y = base_plus_lowrank(
                ops, x2, base_weight(base, kind, dtype, ops.kernels, ops.measured), bias, S, Bc
            )
        row_split = None if split is None else _row_split(x, x2.shape[0], split, module)
        ctx.save_for_backward(x2, Ac, Bc, scale, S)
        ctx.meta = (
            base,
            kind,
            ops,
            dropout_p,
            seed,
            row_split,
            split[1] if split else None,
            module,
            A.dtype,
            B.dtype,
        )
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dY: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, Ac, Bc, scale, S = ctx.saved_tensors
        base, kind, ops, dropout_p, seed, row_split, sink, module, a_dtype, b_dtype = ctx.meta
        dY2 = dY.reshape(-1, dY.shape[-1])
        if dY2.dtype != x2.dtype:
            dY2 = dY2.to(x2.dtype)
        dS, dB = ops.backward_dS_dB(dY2, Bc, S, scale, row_split=row_split)
        if rounds_intermediates(ops, x2.dtype):
            dS = dS.to(x2.dtype)  # one rounding for grad A and the dX product
        dA = None
        if ctx.needs_input_grad[1] or sink is not None:
            dA = ops.grad_A(dS, x2, row_split=row_split, dropout_p=dropout_p, seed=seed)
        dX = None
        if ctx.needs_input_grad[0]:
            W = base_weight(base, kind, x2.dtype, ops.kernels, ops.measured)
            dX = input_grad(ops, dY2, W, dS, Ac, dropout_p, seed)
            dX = dX.reshape(*dY.shape[:-1], dX.shape[-1])
        if sink is not None and row_split is not None:
            sink(module, dA[1], dB[1])
        gA = dA[0].to(a_dtype) if ctx.needs_input_grad[1] else None
        gB = dB[0].to(b_dtype) if ctx.needs_input_grad[2] else None
        return dX, gA, gB, None, None, None, None, None, None, None, None, None


# Deprecated location (the 4-bit workspace lives in muscle_fast.ops.nf4).
free_4bit_workspaces = nf4.free_4bit_workspaces
