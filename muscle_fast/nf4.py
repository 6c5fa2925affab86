"""Deprecated location of the 4-bit functions: they live in ``muscle_fast.ops.nf4``.

``muscle_fast.dequantize_4bit`` / ``muscle_fast.matmul_4bit`` are the public names; this module keeps
``from muscle_fast.nf4 import ...`` working.
"""

from .ops.nf4 import (
    SUPPORTED_BLOCKSIZES,
    PreparedDequant4bit,
    QuantStateLike,
    dequantize_4bit,
    dequantize_4bit_ref,
    get_4bit_code,
    matmul_4bit,
    matmul_4bit_ref,
)

__all__ = [
    "SUPPORTED_BLOCKSIZES",
    "PreparedDequant4bit",
    "QuantStateLike",
    "dequantize_4bit",
    "dequantize_4bit_ref",
    "get_4bit_code",
    "matmul_4bit",
    "matmul_4bit_ref",
]
