"""MuScleLinear: one module for LoRA (one scale) and MSLR (many scales), SPEC §2."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import INIT_CHOICES, is_number, resolve_backend, validate_scales
from .ops.lowrank import MuScleLinearFunction, base_kind, current_split, get_ops


class MuScleLinear(nn.Module):
    """y = base(x) + scaling * ((drop(x) @ A^T) * scale_vector) @ B^T with ``base`` frozen.

    ``scales=(1,)`` is plain LoRA; several scales are the paper's multi-scale
    low-rank branches (MSLR), each of inner rank ``r``. ``lora_A`` is
    (n*r, in_features), ``lora_B`` (out_features, n*r), ``scale_vector`` the
    scales each repeated r times, ``scaling = alpha / r``. Adapter parameters are
    kept in float32 (like peft's default) and cast to the compute dtype once per change of
    them (an optimizer step), not per call (``_HostCache``).
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
        if not (is_number(alpha) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{where}: alpha must be > 0, got {alpha!r}")
        if not (is_number(dropout) and 0.0 <= dropout < 1.0):
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
        self._host = _HostCache()
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

    def drop_host_cache(self) -> None:
        """Forget the cached compute-dtype adapters and scale vector (rebuilt on the next call).

        Needed only after writing the adapters through ``.data`` (``p.data.copy_(...)``), the one
        in-place write that does not bump a tensor's version counter; optimizers, ``nn.init``,
        ``load_state_dict`` and in-place ops under ``torch.no_grad()`` are all seen.
        """
        self._host = _HostCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.dtype.is_floating_point:
            # the base weight would be cast to an integer dtype (all zeros), not fail as nn.Linear does
            got = f"a {x.dim()}-d {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"MuScleLinear({self.name}): input must be a floating-point tensor of at least 1 dim, "
                f"got {got}"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MuScleLinear({self.name}): input last dim {x.shape[-1]} != in_features "
                f"{self.in_features} (input shape {tuple(x.shape)})"
            )
        if torch.is_grad_enabled() and _base_trainable(self.base):
            raise RuntimeError(
                f"MuScleLinear({self.name}): the base layer must stay frozen; its parameters "
                "require grad. Train the adapter, or unpatch the model for a full fine-tune."
            )
        inp_dtype = x.dtype
        dev_type = x.device.type
        autocast = torch.is_autocast_enabled(dev_type)
        dtype = _compute_dtype(self, x, autocast)
        if x.dtype != dtype:
            x = x.to(dtype)
        ops = get_ops(self.backend, x.device, x.dtype)  # resolves MUSCLE_FAST_BACKEND once
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0
        host = self._host
        scale = host.scale(self, x.device, x.dtype == torch.float64)
        casts = (host.cast("A", self.lora_A, dtype), host.cast("B", self.lora_B, dtype))
        split = current_split()
        args = (x, self.lora_A, self.lora_B, scale, self.base, self.kind, ops, p, seed, split, self, casts)
        if autocast:  # the function's GEMMs run in the dtypes chosen above, not autocast's
            with torch.autocast(device_type=dev_type, enabled=False):
                y = MuScleLinearFunction.apply(*args)
        else:  # the same thing: disabling an autocast that is off changes nothing
            y = MuScleLinearFunction.apply(*args)
        return y if y.dtype == inp_dtype or self.kind != "4bit" else y.to(inp_dtype)


class _HostCache:
    """Per-layer tensors that depend only on the parameters, made once per change of them (issue #15).

    A forward used to cast ``lora_A`` and ``lora_B`` to the compute dtype and rebuild ``scaling *
    scale_vector``: three small ops (three launches on CUDA) per call, repeated for every forward
    between two optimizer steps (gradient accumulation, evaluation, recomputed checkpoints). Each
    entry is reused while its source is the same tensor object with the same storage pointer,
    shape, strides, dtype and version counter; a cast of unchanged data gives the same bits, so this
    is exact. The version counter sees every in-place write through the tensor (optimizer steps,
    ``nn.init``, ``load_state_dict``, ops under ``torch.no_grad()``), but not one through ``.data``:
    ``MuScleLinear.drop_host_cache()`` after such a write. Inference tensors (parameters made under
    ``torch.inference_mode``) have no version counter and are not cached; an entry made under
    inference mode serves only calls under it (autograd refuses to save one). Entries are detached:
    gradients reach the fp32 parameters because they, not the casts, are the autograd function's
    inputs.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, tuple[object, tuple, torch.Tensor]] = {}

    def cast(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.detach().to(dtype)``, cached; ``t`` itself when it already has ``dtype``."""
        if t.dtype == dtype:
            return t
        if t.is_inference():  # made under torch.inference_mode: no version counter to key on
            return t.detach().to(dtype)
        key = (_stamp(t), dtype)
        hit = self.entries.get(name)
        if hit is not None and hit[0] is t and hit[1] == key:
            return hit[2]
        out = t.detach().to(dtype)
        self.entries[name] = (t, key, out)
        return out

    def scale(self, module: MuScleLinear, device: torch.device, exact: bool) -> torch.Tensor:
        """``scaling * scale_vector`` (fp32), or built in float64 from the scales (``exact``)."""
        if exact:  # the exact path: scales and scaling not rounded to fp32
            src, key = None, ("f64", module.scales, module.r, module.scaling, device, _inference())
        else:
            src = module.scale_vector
            if src.is_inference():  # as in ``cast``
                return module.scaling * src
            key = ("f32", _stamp(src), module.scaling)
        hit = self.entries.get("scale")
        if hit is not None and hit[0] is src and hit[1] == key:
            return hit[2]
        if exact:
            kvec = torch.tensor(module.scales, dtype=torch.float64, device=device).repeat_interleave(module.r)
            out = module.scaling * kvec
        else:
            out = module.scaling * src
        self.entries["scale"] = (src, key, out)
        return out


_inference = torch.is_inference_mode_enabled


def _stamp(t: torch.Tensor) -> tuple:
    """What a cached result of ``t`` depends on; equal stamps mean equal data (see ``_HostCache``)."""
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device, _inference())


def _base_trainable(base: nn.Module) -> bool:
    """Whether any base parameter requires grad: read every call (a flag has no version to cache
    on), from ``_parameters`` directly for the childless layers MuScleLinear wraps."""
    if base._modules:
        return any(p.requires_grad for p in base.parameters())
    return any(p is not None and p.requires_grad for p in base._parameters.values())


def _features(base: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return base.weight.shape[0], base.weight.shape[1]
    return int(base.in_features), int(base.out_features)


def _compute_dtype(module: MuScleLinear, x: torch.Tensor, autocast: bool) -> torch.dtype:
    """Autocast's dtype where it is on; a 4-bit base's compute dtype; else the input's dtype."""
    if module.kind == "4bit":
        cd = getattr(module.base, "compute_dtype", None)
        return cd if cd is not None else x.dtype
    if autocast and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
