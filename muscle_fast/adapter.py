"""Adapters on disk: save/load (safetensors + JSON), peft export, merge into the base model."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import MuScleConfig, model_family
from .fileio import atomic_write, read_json, read_safetensors, write_json
from .layers import MuScleLinear
from .patch import (
    DecoderScoreHead,
    find_modules,
    head_module_names,
    is_patched,
    muscle_modules,
    patch_model,
    require_patched,
)

ADAPTER_WEIGHTS = "muscle_adapter.safetensors"
ADAPTER_CONFIG = "muscle_config.json"
FORMAT_VERSION = 1

logger = logging.getLogger("muscle_fast")


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a fresh ``from_pretrained -> patch_model`` lacks to reproduce ``model``.

    That is: all adapter parameters, every parameter of the task head (randomly
    initialised, not in the base checkpoint) and the base weights of MSLR modules
    (the pooler or head layer they wrap is often absent from a checkpoint too).
    """
    cfg = require_patched(model, "adapter_state_dict")
    prefixes = [h + "." for h in head_module_names(model, cfg)]
    prefixes += [n + "." for n, m in muscle_modules(model).items() if len(m.scales) > 1]
    prefixes += [n + "." for n in _fresh_prone_modules(model)]
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad or any(name.startswith(pre) for pre in prefixes):
            if type(p).__name__ == "Params4bit":
                raise ValueError(
                    f"adapter_state_dict: {name} is a 4-bit weight inside a saved head/MSLR module; "
                    "keep heads unquantized (llm_int8_skip_modules)"
                )
            out[name] = p.detach().contiguous()
    return out


def _fresh_prone_modules(model: nn.Module) -> list[str]:
    """The family's MSLR-target modules (BERT's pooler), patched or not.

    Checkpoints often lack them, so a fresh load initializes them at random; a LoRA-only
    adapter leaves them frozen but must still carry them, or a reload is another model."""
    fam = model_family(model)
    return find_modules(model, list(fam.mslr_targets)) if fam is not None else []


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``muscle_adapter.safetensors`` and ``muscle_config.json`` (atomically) to ``directory``."""
    cfg = require_patched(model, "save_adapter")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": "muscle_fast", "format_version": str(FORMAT_VERSION)}
    _atomic_safetensors(d / ADAPTER_WEIGHTS, tensors, meta)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    write_json(
        d / ADAPTER_CONFIG,
        {
            "format_version": FORMAT_VERSION,
            "muscle_config": cfg.to_dict(),
            "base_model_name_or_path": name_or_path,
            "model_class": type(model).__name__,
        },
        sort_keys=True,
    )
    return d


def _config_diff(a: MuScleConfig, b: MuScleConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in da if k != "backend" and da[k] != db.get(k))


def read_adapter_config(directory: str | os.PathLike) -> MuScleConfig:
    d = Path(directory)
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {ADAPTER_CONFIG} in {d}")
    meta = read_json(path, "adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: {path} has format_version {meta.get('format_version')!r}, "
            f"this muscle_fast reads {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("muscle_config"), dict):
        raise ValueError(f"load_adapter: {path} has no muscle_config object (not a muscle_fast adapter?)")
    try:
        return MuScleConfig.from_dict(meta["muscle_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {path}: {e}") from e


def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a saved adapter into ``model`` (patching it with the saved config if it is not patched yet).

    Only safetensors is read. With ``strict`` a missing or unexpected key, or a
    shape mismatch, is an error naming the key; a model patched with another
    config (or of another model type) is an error naming the differing fields. An unpatched
    model is patched first, so after a key or shape error it is left patched: reload it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: model must be a torch nn.Module, got {type(model).__name__}")
    d = Path(directory)
    saved_cfg = read_adapter_config(d)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_cfg.model_type and model_type and saved_cfg.model_type != model_type:
        raise ValueError(
            f"load_adapter: adapter in {d} was made for a {saved_cfg.model_type} model; "
            f"this one is {model_type}"
        )
    if is_patched(model):
        cfg = require_patched(model, "load_adapter")
        diff = _config_diff(saved_cfg, cfg)
        if diff:
            raise ValueError(
                f"load_adapter: adapter in {d} was made for another config; differing fields: "
                + ", ".join(
                    f"{k} (saved {saved_cfg.to_dict()[k]!r}, model {cfg.to_dict()[k]!r})" for k in diff
                )
            )
    else:
        # a saved head name this model lacks (the family default, on a model without a task head)
        # is left out; tensors saved for it are unexpected keys below
        heads = [h for h in saved_cfg.head_modules if find_modules(model, [h])]
        patch_model(model, dataclasses.replace(saved_cfg, head_modules=heads))
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: no {ADAPTER_WEIGHTS} in {d}")
    tensors = read_safetensors(weights, "adapter weights")
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    prone = tuple(n + "." for n in _fresh_prone_modules(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    older = [k for k in missing if k.startswith(prone) and k not in trainable]
    if older:  # adapters saved before these were stored: the model keeps what it loaded with
        logger.warning(
            f"load_adapter: {weights} does not store {older[:3]}{' ...' if len(older) > 3 else ''} "
            "(an older adapter); the base model's values are used, which match the trained model "
            "only if its checkpoint holds them"
        )
        missing = [k for k in missing if k not in older]
    if strict and (missing or extra):
        raise KeyError(
            f"load_adapter: key mismatch with {weights}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k not in params:
                continue
            if params[k].shape != v.shape:
                raise ValueError(
                    f"load_adapter: shape mismatch for {k}: saved {tuple(v.shape)}, "
                    f"model {tuple(params[k].shape)}"
                )
            params[k].copy_(v)
    return model


# --------------------------------------------------------------------------------------------------
# Merging and peft export
# --------------------------------------------------------------------------------------------------


def merged_weight(m: MuScleLinear) -> torch.Tensor:
    """The base weight with dW folded in, in the base layer's own layout and dtype."""
    if m.kind == "4bit":
        raise ValueError(
            f"merge: {m.name} has a 4-bit base; merging would re-quantize the weight and change "
            "results. Export with export_peft or keep the adapter separate."
        )
    w = m.base.weight
    dw = m.delta_weight()
    if m.kind == "conv1d":
        dw = dw.t()
    return (w.float() + dw).to(w.dtype)


