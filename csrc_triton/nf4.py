"""Blockwise 4-bit (NF4/FP4) dequantization kernel, bitsandbytes layout.

The QLoRA training path dequantizes every frozen base weight on every forward and
backward, so this is a pure streaming kernel: read ``n/2`` packed bytes (+ one
absmax per block), write ``n`` values. Layout, as bitsandbytes stores it:

* byte ``i`` holds element ``2i`` in its HIGH nibble and ``2i+1`` in its LOW nibble;
* element ``e`` belongs to quantization block ``e // blocksize`` (flat, row-major);
  the last block may be partial;
* ``value = code[nibble] * absmax[block]`` in fp32, then rounded once to the output dtype;
* with double quantization (``nested``) the per-block absmax is itself stored as uint8 and
  decoded as ``code2[q] * absmax2[block // blocksize2] + offset`` (fp32, multiply then add,
  two roundings, like bitsandbytes' ``dequantize_blockwise`` followed by ``absmax += offset``).

Each program owns ``BYTES`` consecutive packed bytes, viewed as a ``[ROWS, COLS]`` tile whose
rows never straddle a quantization block, so the (possibly double-quantized) absmax is decoded
once per row rather than per element. The 16-entry code table is read one of two ways
(``LOOKUP``): ``"gather"``, a per-element load from the tiny (64 B) global table, which stays in
L1; or ``"select"``, the 16 values loaded as scalars (per program, not per element; the same
16 addresses for both nibbles) and picked by a 4-level ``tl.where`` tree on the nibble's bits (what
bitsandbytes' CUDA kernel does with branches): no memory access per element, 15 selects
instead. Which is faster is the GPU's to say (``benchmarks/bench_nf4.py`` times both); both are
exact. The two nibbles are interleaved with ``tl.interleave`` so the output
store is one contiguous, vectorizable run per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._common import INTERPRET, NF4_BLOCKSIZES, check_device, launch_guard

#: Block sizes bitsandbytes accepts for 4-bit quantization (``quantize_4bit``/``dequantize_4bit``).
SUPPORTED_BLOCKSIZES = NF4_BLOCKSIZES

#: How the kernel reads the 16-entry code table (module doc). ``LOOKUP`` is the default; the GPU
#: benchmark (bench_nf4.py) times both.
LOOKUPS: tuple[str, ...] = ("gather", "select")
LOOKUP: str = "gather"

#: Output dtypes the kernel writes.
SUPPORTED_OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

@triton.jit
def _pick(bit, c0, c1):
    return tl.where(bit, c1, c0)


@triton.jit
def _code_select(code_ptr, idx):
    """code[idx] for 4-bit idx by a where-tree on its bits: 16 scalar loads per call, no gather."""
    b0 = (idx & 1) != 0
    b1 = (idx & 2) != 0
    b2 = (idx & 4) != 0
    b3 = (idx & 8) != 0
    c = code_ptr
    q0 = _pick(b1, _pick(b0, tl.load(c + 0), tl.load(c + 1)), _pick(b0, tl.load(c + 2), tl.load(c + 3)))
    q1 = _pick(b1, _pick(b0, tl.load(c + 4), tl.load(c + 5)), _pick(b0, tl.load(c + 6), tl.load(c + 7)))
    q2 = _pick(b1, _pick(b0, tl.load(c + 8), tl.load(c + 9)), _pick(b0, tl.load(c + 10), tl.load(c + 11)))
    q3 = _pick(b1, _pick(b0, tl.load(c + 12), tl.load(c + 13)), _pick(b0, tl.load(c + 14), tl.load(c + 15)))
    return _pick(b3, _pick(b2, q0, q1), _pick(b2, q2, q3))


@triton.jit
def round_bf16_rne(vals):
    """fp32 -> bf16 round-to-nearest-even on the bits (NaN stays a quiet NaN): the interpreter's own
    cast truncates, the GPU's (cvt.rn) already rounds like this."""
    bits = vals.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    half = (bits >> 16).to(tl.uint16)
    half = tl.where(vals != vals, 0x7FC0, half).to(tl.uint16)
    return half.to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_tile(
    a_ptr,
    absmax_ptr,
    code_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    start,
    numel,
    n_bytes,
    blocksize2,
    HALF_BS: tl.constexpr,
    NESTED: tl.constexpr,
    BF16_RNE: tl.constexpr,
    SELECT: tl.constexpr,
    BYTES: tl.constexpr,
    COLS: tl.constexpr,
    MASKED: tl.constexpr,
):
    ROWS: tl.constexpr = BYTES // COLS
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    local = rows[:, None] * COLS + cols[None, :]  # [ROWS, COLS] byte offsets from start
    # One absmax per tile row: rows are aligned to and never straddle a quantization block.
    blk = (start + rows * COLS) // HALF_BS

    if MASKED:
        rem = tl.minimum(n_bytes - start, BYTES)  # valid bytes in this tile
        row_mask = rows * COLS < rem
        raw = tl.load(a_ptr + start + local, mask=local < rem, other=0)
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=row_mask, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + blk // blocksize2, mask=row_mask, other=0.0)
            scale = tl.load(code2_ptr + q) * scale2
        else:
            scale = tl.load(absmax_ptr + blk, mask=row_mask, other=0.0)
    else:
        raw = tl.load(a_ptr + start + local)
        if NESTED:
            q = tl.load(absmax_ptr + blk).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // blocksize2)
        else:
            scale = tl.load(absmax_ptr + blk)
    if NESTED:
        scale = scale + tl.load(offset_ptr)  # separate rounding: launched with fp fusion off

    hi = (raw >> 4).to(tl.int32)  # first element of the pair
    lo = (raw & 0xF).to(tl.int32)
    if SELECT:
        v_hi = _code_select(code_ptr, hi) * scale[:, None]
        v_lo = _code_select(code_ptr, lo) * scale[:, None]
    else:
        v_hi = tl.load(code_ptr + hi) * scale[:, None]
        v_lo = tl.load(code_ptr + lo) * scale[:, None]
    vals = tl.interleave(v_hi, v_lo)  # [ROWS, 2*COLS]: hi0, lo0, hi1, lo1, ...

    if BF16_RNE:
        vals = round_bf16_rne(vals)
    else:
        vals = vals.to(out_ptr.dtype.element_ty)

    out_local = rows[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    if MASKED:
        n_out = tl.minimum(numel - 2 * start, 2 * BYTES)
        tl.store(out_ptr + 2 * start + out_local, vals, mask=out_local < n_out)
    else:
        tl.store(out_ptr + 2 * start + out_local, vals)


@triton.autotune(configs=configs.triton_configs("nf4.dequant"),
                 key=["n_bytes", "HALF_BS", "NESTED", "SELECT"])
# Tile columns: a whole half-block (bytes per quantization block) when it fits, else the whole tile.
@triton.heuristics({"COLS": lambda a: min(a["HALF_BS"], a["BYTES"])})
@triton.jit
def _dequant_4bit_kernel(
    a_ptr,  # uint8 [n_bytes] packed nibbles
    absmax_ptr,  # fp32 [n_blocks], or uint8 [n_blocks] when NESTED
    code_ptr,  # fp32 [16]
    code2_ptr,  # fp32 [256] (NESTED only)
    absmax2_ptr,  # fp32 [ceil(n_blocks / blocksize2)] (NESTED only)
    offset_ptr,  # fp32 [1] (NESTED only)
    out_ptr,  # fp16/bf16/fp32 [numel]
    numel,
    n_bytes,
    blocksize2,
    HALF_BS: tl.constexpr,  # quantization blocksize // 2 = packed bytes per block
    NESTED: tl.constexpr,
    BF16_RNE: tl.constexpr,  # round fp32 -> bf16 by hand (see dequantize_4bit_packed)
    SELECT: tl.constexpr,  # code lookup: where-tree (True) or gather (False), see the module doc
    BYTES: tl.constexpr,
    COLS: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BYTES  # 64-bit: element offsets may pass 2**31
    # Only the tail program pays for masks (which also defeat vectorization).
    if 2 * (start + BYTES) <= numel:
        _dequant_tile(
            a_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, start, numel,
            n_bytes, blocksize2, HALF_BS, NESTED, BF16_RNE, SELECT, BYTES, COLS, False,
        )  # fmt: skip
    else:
        _dequant_tile(
            a_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, start, numel,
            n_bytes, blocksize2, HALF_BS, NESTED, BF16_RNE, SELECT, BYTES, COLS, True,
        )  # fmt: skip


def check_scale_args(
    absmax: torch.Tensor,
    code: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    n_blocks: int,
    blocksize2: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the scale arguments the 4-bit kernels share; returns (code2, absmax2, offset), with any
    valid tensor standing in for the unused pointers when there is no double quantization."""
    nested = code2 is not None
    want_absmax = torch.uint8 if nested else torch.float32
    if absmax.dtype != want_absmax or absmax.numel() < n_blocks:
        raise ValueError(
            f"absmax must be {want_absmax} with >= {n_blocks} entries, got {absmax.dtype} "
            f"with {absmax.numel()}"
        )
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be 16 fp32 values, got {code.numel()} {code.dtype}")
    if not nested:
        return code, code, code
    if absmax2 is None or offset is None:
        raise ValueError("double quantization needs absmax2 and offset together with code2")
    if code2.dtype != torch.float32 or code2.numel() != 256:
        raise ValueError(f"code2 must be 256 fp32 values, got {code2.numel()} {code2.dtype}")
    n_blocks2 = -(-n_blocks // blocksize2)
    if absmax2.dtype != torch.float32 or absmax2.numel() < n_blocks2:
        raise ValueError(
            f"absmax2 must be fp32 with >= {n_blocks2} entries, got {absmax2.dtype} "
            f"with {absmax2.numel()}"
        )
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError(f"offset must be one fp32 value, got {offset.numel()} {offset.dtype}")
    return code2, absmax2, offset


def dequantize_4bit_packed(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
    *,
    code2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
    lookup: str | None = None,
) -> torch.Tensor:
    """Dequantize flat packed 4-bit data into the contiguous ``out`` (all of its elements).

    Low-level launcher: ``muscle_fast.nf4.dequantize_4bit`` validates a bitsandbytes
    ``QuantState`` and calls this. ``packed`` is uint8 ``[ceil(out.numel()/2)]``; ``absmax`` is fp32
    ``[ceil(numel/blocksize)]``, or its uint8 double-quantized codes when ``code2`` is given, in which
    case ``absmax2`` (fp32 per ``blocksize2`` absmax codes) and ``offset`` (fp32, one element) are
    required too. ``code`` is the fp32 16-entry table. ``lookup``: ``"gather"`` or ``"select"``
    (default: ``LOOKUP``, see the module doc). Returns ``out``.
    """
    lookup = LOOKUP if lookup is None else lookup
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    nested = code2 is not None
    numel = out.numel()
    n_bytes = (numel + 1) // 2
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")
    if out.dtype not in SUPPORTED_OUT_DTYPES:
        raise ValueError(f"out dtype must be one of {SUPPORTED_OUT_DTYPES}, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if packed.dtype != torch.uint8 or packed.numel() != n_bytes:
        raise ValueError(
            f"packed must be uint8 with {n_bytes} bytes for {numel} values, got {packed.dtype} "
            f"with {packed.numel()} elements"
        )
    code2, absmax2, offset = check_scale_args(
        absmax, code, code2, absmax2, offset, -(-numel // blocksize), blocksize2
    )
    tensors = [packed, absmax, code, out, code2, absmax2, offset]
    check_device(*tensors)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if numel == 0:
        return out

    launch_dequant_4bit(
        packed, absmax, code, code2, absmax2, offset, out, blocksize, blocksize2, nested, lookup
    )
    return out


@launch_guard("out")
def launch_dequant_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    code2: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    nested: bool,
    lookup: str | None = None,
) -> None:
    """The launch alone, for arguments ``dequantize_4bit_packed`` has already checked.

    A training step dequantizes every frozen 4-bit weight twice; callers that hold the same
    weight and buffer across steps validate once and call this (the checks cost as much host
    time as a small layer's kernel)."""
    numel = out.numel()
    if numel == 0:
        return
    n_bytes = (numel + 1) // 2
    lookup = LOOKUP if lookup is None else lookup
    grid = lambda meta: (triton.cdiv(n_bytes, meta["BYTES"]),)  # noqa: E731
    _dequant_4bit_kernel[grid](
        packed,
        absmax,
        code,
        code2,
        absmax2,
        offset,
        out,
        numel,
        n_bytes,
        blocksize2,
        HALF_BS=blocksize // 2,
        NESTED=nested,
        # The interpreter truncates fp32 -> bf16 casts; round by hand there. On the GPU the
        # native cast (cvt.rn) is already round-to-nearest-even.
        BF16_RNE=INTERPRET and out.dtype == torch.bfloat16,
        SELECT=lookup == "select",
        # bitsandbytes rounds code2*absmax2 before adding offset: forbid the FMA contraction.
        enable_fp_fusion=False,
    )
