"""NF4/FP4 4-bit weights: the torch reference, the dispatch to ``csrc_triton.nf4`` /
``csrc_triton.nf4_matmul``, and the 4-bit base layers of ``MuScleLinear``.

``dequantize_4bit`` is a drop-in replacement for ``bitsandbytes.functional.dequantize_4bit``.

QLoRA keeps the frozen base weights 4-bit and dequantizes them on every forward and backward;
this module does that from a bitsandbytes ``QuantState`` with one fused Triton kernel on CUDA
(double-quantized absmax decoded in the same pass) and an exact pure-torch path everywhere else.
``backend="auto"`` also measures bitsandbytes' own dequantization against ours per weight shape
(``_dequantize_into``) and runs the faster: the two write the same values.

Numerics follow bitsandbytes exactly: ``absmax = code2[q] * absmax2[b // blocksize2] + offset``
(fp32, rounded after the multiply and after the add) for double quantization, then
``value = code[nibble] * absmax`` in fp32, rounded once to the output dtype; the first of each
pair of values is the high nibble of its byte.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import torch
from torch import nn

from csrc_triton._common import NF4_BLOCKSIZES, kernels_run_on

from . import measure
from .dispatch import use_kernels

__all__ = [
    "FUSED_4BIT_MAX_M",
    "SUPPORTED_BLOCKSIZES",
    "PreparedDequant4bit",
    "dequantize_4bit",
    "dequantize_4bit_ref",
    "dequantize_weight",
    "free_4bit_workspaces",
    "get_4bit_code",
    "is_linear4bit",
    "matmul_4bit",
    "matmul_4bit_ref",
    "standard_4bit_weight",
    "use_fused_forward",
]

#: Block sizes bitsandbytes accepts for ``quantize_4bit``/``dequantize_4bit``.
SUPPORTED_BLOCKSIZES: tuple[int, ...] = NF4_BLOCKSIZES
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# bitsandbytes' tables (``get_4bit_type``), normalized the same way (fp32 divide by the max |.|).
_CODE_DATA: dict[str, list[float]] = {
    "nf4": [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    "fp4": [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
}
_code_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

#: A bitsandbytes ``QuantState`` (or anything with its fields: absmax, shape, code, blocksize,
#: quant_type, dtype, offset, state2). Typed loosely so bitsandbytes stays an optional dependency.
QuantStateLike = Any


def get_4bit_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 16-entry table of ``quant_type`` ('nf4' or 'fp4'), identical to bitsandbytes'."""
    if quant_type not in _CODE_DATA:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _code_cache:
        data = torch.tensor(_CODE_DATA[quant_type], dtype=torch.float32)
        data.div_(data.abs().max())
        _code_cache[key] = data.to(device)
    return _code_cache[key]


def _nested_inline(qs: QuantStateLike) -> bool:
    """Whether the kernel can decode this double-quantized absmax itself (the bitsandbytes default)."""
    s2 = qs.state2
    return (
        getattr(s2, "state2", None) is None
        and getattr(s2, "dtype", None) in (None, torch.float32)
        and isinstance(s2.absmax, torch.Tensor)
        and s2.absmax.dtype == torch.float32
    )


def _as_fp32_on(t: torch.Tensor | float, device: torch.device, field: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=torch.float32)
    if isinstance(t, (int, float)):
        return torch.tensor([float(t)], dtype=torch.float32, device=device)
    raise TypeError(f"{field} must be a tensor or a float, got {type(t).__name__}")


