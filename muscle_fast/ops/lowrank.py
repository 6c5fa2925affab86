"""Autograd wiring of the multi-scale low-rank linear (SPEC §2), backend-agnostic.

One ``torch.autograd.Function`` owns the frozen base GEMM and the low-rank
path, so the low-rank output is added into the base output in place and the
low-rank input gradient into the base input gradient in place. It saves only
x and S = (x @ A^T) * scale (plus the small adapter weights): not y0, not a
dropped-out copy of x (the dropout mask is regenerated from a seed).

The same function runs the torch ops (``lowrank_torch``) or the Triton
launchers (``muscle_fast.kernels.lowrank``): they share signatures.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import lowrank_torch


class _SplitState:
    """The active row split. Process-wide, not thread-local: on CUDA, autograd runs backward on its
    own device thread, and reentrant activation checkpointing re-runs the layers' forward there; a
    thread-local split would be invisible to that recompute (reference gradients silently lost)."""

    split: tuple[int, Callable[..., None], int | None] | None = None


_state = _SplitState()


def _fused_4bit_max_m() -> int:
    raw = os.environ.get("MUSCLE_FAST_FUSED_4BIT_MAX_M", "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"MUSCLE_FAST_FUSED_4BIT_MAX_M must be an integer >= 0, got {raw!r}")
    return value


#: Input rows up to which a 4-bit base's forward runs the fused dequantize + matmul kernel
#: (``muscle_fast.nf4.matmul_4bit``: the 16-bit weight is never written) instead of dequantize +
#: cuBLAS. 0, i.e. off, until a GPU benchmark shows it faster (bench_nf4.py::test_small_m_matmul);
#: ``MUSCLE_FAST_FUSED_4BIT_MAX_M`` sets it at import. The backward is the same either way.
FUSED_4BIT_MAX_M: int = _fused_4bit_max_m()


def get_ops(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> ModuleType:
    """The op table for a resolved backend ("auto", "torch" or "triton"), a device and a compute dtype.

    "auto" takes the torch path off CUDA and for float64, which the kernels do not take (the
    torch path is exact there; "triton" with float64 stays an error naming the dtype)."""
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or dtype == torch.float64)):
        return lowrank_torch
    from muscle_fast.kernels import lowrank as lowrank_triton  # lazy: TRITON_INTERPRET is read at import

    return lowrank_triton


# --------------------------------------------------------------------------------------------------
# Row groups for single-pass gradient alignment (SPEC §4)
# --------------------------------------------------------------------------------------------------

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
    if total is not None and lead != total:
        raise RuntimeError(
            f"single-pass gradient alignment: {getattr(module, 'name', '') or type(module).__name__} "
            f"got input of shape {tuple(x.shape)}, whose leading dim is not the batch size {total}"
        )
    return n_split * (rows // max(1, lead))


# --------------------------------------------------------------------------------------------------
# Frozen base weights as a (N, K) matrix
# --------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(
        module
    ).__module__.startswith("bitsandbytes")


def base_kind(module: nn.Module) -> str | None:
    """ "linear", "conv1d", "4bit", or None for a layer MuScleLinear cannot wrap."""
    if _is_linear4bit(module):
        return "4bit"
    if type(module).__module__.startswith("bitsandbytes"):
        return None  # 8-bit and other quantized layers: their weight is not a plain matrix
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) and module.weight.is_floating_point():
        return "linear"
    return None


def base_weight(module: nn.Module, kind: str, dtype: torch.dtype, kernels: bool = True) -> torch.Tensor:
    """The base layer's weight as an (N, K) matrix in ``dtype`` (a view where possible).

    ``kernels``: a 4-bit weight is dequantized by the Triton kernel where it can run; False (the
    layer's torch backend) takes the exact torch path, so a backend choice covers the whole layer.
    """
    if kind == "linear":
        w = module.weight
    elif kind == "conv1d":
        w = module.weight.t()
    elif kind == "4bit":
        return _dequantize_4bit(module, dtype, kernels)
    else:  # pragma: no cover - guarded by MuScleLinear
        raise TypeError(kind)
    return w if w.dtype == dtype else w.to(dtype)


_workspace: dict[tuple, torch.Tensor] = {}
# per 4-bit module: its dequantization with the arguments checked once (host time per call)
_prepared: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def free_4bit_workspaces() -> None:
    """Release the shared dequantization buffers and per-layer prepared launches of 4-bit layers.

    They outlive the model (one buffer per weight shape, dtype and device: ~90 MB per shape for a
    7B model in bf16); call this after ``del model`` to hand the memory back. The next forward of a
    4-bit layer allocates again."""
    _workspace.clear()
    _prepared.clear()


def _dequantize_4bit(module: nn.Module, dtype: torch.dtype, kernels: bool = True) -> torch.Tensor:
    """The dequantized weight, written into a workspace reused by every 4-bit layer of that shape.

    Forward and backward use the weight at once and drop it, so one buffer per (shape, dtype,
    device) serves all layers; nothing of size N x K stays alive between forward and backward.
    The buffer makes the 4-bit path single-threaded per device: layers of one shape must not run
    their forwards/backwards concurrently from several threads (or streams) on the same device.
    ``free_4bit_workspaces()`` releases the buffers (e.g. after ``del model``).
    """
    from muscle_fast.nf4 import PreparedDequant4bit, dequantize_4bit_ref

    w = _standard_4bit_weight(module)
    qs = w.quant_state
    from muscle_fast.kernels._common import kernels_run_on

    # Results are read from the ``out`` buffer, never from the return value: a packed weight stored
    # as [1, 1] (a 2-element layer) would get bitsandbytes' back-compat transpose there.
    if not (kernels and kernels_run_on(w.device)):
        out = torch.empty(tuple(qs.shape), dtype=dtype, device=w.device)
        dequantize_4bit_ref(w.data, qs, dtype=dtype, out=out)  # the exact torch path
        return out
    key = (tuple(qs.shape), dtype, w.device)
    buf = _workspace.get(key)
    if buf is None:
        buf = _workspace[key] = torch.empty(tuple(qs.shape), dtype=dtype, device=w.device)
    prepared = _prepared.get(module)
    if prepared is None or not prepared.matches(w.data, qs, buf):
        _prepared[module] = PreparedDequant4bit(w.data, qs, dtype, buf)  # fills buf
    else:
        prepared()
    return buf


def _standard_4bit_weight(module: nn.Module) -> nn.Parameter:
    """The Linear4bit's weight in bitsandbytes' standard packed layout, with its quant_state."""
    w = module.weight
    if getattr(w, "quant_state", None) is None:
        # FSDP (and anything else that re-wraps the Parameter) drops the state; bitsandbytes' own
        # forward restores it from the module, so do the same rather than fail where it works
        qs = getattr(module, "quant_state", None)
        if qs is None:
            raise RuntimeError(
                f"{type(module).__name__}({module.in_features}, {module.out_features}): the 4-bit weight has "
                "no quant_state (neither weight.quant_state nor module.quant_state); was it quantized "
                "(moved to its device)?"
            )
        if type(w).__name__ != "Params4bit":
            from bitsandbytes.nn import Params4bit

            w = module.weight = Params4bit(
                w.data, requires_grad=False, quant_storage=w.dtype, bnb_quantized=True, module=module
            )
        w.quant_state = qs
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference path repacked this weight; restore the standard layout, as its
        # own state_dict saving does
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return w


def _fused_4bit_forward(base: nn.Module, kind: str, x2: torch.Tensor, kernels: bool) -> bool:
    m = x2.shape[0]
    if not kernels or kind != "4bit" or m == 0 or m > FUSED_4BIT_MAX_M or x2.shape[-1] % 2:
        return False
    from muscle_fast.kernels._common import kernels_run_on

    return kernels_run_on(x2.device)


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
        ops: ModuleType,
        dropout_p: float,
        seed: int,
        split: tuple[int, RefSink, int | None] | None,
        module: nn.Module,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        dtype = x.dtype
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        Ac, Bc = A.to(dtype), B.to(dtype)
        S = ops.lowrank_shrink(x2, Ac, scale, dropout_p=dropout_p, seed=seed)
        kernels = ops is not lowrank_torch
        if _fused_4bit_forward(base, kind, x2, kernels):  # small M: no 16-bit copy of the weight at all
            from muscle_fast.nf4 import matmul_4bit

            w = _standard_4bit_weight(base)
            y = matmul_4bit(x2, w.data, w.quant_state, bias)
        else:
            W = base_weight(base, kind, dtype, kernels)
            y = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())
        ops.lowrank_expand_(y, S, Bc)
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
        dS, dB = ops.lowrank_backward_dS_dB(dY2, Bc, S, scale, row_split=row_split)
        dA = None
        if ctx.needs_input_grad[1] or sink is not None:
            dA = ops.lowrank_grad_A(dS, x2, row_split=row_split, dropout_p=dropout_p, seed=seed)
        dX = None
        if ctx.needs_input_grad[0]:
            W = base_weight(base, kind, x2.dtype, ops is not lowrank_torch)
            dX = dY2 @ W
            ops.lowrank_dx_(dX, dS, Ac, dropout_p=dropout_p, seed=seed)
            dX = dX.reshape(*dY.shape[:-1], dX.shape[-1])
        if sink is not None and row_split is not None:
            sink(module, dA[1], dB[1])
        gA = dA[0].to(a_dtype) if ctx.needs_input_grad[1] else None
        gB = dB[0].to(b_dtype) if ctx.needs_input_grad[2] else None
        return dX, gA, gB, None, None, None, None, None, None, None, None
