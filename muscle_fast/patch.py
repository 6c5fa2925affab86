"""patch_model: turn a Hugging Face model into a MuScleLoRA model in place (SPEC §3)."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import MuScleConfig
from .layers import MuScleLinear
from .ops import nf4

logger = logging.getLogger("muscle_fast")


class DecoderScoreHead(nn.Module):
    """The paper's decoder head: dense (hidden -> 16, no bias) -> dropout -> out_proj (16 -> labels).

    It replaces ``score`` of a ``*ForSequenceClassification`` decoder; MSLR wraps ``dense``.
    """

    def __init__(
        self,
        hidden: int,
        num_labels: int,
        inner: int = 16,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, num_labels, bias=False, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(h)))


@dataclass
class PatchReport:
    """What patch_model did; kept as ``model.muscle_report``."""

    lora_modules: list[str]
    mslr_modules: list[str]
    head_modules: list[str]
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(1, self.total_params)
        return (
            f"muscle_fast: patched {len(self.lora_modules)} LoRA + {len(self.mslr_modules)} MSLR modules; "
            f"trainable {self.trainable_params:,} / {self.total_params:,} params ({pct:.3f}%)"
        )


def matches(name: str, target: str) -> bool:
    """peft's rule: a target names a module by its full name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "muscle_config", None) is not None or any(
        isinstance(m, MuScleLinear) for m in model.modules()
    )


def find_modules(model: nn.Module, targets: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and any(matches(n, t) for t in targets)]


def head_module_names(model: nn.Module, cfg: MuScleConfig) -> list[str]:
    """Outermost modules named by ``cfg.head_modules`` (a nested match is covered by its parent)."""
    hits = find_modules(model, cfg.head_modules)
    return [n for n in hits if not any(n.startswith(h + ".") for h in hits if h != n)]


def _param_count(module: nn.Module) -> int:
    total = 0
    for p in module.parameters():
        if type(p).__name__ != "Params4bit":
            total += p.numel()
            continue
        # a 4-bit weight counts its unpacked values: from its state (any storage dtype, odd counts),
        # else two per stored byte
        qs = getattr(p, "quant_state", None)
        shape = getattr(qs, "shape", None)
        total += math.prod(shape) if shape is not None else 2 * p.numel() * p.element_size()
    return total


def _replace_decoder_head(model: nn.Module, cfg: MuScleConfig) -> nn.Module:
    """Put the paper's head in place of ``model.score``; returns the old ``score``."""
    old = getattr(model, "score", None)
    if not isinstance(old, nn.Linear):
        raise ValueError(
            f"patch_model: decoder_head=True needs a `score` nn.Linear on "
            f"{type(model).__name__}, found {type(old).__name__}"
        )
    dtype = old.weight.dtype
    if not dtype.is_floating_point or type(old.weight).__name__ == "Params4bit":
        # a quantized score layer (bitsandbytes): build the new head in its compute dtype, not storage
        dtype = getattr(old, "compute_dtype", None) or torch.float32
    model.score = DecoderScoreHead(
        old.in_features,
        old.out_features,
        cfg.head_hidden,
        cfg.head_dropout,
        device=old.weight.device,
        dtype=dtype,
    )
    model.score.requires_grad_(False)  # the paper freezes the random output layer
    return old


