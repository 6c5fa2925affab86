"""MuScleLinear: one module for LoRA (one scale) and MSLR (many scales), SPEC §2."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import INIT_CHOICES, resolve_backend, validate_scales
from .ops.lowrank import MuScleLinearFunction, base_kind, current_split, get_ops


class MuScleLinear(nn.Module):
    """y = base(x) + scaling * ((drop(x) @ A^T) * scale_vector) @ B^T with ``base`` frozen.

    ``scales=(1,)`` is plain LoRA; several scales are the paper's multi-scale
    low-rank branches (MSLR), each of inner rank ``r``. ``lora_A`` is
    (n*r, in_features), ``lora_B`` (out_features, n*r), ``scale_vector`` the
    scales each repeated r times, ``scaling = alpha / r``. Adapter parameters are
    kept in float32 (like peft's default) and cast to the compute dtype per call.
    """

    def __init__(
        self,
        base: nn.Module,
        scales: Sequence[float] = (1.0,),
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init_B: str = "zeros",
        backend: str = "auto",
        adapter_dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> None:
        super().__init__()
        where = f"MuScleLinear({name or type(base).__name__})"
        kind = base_kind(base)
        if kind is None:
            raise TypeError(
                f"{where}: cannot wrap a {type(base).__module__}.{type(base).__name__}; supported: "
                "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit"
            )
        if isinstance(base, MuScleLinear):
            raise TypeError(f"{where}: already a MuScleLinear")
        scales = validate_scales(scales, where=f"{where} scales")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{where}: r must be an integer >= 1, got {r!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{where}: alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout!r}")
        if init_B not in INIT_CHOICES:
            raise ValueError(f"{where}: init_B must be one of {INIT_CHOICES}, got {init_B!r}")
        resolve_backend(backend)
        if any(p.device.type == "meta" for p in base.parameters()):
            # accelerate's CPU/disk offload keeps weights on "meta" and loads them in a hook around
            # base.forward, which MuScleLinear does not call (it reads the weight itself)
            raise ValueError(
                f"{where}: the base weight is on the meta device (an offloaded layer, device_map with "
                "'cpu'/'disk', or a model not materialized yet); load the model onto real devices"
            )
        self.base = base
        self.kind = kind
        self.in_features, self.out_features = _features(base, kind)
        self.scales = scales
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.dropout = float(dropout)
        self.init_B = init_B
        self.backend = backend
        self.name = name
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(base.parameters()).device
        rank = len(scales) * r
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=adapter_dtype))
        kvec = torch.tensor(scales, dtype=torch.float32, device=device).repeat_interleave(r)
        self.register_buffer("scale_vector", kvec, persistent=False)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects ``module.weight`` (dtype, device) keeps working."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_parameters(self) -> None:
        """Paper init: A kaiming-uniform (a=sqrt 5); B zeros (LoRA) or kaiming-uniform (MSLR)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.init_B == "zeros":
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """dW = scaling * B @ diag(scale_vector) @ A, shaped (out, in), float32."""
        return (self.lora_B.float() * (self.scaling * self.scale_vector)) @ self.lora_A.float()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, scales={list(self.scales)}, r={self.r}, "
            f"alpha={self.alpha:g}, dropout={self.dropout:g}, base={self.kind}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MuScleLinear({self.name}): input last dim {x.shape[-1]} != in_features "
                f"{self.in_features} (input shape {tuple(x.shape)})"
            )
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.base.parameters()):
            raise RuntimeError(
                f"MuScleLinear({self.name}): the base layer must stay frozen; its parameters "
                "require grad. Train the adapter, or unpatch the model for a full fine-tune."
            )
        inp_dtype = x.dtype
        dtype = _compute_dtype(self, x)
        if x.dtype != dtype:
            x = x.to(dtype)
        ops = get_ops(self.backend, x.device, x.dtype)  # resolves MUSCLE_FAST_BACKEND once
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0
        scale = self.scaling * self.scale_vector
        if x.dtype == torch.float64:  # the exact path: scales and scaling not rounded to fp32
            kvec = torch.tensor(self.scales, dtype=torch.float64, device=x.device).repeat_interleave(self.r)
            scale = self.scaling * kvec
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = MuScleLinearFunction.apply(
                x, self.lora_A, self.lora_B, scale, self.base, self.kind, ops, p, seed, current_split(), self
            )
        return y if y.dtype == inp_dtype or self.kind != "4bit" else y.to(inp_dtype)


def _features(base: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return base.weight.shape[0], base.weight.shape[1]
    return int(base.in_features), int(base.out_features)


def _compute_dtype(module: MuScleLinear, x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where it is on; a 4-bit base's compute dtype; else the input's dtype."""
    if module.kind == "4bit":
        cd = getattr(module.base, "compute_dtype", None)
        return cd if cd is not None else x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