def _plain_linear(m: MuScleLinear) -> nn.Module:
    """The base layer with dW folded into its weight (a new module; the base itself is untouched)."""
    import copy

    base = copy.deepcopy(m.base)
    with torch.no_grad():
        base.weight.copy_(merged_weight(m))
    return base


def _collapse_decoder_head(head: DecoderScoreHead) -> nn.Linear:
    """At inference dense -> dropout -> out_proj is one linear map: W = W_out @ W_dense."""
    dense = head.dense
    wd = merged_weight(dense) if isinstance(dense, MuScleLinear) else dense.weight
    wo = head.out_proj.weight
    w = (wo.float() @ wd.float()).to(wo.dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    lin.weight.requires_grad_(False)
    return lin


def _unpatched_copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state_dict as a plain model holds it (MuScleLinear merged, decoder head collapsed)."""
    if isinstance(module, DecoderScoreHead):
        return {"weight": _collapse_decoder_head(module).weight.detach()}
    if isinstance(module, MuScleLinear):
        return {k: v.detach() for k, v in _plain_linear(module).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, child in module.named_children():
        for k, v in _unpatched_copy_state(child).items():
            out[f"{name}.{k}"] = v
    for k, p in module.named_parameters(recurse=False):
        out[k] = p.detach()
    for k, b in module.named_buffers(recurse=False):
        if k not in module._non_persistent_buffers_set:
            out[k] = b.detach()
    return out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every dW into its base weight and remove muscle_fast's modules; returns the plain model.

    A patched decoder head becomes the single ``score`` linear it is equivalent to at
    inference. 4-bit bases are refused (re-quantizing would change the results).
    """
    require_patched(model, "merge_and_unload")
    mods = muscle_modules(model)
    for m in mods.values():
        if m.kind == "4bit":
            merged_weight(m)  # raises the clear error before anything is changed
    for name, m in mods.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            m.base.weight.copy_(merged_weight(m))
        setattr(parent, child, m.base)
    if isinstance(getattr(model, "score", None), DecoderScoreHead):
        model.score = _collapse_decoder_head(model.score)
    del model.muscle_config
    if hasattr(model, "muscle_report"):
        del model.muscle_report
    return model


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a standard peft LoRA adapter (adapter_config.json + adapter_model.safetensors).

    Scales fold into A (A' = diag(kvec) A, rank n*r, alpha' = n*alpha, via rank_pattern
    and alpha_pattern). Adapted modules inside the task head are merged into it and the
    head goes to ``modules_to_save`` (peft wraps the whole head for sequence
    classification anyway); a decoder head is collapsed to the single ``score`` linear.
    MSLR modules outside the head (BERT's pooler) go there too, merged: their base weight
    is often missing from the checkpoint, and a peft adapter cannot carry it otherwise.
    """
    cfg = require_patched(model, "export_peft")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    heads = head_module_names(model, cfg)
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    fan_in_fan_out = False
    whole = list(heads)  # modules peft stores in full (modules_to_save), dW merged in
    for name, m in muscle_modules(model).items():
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if len(m.scales) > 1:
            # an MSLR module's base (the pooler) is often not in the checkpoint, so a fresh load gets
            # it randomly initialized; peft adapters carry no base weights, so store the whole layer
            whole.append(name)
            continue
        if m.kind == "conv1d":
            fan_in_fan_out = True
        n = len(m.scales)
        a = (m.lora_A.float() * m.scale_vector[:, None]).detach()
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
        targets.append(name)
        rank_pattern[name] = m.rank
        alpha_pattern[name] = m.alpha * n
    for h in whole:
        for k, v in _unpatched_copy_state(model.get_submodule(h)).items():
            tensors[f"{prefix}{h}.{k}"] = v.cpu().contiguous()
    is_seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    first = next(iter(muscle_modules(model).values()), None)
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if is_seq_cls else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": first.rank if first is not None else cfg.lora_r,
        "lora_alpha": (first.alpha * len(first.scales)) if first is not None else cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": whole or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    _atomic_safetensors(
        d / "adapter_model.safetensors", {k: v.cpu() for k, v in tensors.items()}, {"format": "pt"}
    )
    write_json(d / "adapter_config.json", peft_cfg, sort_keys=True)
    return d