def _exact_cpu_4bit(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference shortcut on every Linear4bit of ``model``.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight on its first
    eval-mode no-grad forward and from then on runs a bf16 kernel without autograd, also in
    training mode: after a dev evaluation (train_muscle runs one every epoch) no gradient flowed
    through the frozen 4-bit layers (o_proj, the MLP), so every LoRA gradient of the backbone was
    zero. A weight repacked already is restored to the standard layout (``nf4.unpack_cpu_repacked``;
    the absmax went through bf16).
    """
    for m in model.modules():
        if not getattr(m, "support_avx512bf16_for_cpu", False):
            continue
        m.support_avx512bf16_for_cpu = False
        w = getattr(m, "weight", None)
        if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
            nf4.unpack_cpu_repacked(w)


def patch_model(model: nn.Module, cfg: MuScleConfig | None = None, **overrides: Any) -> nn.Module:
    """Freeze ``model`` and add LoRA/MSLR modules per ``cfg`` (paper defaults when None); in place.

    The model keeps a copy of ``cfg`` (``model.muscle_config``: what ``save_adapter`` writes). On an
    error the model is left as it was: modules restored, parameters trainable as before."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be a torch nn.Module, got {type(model).__name__}")
    if cfg is not None and not isinstance(cfg, MuScleConfig):
        raise TypeError(
            f"patch_model: cfg must be a MuScleConfig (MuScleConfig.from_dict for a dict), "
            f"got {type(cfg).__name__}"
        )
    if is_patched(model):
        raise ValueError(f"patch_model: {type(model).__name__} is already patched by muscle_fast")
    if cfg is None:
        cfg = MuScleConfig.for_model(model, **overrides)
    elif overrides:
        raise ValueError("patch_model: pass either cfg or keyword overrides, not both")
    cfg.validate()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.model_type is not None and model_type is not None and cfg.model_type != model_type:
        raise ValueError(
            f"patch_model: the config is for a {cfg.model_type!r} model, {type(model).__name__} is "
            f"{model_type!r} (MuScleConfig.for_model builds one for this model)"
        )
    cfg = copy.deepcopy(cfg)  # the caller's object may change later; the saved adapter must not
    _exact_cpu_4bit(model)  # result-preserving (bitsandbytes' CPU shortcut off), kept on an error
    grads = [(p, p.requires_grad) for p in model.parameters()]
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        lora, mslr, heads = _patch(model, cfg, undo)
    except BaseException:
        for parent, child, old in reversed(undo):
            setattr(parent, child, old)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise
    model.muscle_config = cfg
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = PatchReport(lora, mslr, heads, trainable, _param_count(model))
    model.muscle_report = report
    logger.info(str(report))
    return model


def _patch(
    model: nn.Module, cfg: MuScleConfig, undo: list[tuple[nn.Module, str, nn.Module]]
) -> tuple[list[str], list[str], list[str]]:
    """patch_model's changes, each module swap recorded in ``undo`` (parent, attribute, old module)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.decoder_head:
        undo.append((model, "score", _replace_decoder_head(model, cfg)))

    plan: dict[str, str] = {}
    for kind, targets in (("lora", cfg.lora_targets), ("mslr", cfg.mslr_targets)):
        for t in targets:
            hits = find_modules(model, [t])
            if not hits:
                raise ValueError(
                    f"patch_model: {kind} target {t!r} matches no module of {type(model).__name__}"
                )
            for n in hits:
                if n in plan and plan[n] != kind:
                    raise ValueError(f"patch_model: module {n!r} is both a LoRA and an MSLR target")
                plan[n] = kind
    for t in cfg.head_modules:
        if not find_modules(model, [t]):
            raise ValueError(
                f"patch_model: head module {t!r} matches no module of {type(model).__name__} (it would "
                "not be saved with the adapter); pass head_modules=[] for a model without a task head"
            )

    lora, mslr = [], []
    for name, kind in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if kind == "lora":
            new = MuScleLinear(
                base,
                (1.0,),
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.lora_dropout,
                cfg.lora_init_B,
                cfg.backend,
                name=name,
            )
            lora.append(name)
        else:
            new = MuScleLinear(
                base,
                cfg.mslr_scales,
                cfg.mslr_r,
                cfg.mslr_alpha,
                cfg.mslr_dropout,
                cfg.mslr_init_B,
                cfg.backend,
                name=name,
            )
            mslr.append(name)
        undo.append((parent, child, base))
        setattr(parent, child, new)
    return lora, mslr, head_module_names(model, cfg)


def muscle_modules(model: nn.Module) -> dict[str, MuScleLinear]:
    """Name -> MuScleLinear for every patched module, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MuScleLinear)}


def require_patched(model: nn.Module, what: str) -> MuScleConfig:
    cfg = getattr(model, "muscle_config", None)
    if cfg is None:
        raise ValueError(
            f"{what}: {type(model).__name__} is not patched by muscle_fast (call patch_model first)"
        )
    return cfg
