"""Random-weight 4-bit models for the benchmarks (no download: shapes are what matter for speed)."""

from __future__ import annotations

import torch
from torch import nn


def quantize_linears_4bit(
    module: nn.Module, compute_dtype: torch.dtype, device: str, skip: tuple[str, ...] = ()
) -> nn.Module:
    """Replace every plain ``nn.Linear`` (but those under ``skip``) by a bitsandbytes NF4 Linear4bit.

    Each weight is quantized as it is replaced and its full-precision copy dropped at once, so a
    7B model built in bf16 on the GPU never holds two full copies.
    """
    import bitsandbytes as bnb

    targets = [
        (n, m)
        for n, m in module.named_modules()
        if type(m) is nn.Linear and not any(n == s or n.startswith(s + ".") for s in skip)
    ]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
            quant_type="nf4", device="meta",
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, q.to(device))
        del lin
    return module