def _decode_absmax(qs: QuantStateLike, n_blocks: int, device: torch.device) -> torch.Tensor:
    """fp32 per-block absmax of a (possibly double-quantized) state, in bitsandbytes' order.

    Mirrors ``dequantize_blockwise(qs.absmax, qs.state2)`` (``code2[q] * absmax2[b]`` in fp32, cast
    to ``state2.dtype``), then ``absmax += offset`` in that dtype, then ``.float()``.
    """
    if qs.state2 is None:
        return qs.absmax.reshape(-1).to(device=device, dtype=torch.float32)
    s2 = qs.state2
    q = qs.absmax.reshape(-1).to(device)
    n2 = -(-n_blocks // s2.blocksize)
    absmax2 = _decode_absmax(s2, n2, device)
    code2 = s2.code.to(device=device, dtype=torch.float32)
    blk = torch.arange(q.numel(), device=device) // s2.blocksize
    a = (code2[q.long()] * absmax2[blk]).to(s2.dtype or torch.float32)
    a += qs.offset if not isinstance(qs.offset, torch.Tensor) else qs.offset.to(device)
    return a.float()


def _kernel_scale_args(qs: QuantStateLike, n_blocks: int, device: torch.device) -> dict[str, Any]:
    """The kernels' absmax arguments: the raw uint8 codes plus code2/absmax2/offset/blocksize2 when
    the kernel decodes the double-quantized absmax itself (bitsandbytes' default state); else the
    fp32 absmax decoded here first (plain states, and unusual nested ones: non-fp32 state2, triple
    nesting), exactly as bitsandbytes does."""
    if qs.state2 is not None and _nested_inline(qs):
        s2 = qs.state2
        return dict(
            absmax=qs.absmax.reshape(-1).to(device),
            code2=s2.code.reshape(-1).to(device=device, dtype=torch.float32),
            absmax2=s2.absmax.reshape(-1).to(device),
            offset=_as_fp32_on(qs.offset, device, "quant_state.offset").reshape(1),
            blocksize2=s2.blocksize,
        )
    return dict(absmax=_decode_absmax(qs, n_blocks, device))


def _validate(
    A: torch.Tensor, qs: QuantStateLike, dtype: torch.dtype | None, out: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[int, ...], int, torch.dtype, int]:
    """Check a call like bitsandbytes would, with errors naming the offending field.

    Returns (packed uint8 flat bytes, shape, numel, output dtype, number of quantization blocks).
    """
    if qs is None:
        raise ValueError("dequantize_4bit needs a quant_state (bitsandbytes QuantState)")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a tensor of packed 4-bit data, got {type(A).__name__}")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    if qs.blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {qs.blocksize!r}")
    if qs.shape is None:
        raise ValueError("quant_state.shape is None: the unpacked shape is needed")
    shape = tuple(int(s) for s in qs.shape)
    numel = math.prod(shape)
    if dtype is None:
        if qs.dtype is None:
            raise ValueError("quant_state.dtype is None: pass dtype= (fp16, bf16 or fp32)")
        dtype = qs.dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype, got {type(dtype).__name__} (bitsandbytes' third positional "
            "argument is absmax: pass out=/dtype= by keyword)"
        )
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype (or quant_state.dtype) must be fp16, bf16 or fp32, got {dtype}")
    n_bytes = A.numel() * A.element_size()
    if n_bytes != (numel + 1) // 2:
        raise ValueError(
            f"packed A has {n_bytes} bytes but quant_state.shape {shape} ({numel} values) needs "
            f"{(numel + 1) // 2}"
        )
    n_blocks = -(-numel // qs.blocksize)
    if not isinstance(qs.absmax, torch.Tensor) or qs.absmax.numel() != n_blocks:
        got = qs.absmax.numel() if isinstance(qs.absmax, torch.Tensor) else type(qs.absmax).__name__
        raise ValueError(
            f"quant_state.absmax has {got} entries, expected {n_blocks} "
            f"(ceil({numel} / blocksize {qs.blocksize}))"
        )
    if qs.code is not None and qs.code.numel() != 16:
        raise ValueError(f"quant_state.code must have 16 entries, got {qs.code.numel()}")
    if qs.state2 is not None:
        s2 = qs.state2
        if qs.absmax.dtype != torch.uint8:
            raise ValueError(f"quant_state.absmax must be uint8 codes with state2 set, got {qs.absmax.dtype}")
        if qs.offset is None:
            raise ValueError("quant_state.offset is None but quant_state.state2 is set (double quantization)")
        if s2.code is None or s2.code.numel() != 256:
            got = None if s2.code is None else s2.code.numel()
            raise ValueError(f"quant_state.state2.code must have 256 entries, got {got}")
        if not isinstance(s2.blocksize, int) or s2.blocksize <= 0:
            raise ValueError(f"quant_state.state2.blocksize must be a positive int, got {s2.blocksize!r}")
        n2 = -(-n_blocks // s2.blocksize)
        if s2.absmax.numel() != n2:
            raise ValueError(f"quant_state.state2.absmax has {s2.absmax.numel()} entries, expected {n2}")
    elif not qs.absmax.is_floating_point():
        raise ValueError(f"quant_state.absmax must be floating point without state2, got {qs.absmax.dtype}")
    if out is not None:
        if tuple(out.shape) != shape:
            raise ValueError(f"out.shape {tuple(out.shape)} != quant_state.shape {shape}")
        if out.dtype != dtype:
            raise ValueError(f"out.dtype {out.dtype} != requested dtype {dtype}")
        if out.device != A.device:
            raise ValueError(f"out is on {out.device} but A is on {A.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes it flat)")
    packed = A.contiguous().reshape(-1).view(torch.uint8)
    return packed, shape, numel, dtype, n_blocks


def _finish(A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' back-compat shim: a packed weight given transposed as [1, n/2] gets its output
    # transposed back. Kept for drop-in parity (bitsandbytes itself always stores [n/2, 1]).
    if A.dim() > 0 and A.shape[0] == 1 and out.dim() <= 2:
        return out.t()
    return out


def _code_for(qs: QuantStateLike, device: torch.device) -> torch.Tensor:
    # bitsandbytes' kernels hard-code the table of quant_type; quant_state.code equals it for any
    # state bitsandbytes made. We honour quant_state.code when present.
    if qs.code is None:
        return get_4bit_code(qs.quant_type, device)
    return qs.code.reshape(-1).to(device=device, dtype=torch.float32)


def dequantize_4bit_ref(
    A: torch.Tensor,
    quant_state: QuantStateLike,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch dequantization, bit-exact with bitsandbytes (fp32 math, one final rounding).

    The test oracle, and the CPU path when the Triton interpreter is off.
    """
    packed, shape, numel, dtype, n_blocks = _validate(A, quant_state, dtype, out)
    dev = A.device
    bs = quant_state.blocksize
    absmax = _decode_absmax(quant_state, n_blocks, dev)
    code = _code_for(quant_state, dev)
    idx = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1).long()
    vals = code[idx]  # fp32, padded to an even count
    vals = torch.nn.functional.pad(vals, (0, n_blocks * bs - vals.numel()))
    res = (vals.view(n_blocks, bs) * absmax.view(n_blocks, 1)).reshape(-1)[:numel].to(dtype).view(shape)
    if out is None:
        out = res
    else:
        out.copy_(res)
    return _finish(A, out)


def _ptr(t: Any) -> Any:
    """A tensor's address (identity within a cache key), or the value itself (None, a float offset)."""
    return t.data_ptr() if isinstance(t, torch.Tensor) else t


class PreparedDequant4bit:
    """``dequantize_4bit(A, quant_state, dtype, out)`` for one frozen weight and one buffer, checked once.

    The QLoRA training path dequantizes each frozen 4-bit weight in every forward and backward;
    the per-call checks and argument preparation cost about as much host time as a small layer's
    kernel. ``matches`` says whether a cached
    instance still describes (A, quant_state, out): same storage, same state object, same
    absmax storage. The weights are frozen, so nothing else can change underneath.
    """

    def __init__(self, A: torch.Tensor, quant_state: QuantStateLike, dtype: torch.dtype, out: torch.Tensor):
        if not kernels_run_on(A.device):
            raise ValueError(f"PreparedDequant4bit needs the Triton kernels; {A.device} runs the torch path")
        packed, _, _, dtype, n_blocks = _validate(A, quant_state, dtype, out)
        dev, qs = A.device, quant_state
        self._key = self._identity(A, qs, out)
        self.A, self.out = A, out
        code = _code_for(qs, dev)
        args = _kernel_scale_args(qs, n_blocks, dev)
        from csrc_triton.nf4 import dequantize_4bit_packed

        # one full check of the launch arguments, which also fills ``out`` once
        dequantize_4bit_packed(packed, code=code, out=out, blocksize=qs.blocksize, **args)
        nested = "code2" in args
        self._launch_args = (
            packed, args["absmax"], code, args.get("code2", code), args.get("absmax2", code),
            args.get("offset", code), out, qs.blocksize, args.get("blocksize2", 256), nested,
        )  # fmt: skip

    @staticmethod
    def _identity(A: torch.Tensor, qs: QuantStateLike, out: torch.Tensor) -> tuple:
        # every field the launch arguments come from: a state whose fields were reassigned in place
        # (another quantization's absmax/state2/offset) must not replay the old arguments
        s2 = qs.state2
        nested = () if s2 is None else (id(s2), _ptr(s2.absmax), _ptr(s2.code), s2.blocksize, _ptr(qs.offset))
        return (
            A.data_ptr(), A.shape, id(qs), _ptr(qs.absmax), _ptr(qs.code), qs.blocksize, qs.quant_type,
            nested, out.data_ptr(), out.dtype, out.shape,
        )  # fmt: skip

    def matches(self, A: torch.Tensor, quant_state: QuantStateLike, out: torch.Tensor) -> bool:
        return self._key == self._identity(A, quant_state, out)

    def __call__(self) -> torch.Tensor:
        from csrc_triton.nf4 import launch_dequant_4bit

        launch_dequant_4bit(*self._launch_args)
        return _finish(self.A, self.out)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantStateLike,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize bitsandbytes 4-bit weights (NF4/FP4), like ``bnb.functional.dequantize_4bit``.

    ``A`` is the packed tensor (any storage dtype; bitsandbytes stores ``[n/2, 1]`` uint8),
    ``quant_state`` its ``QuantState``. ``dtype`` overrides ``quant_state.dtype`` (fp16/bf16/fp32);
    ``out`` (contiguous, ``quant_state.shape``) is filled and returned, so the training path can
    reuse one buffer. ``backend`` as everywhere (``muscle_fast.ops.dispatch``): the Triton kernel on
    CUDA, the pure-torch path elsewhere, which computes the very same fp32 products and is exact.
    """
    if not use_kernels(backend, A.device, op="dequantize_4bit"):
        return dequantize_4bit_ref(A, quant_state, dtype, out)
    from csrc_triton.nf4 import dequantize_4bit_packed

    packed, shape, numel, dtype, n_blocks = _validate(A, quant_state, dtype, out)
    dev = A.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=dev)
    code = _code_for(quant_state, dev)
    args = _kernel_scale_args(quant_state, n_blocks, dev)
    dequantize_4bit_packed(packed, code=code, out=out, blocksize=quant_state.blocksize, **args)
    return _finish(A, out)


def _check_matmul(x: torch.Tensor, quant_state: QuantStateLike, bias: torch.Tensor | None) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dtype not in _OUT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"matmul_4bit: x must be an fp16, bf16 or fp32 tensor, got {got}")
    shape = None if quant_state is None or quant_state.shape is None else tuple(quant_state.shape)
    if shape is None or len(shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be a 2-D weight shape (out, in), got {shape}")
    n, k = (int(d) for d in shape)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"matmul_4bit: x.shape {tuple(x.shape)} does not end in in_features {k} of weight {shape}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"matmul_4bit: bias.shape {tuple(bias.shape)} != ({n},)")
    return n, k


def matmul_4bit_ref(
    x: torch.Tensor, A: torch.Tensor, quant_state: QuantStateLike, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize_4bit(W).T (+ bias)`` in torch: the CPU path and the fused kernel's meaning."""
    _check_matmul(x, quant_state, bias)
    # into an ``out`` of quant_state.shape: A given as bitsandbytes' [1, n/2] (``W.t()``, as its own
    # matmul_4bit takes it) gets the back-compat transpose on the *return* value only
    w = torch.empty(tuple(quant_state.shape), dtype=x.dtype, device=A.device)
    dequantize_4bit_ref(A, quant_state, dtype=x.dtype, out=w)
    y = torch.nn.functional.linear(x, w)
    return y if bias is None else y + bias.to(y.dtype)  # after rounding, as the kernel path does


def matmul_4bit(
    x: torch.Tensor,
    A: torch.Tensor,
    quant_state: QuantStateLike,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a bitsandbytes 4-bit weight, dequantized in registers (small M).

    For decode-sized batches, where dequantize + cuBLAS spends its time writing and re-reading the
    16-bit weight. Same numerics as ``linear(x, dequantize_4bit(A, qs, dtype=x.dtype), bias)`` up to
    the accumulation order (fp32); the bias is added after rounding to x's dtype. ``x``: ``[..., K]``;
    ``A``/``quant_state`` as for ``dequantize_4bit`` with ``quant_state.shape == (N, K)``. Where
    ``backend`` picks the torch path, and for odd K, ``matmul_4bit_ref``. ``MuScleLinear`` in
    ``backend="auto"`` runs it on up to ``SMALL_M_MAX`` rows where it measured fastest
    (``small_m_linear``), and on up to ``MUSCLE_FAST_FUSED_4BIT_MAX_M`` rows when that is set.
    """
    n, k = _check_matmul(x, quant_state, bias)
    if not use_kernels(backend, x.device, op="matmul_4bit") or k % 2:
        # odd K: a packed byte straddles two weight rows, which the kernel's even/odd column split
        # cannot read; the torch path computes the same products (fp32 accumulation as well)
        return matmul_4bit_ref(x, A, quant_state, bias)
    from csrc_triton.nf4_matmul import matmul_4bit_packed

    if A.device != x.device:
        raise ValueError(f"matmul_4bit: A is on {A.device} but x is on {x.device}")
    packed, _, _, _, n_blocks = _validate(A, quant_state, x.dtype, None)
    args = _kernel_scale_args(quant_state, n_blocks, x.device)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = matmul_4bit_packed(
        x2, packed, code=_code_for(quant_state, x.device), n=n, blocksize=quant_state.blocksize,
        split_k=split_k, **args,
    )  # fmt: skip
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------------
# 4-bit base layers of MuScleLinear (bitsandbytes Linear4bit)
# --------------------------------------------------------------------------------------------------


def _fused_4bit_max_m() -> int:
    raw = os.environ.get("MUSCLE_FAST_FUSED_4BIT_MAX_M", "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"MUSCLE_FAST_FUSED_4BIT_MAX_M must be an integer >= 0, got {raw!r}")
    return value


#: Input rows up to which a 4-bit base's forward always runs the fused dequantize + matmul kernel
#: (``muscle_fast.nf4.matmul_4bit``: the 16-bit weight is never written), whatever ``small_m_linear``
#: would measure. 0, i.e. off, by default; ``MUSCLE_FAST_FUSED_4BIT_MAX_M`` sets it at import. The
#: backward is the same either way.
FUSED_4BIT_MAX_M: int = _fused_4bit_max_m()


def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (checked by name: bitsandbytes stays optional)."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(
        module
    ).__module__.startswith("bitsandbytes")


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


def dequantize_weight(
    module: nn.Module, dtype: torch.dtype, kernels: bool = True, measured: bool = False
) -> torch.Tensor:
    """The dequantized weight, written into a workspace reused by every 4-bit layer of that shape.

    Forward and backward use the weight at once and drop it, so one buffer per (shape, dtype,
    device) serves all layers; nothing of size N x K stays alive between forward and backward.
    The buffer makes the 4-bit path single-threaded per device: layers of one shape must not run
    their forwards/backwards concurrently from several threads (or streams) on the same device.
    ``free_4bit_workspaces()`` releases the buffers (e.g. after ``del model``). ``measured``
    (``backend="auto"``): our kernel or bitsandbytes', whichever measured faster (same bits).
    """
    w = standard_4bit_weight(module)
    qs = w.quant_state
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
    (_dequantize_into if measured else _dequant_kernel)(w.data, module, qs, dtype, buf)
    return buf


def _dequant_kernel(
    A: torch.Tensor, module: nn.Module, qs: QuantStateLike, dtype: torch.dtype, buf: torch.Tensor
) -> None:
    """Our Triton kernel into ``buf``, its arguments checked once per module (``PreparedDequant4bit``)."""
    prepared = _prepared.get(module)
    if prepared is None or not prepared.matches(A, qs, buf):
        _prepared[module] = PreparedDequant4bit(A, qs, dtype, buf)  # fills buf
    else:
        prepared()


def _dequant_bitsandbytes(
    A: torch.Tensor, module: nn.Module, qs: QuantStateLike, dtype: torch.dtype, buf: torch.Tensor
) -> None:
    """bitsandbytes' own kernel into ``buf``: the same values bit for bit (module doc)."""
    import bitsandbytes.functional as bnbf

    if A.is_cuda:  # its CUDA op writes into ``out``; its CPU op has no out variant (tests only)
        bnbf.dequantize_4bit(A, qs, out=buf)
    else:  # a packed [1, 1] weight comes back transposed: one of its two dims is 1
        buf.copy_(bnbf.dequantize_4bit(A, qs).reshape(buf.shape))


def _dequant_key(
    A: torch.Tensor, module: nn.Module, qs: QuantStateLike, dtype: torch.dtype, buf: torch.Tensor
) -> tuple | None:
    """The measured choice's key, or None where bitsandbytes' CUDA op would read the state otherwise than
    our kernel: it writes the state's dtype only, passes raw pointers (fp32 absmax, every tensor on A's
    device), counts elements in an int32, ignores ``qs.code``, and writes -0.0 for fp4's negative zero
    (nf4 has none)."""
    if dtype != qs.dtype or qs.quant_type != "nf4" or math.prod(qs.shape) >= 2**31:
        return None
    dev = A.device
    s2 = qs.state2
    if s2 is None:
        if qs.absmax.dtype != torch.float32 or qs.absmax.device != dev:
            return None
    elif (
        qs.absmax.dtype != torch.uint8
        or s2.absmax.dtype != torch.float32
        or s2.code.dtype != torch.float32
        or getattr(s2, "state2", None) is not None
        or any(t.device != dev for t in (qs.absmax, s2.absmax, s2.code))
        or not isinstance(qs.offset, torch.Tensor)
        or qs.offset.device != dev
    ):
        return None
    if qs.code is not None and not _standard_code(qs.code):
        return None
    return (dev, tuple(qs.shape), dtype, qs.blocksize, s2 is not None)


#: id(code table) -> (a weak reference to it, verdict); tensors cannot key a WeakKeyDictionary (== is
#: elementwise), so identity is checked through the reference.
_standard_codes: dict[int, tuple[weakref.ref, bool]] = {}


def _standard_code(code: torch.Tensor) -> bool:
    """Whether a state's code table is bitsandbytes' nf4 table (compared once per table tensor)."""
    hit = _standard_codes.get(id(code))
    if hit is not None and hit[0]() is code:
        return hit[1]
    same = code.numel() == 16 and torch.equal(code.detach().float().cpu(), get_4bit_code("nf4"))
    if len(_standard_codes) >= 4096:
        _standard_codes.clear()
    _standard_codes[id(code)] = (weakref.ref(code), same)
    return same


#: The frozen 4-bit weight's dequantization in ``backend="auto"``: our kernel or bitsandbytes' (a 4-bit
#: layer comes with bitsandbytes), whichever measured faster at the weight's shape on its first call
#: (``muscle_fast.ops.measure``). Both write the same bits, so the choice changes time only.
_dequantize_into = measure.Measured(
    "nf4.dequantize_weight",
    {"triton": _dequant_kernel, "bitsandbytes": _dequant_bitsandbytes},
    _dequant_key,
    "triton",
)


#: Input rows up to which ``backend="auto"`` measures a 4-bit base's forward (decode-sized batches) among
#: dequantize + cuBLAS, our fused ``matmul_4bit`` and, in fp32, bitsandbytes' ``matmul_4bit``; above it
#: the weight is dequantized and the GEMM is cuBLAS's (tensor-core bound).
SMALL_M_MAX = 16


def _linear_dequant(x2: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize (measured: ours or bitsandbytes') into the workspace, then cuBLAS."""
    W = dequantize_weight(module, x2.dtype, kernels=True, measured=True)
    return torch.nn.functional.linear(x2, W, bias)


def _linear_fused(x2: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """Our fused dequantize + matmul: the 16-bit weight is never written."""
    w = standard_4bit_weight(module)
    return matmul_4bit(x2, w.data, w.quant_state, bias, backend="triton")


def _linear_bitsandbytes(x2: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes' own 4-bit matmul (its ``gemm_4bit``: a custom kernel at a few rows), as
    ``Linear4bit.forward`` calls it."""
    import bitsandbytes as bnb

    w = standard_4bit_weight(module)
    return bnb.matmul_4bit(x2, w.data.t(), quant_state=w.quant_state, bias=bias)


def _small_m_key(x2: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> tuple | None:
    """Measured where the candidates compute the same sums: the fused kernel runs (an even K), fp32 only
    while TF32 is off (cuBLAS would round the inputs, the fused kernel does not), and the state reads
    alike (``_dequant_key``). The key carries what ``_small_m_offered`` decides on."""
    m = x2.shape[0]
    if not 0 < m <= SMALL_M_MAX or x2.shape[1] % 2:
        return None
    if x2.dtype == torch.float32 and not measure.fp32_matmul_ieee():
        return None
    w = standard_4bit_weight(module)
    qs = w.quant_state
    base = _dequant_key(w.data, module, qs, x2.dtype, x2)
    if base is None:
        return None
    blocksize2 = None if qs.state2 is None else qs.state2.blocksize
    return (*base, blocksize2, measure.bucket(m), bias is not None)


def _small_m_offered(x2: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> tuple[str, ...]:
    """bitsandbytes' small-M kernel rounds the weight's code and absmax and every product to a 16-bit
    compute dtype, which ours do not (about 1 ulp off in bf16), and refuses a second-level blocksize
    other than 256: it is offered in fp32 only, with that blocksize."""
    qs = standard_4bit_weight(module).quant_state
    if x2.dtype == torch.float32 and (qs.state2 is None or qs.state2.blocksize == 256):
        return ("dequant", "fused", "bitsandbytes")
    return ("dequant", "fused")


#: A 4-bit base's forward on up to ``SMALL_M_MAX`` rows in ``backend="auto"``: whichever candidate
#: measured fastest per weight shape and row bucket (the same products; fp32 accumulation in each, in
#: another order). The default, dequantize + cuBLAS, is what larger inputs run.
small_m_linear = measure.Measured(
    "nf4.small_m_linear",
    {"dequant": _linear_dequant, "fused": _linear_fused, "bitsandbytes": _linear_bitsandbytes},
    _small_m_key,
    "dequant",
    offered=_small_m_offered,
    probe=measure.random_args,
)


def standard_4bit_weight(module: nn.Module) -> nn.Parameter:
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
        unpack_cpu_repacked(w)
    return w


def unpack_cpu_repacked(w: nn.Parameter) -> None:
    """Undo, in place, bitsandbytes' CPU inference repacking of a 4-bit weight: its own inverse, then
    the absmax layout that inverse leaves for a state without double quantization ((K / blocksize, N)
    in bf16, as its CPU kernel reads it) back to the flat fp32 one. The absmax keeps bf16 precision."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    nested = w.quant_state.original_nested
    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    if not nested:
        w.quant_state.absmax = w.quant_state.absmax.t().reshape(-1).float()


def use_fused_forward(kind: str, x2: torch.Tensor, kernels: bool) -> bool:
    """Whether a 4-bit base's forward on these rows runs the fused dequantize + matmul kernel."""
    m = x2.shape[0]
    if not kernels or kind != "4bit" or m == 0 or m > FUSED_4BIT_MAX_M or x2.shape[-1] % 2:
        return False
    return kernels_run_on(x2.device)
