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

Each thread decodes one little-endian 4-byte word (8 values) per tile: a tile is ``WORDS = 32 *
num_warps`` words, a program runs ``ITERS`` tiles. The word is read with one 4-byte load (byte
loads for the tail and for a packed buffer not 4-byte aligned), its 8 nibbles are shifted out
in output order, and the thread stores its values as one 16-byte vector (two for fp32). The
load and the store then share one register layout, so the kernel uses no shared memory and no
barrier (``tests/test_compile_sm90.py`` checks the PTX). A word never straddles a quantization
block (every blocksize is a multiple of 8), so the absmax is decoded once per word. The
16-entry code table is read one of two ways (``LOOKUP``): ``"gather"``, a per-element load from
the tiny (64 B) global table, which stays in L1; or ``"select"``, 16 scalar loads and a 4-level
``tl.where`` tree on the nibble's bits (what bitsandbytes' CUDA kernel does with branches): no
memory access per element, 15 selects instead. Which is faster is the GPU's to say
(``benchmarks/bench_nf4.py`` times both); both are exact.
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

#: Element counts from which the kernel indexes in int64 (a program's last word may reach past numel).
_INT32_LIMIT = 2**31 - 2**20

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
def _dequant_words(
    a_ptr,
    absmax_ptr,
    code_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    w0,
    numel,
    n_bytes,
    blocksize2,
    BS: tl.constexpr,
    NESTED: tl.constexpr,
    BF16_RNE: tl.constexpr,
    SELECT: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    WORDS: tl.constexpr,
    VEC: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Decode ``WORDS`` 4-byte words (8 values each) starting at word ``w0``: one word per thread."""
    w = w0 + tl.arange(0, WORDS)
    if WORD_LOADS and not MASKED:
        word = tl.load(a_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + w)
    else:  # the tail, or a packed buffer not 4-byte aligned: assemble the word from bytes
        b = 4 * w
        word = tl.load(a_ptr + b, mask=b < n_bytes, other=0).to(tl.int32)
        word |= tl.load(a_ptr + b + 1, mask=b + 1 < n_bytes, other=0).to(tl.int32) << 8
        word |= tl.load(a_ptr + b + 2, mask=b + 2 < n_bytes, other=0).to(tl.int32) << 16
        word |= tl.load(a_ptr + b + 3, mask=b + 3 < n_bytes, other=0).to(tl.int32) << 24
    # One absmax per word: every blocksize is a multiple of 8, so a word never straddles a block.
    blk = w // (BS // 8)
    if MASKED:
        live = 8 * w < numel
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=live, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // blocksize2, mask=live, other=0.0)
        else:
            scale = tl.load(absmax_ptr + blk, mask=live, other=0.0)
    else:
        if NESTED:
            q = tl.load(absmax_ptr + blk).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // blocksize2)
        else:
            scale = tl.load(absmax_ptr + blk)
    if NESTED:
        scale = scale + tl.load(offset_ptr)  # separate rounding: launched with fp fusion off
    # VEC consecutive values per thread and store (16 bytes); fp32 output takes two halves.
    for half in tl.static_range(8 // VEC):
        j = half * VEC + tl.arange(0, VEC)
        # Little-endian word: byte k holds values 2k (high nibble) and 2k + 1 (low nibble).
        shift = (j >> 1) * 8 + (1 - (j & 1)) * 4
        nib = (word[:, None] >> shift[None, :]) & 0xF
        if SELECT:
            vals = _code_select(code_ptr, nib) * scale[:, None]
        else:
            vals = tl.load(code_ptr + nib) * scale[:, None]
        if BF16_RNE:
            vals = round_bf16_rne(vals)
        else:
            vals = vals.to(out_ptr.dtype.element_ty)
        offs = 8 * w[:, None] + j[None, :]
        if MASKED:
            tl.store(out_ptr + offs, vals, mask=offs < numel)
        else:
            tl.store(out_ptr + offs, vals)


@triton.autotune(configs=configs.triton_configs("nf4.dequant"),
                 key=["numel", "BS", "NESTED", "SELECT", "WORD_LOADS", "VEC"])
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
    BS: tl.constexpr,  # quantization blocksize (values per absmax)
    NESTED: tl.constexpr,
    BF16_RNE: tl.constexpr,  # round fp32 -> bf16 by hand (see launch_dequant_4bit)
    SELECT: tl.constexpr,  # code lookup: where-tree (True) or gather (False), see the module doc
    WORD_LOADS: tl.constexpr,  # packed buffer 4-byte aligned: full tiles load int32 words
    VEC: tl.constexpr,  # values per thread and store: 16 bytes of the output dtype
    WIDE: tl.constexpr,  # int64 offsets (numel near or past 2**31)
    WORDS: tl.constexpr,  # words per tile: 32 * num_warps, one per thread (module doc)
    ITERS: tl.constexpr,  # tiles per program
):
    w0 = tl.program_id(0)
    if WIDE:
        w0 = w0.to(tl.int64)
    w0 = w0 * (WORDS * ITERS)
    # Only the tail program pays for masks (which also defeat vectorization).
    if 8 * (w0 + WORDS * ITERS) <= numel:
        for it in tl.static_range(ITERS):
            _dequant_words(
                a_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, w0 + it * WORDS,
                numel, n_bytes, blocksize2, BS, NESTED, BF16_RNE, SELECT, WORD_LOADS, WORDS, VEC, False,
            )  # fmt: skip
    else:
        for it in tl.static_range(ITERS):
            _dequant_words(
                a_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, w0 + it * WORDS,
                numel, n_bytes, blocksize2, BS, NESTED, BF16_RNE, SELECT, WORD_LOADS, WORDS, VEC, True,
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
    for name, t in (("packed", packed), ("absmax", absmax)):
        if not t.is_contiguous():  # the kernel reads both flat
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
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
    grid = lambda meta: (triton.cdiv(numel, 8 * meta["WORDS"] * meta["ITERS"]),)  # noqa: E731
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
        BS=blocksize,
        NESTED=nested,
        # The interpreter truncates fp32 -> bf16 casts; round by hand there. On the GPU the
        # native cast (cvt.rn) is already round-to-nearest-even.
        BF16_RNE=INTERPRET and out.dtype == torch.bfloat16,
        SELECT=lookup == "select",
        WORD_LOADS=packed.data_ptr() % 4 == 0,
        VEC=16 // out.element_size(),
        WIDE=numel >= _INT32_LIMIT,
        # bitsandbytes rounds code2*absmax2 before adding offset: forbid the FMA contraction.
        enable_fp_fusion=False,
    )
