"""Float64 hand-written reference of SPEC §2, used by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from muscle_fast import MuScleLinear


def lowrank_ref(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    kvec: torch.Tensor,
    s: float,
    mask: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """y = x W^T + b + s ((drop(x) A^T) * kvec) B^T in float64 (W is (out, in))."""
    x, W, A, B, kvec = (t.double() for t in (x, W, A, B, kvec))
    xd = x if mask is None else x * mask.double() / (1.0 - p)
    y = x @ W.t() + s * ((xd @ A.t()) * kvec) @ B.t()
    return y if bias is None else y + bias.double()


class _RefLinear(nn.Module):
    """SPEC §2 for one patched module, float64, written out by hand."""

    def __init__(self, m: MuScleLinear) -> None:
        super().__init__()
        base = m.base
        if m.kind == "conv1d":
            W = base.weight.t()
        elif m.kind == "4bit":
            from bitsandbytes.functional import dequantize_4bit

            W = dequantize_4bit(base.weight.data, base.weight.quant_state)
        else:
            W = base.weight
        self.W = W.detach().double()
        self.b = None if base.bias is None else base.bias.detach().double()
        self.A = m.lora_A.detach().double()
        self.B = m.lora_B.detach().double()
        self.kvec = m.scale_vector.double()
        self.s = m.alpha / m.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_ref(x, self.W, self.b, self.A, self.B, self.kvec, self.s)


def reference_model(patched: nn.Module) -> nn.Module:
    """A float64 copy of a patched model whose MuScleLinear modules are the hand-written reference."""
    ref = copy.deepcopy(patched)
    for name, m in list(ref.named_modules()):
        if isinstance(m, MuScleLinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, _RefLinear(m))
    for name, m in list(ref.named_modules()):
        if type(m).__name__ == "Linear4bit":  # the rest of a 4-bit model, dequantized exactly
            from bitsandbytes.functional import dequantize_4bit

            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref.double()


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero adapter weights (B starts at zero for LoRA, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MuScleLinear):
                for p in (m.lora_A, m.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std / max(1, len(m.scales)))
