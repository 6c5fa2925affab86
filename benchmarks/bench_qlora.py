"""One Llama-2-7B-shaped decoder layer in 4-bit (NF4): MuScleLoRA vs peft LoRA on bitsandbytes Linear4bit.

Forward + backward (with the input gradient, as inside a model), time and peak memory, batch 8 x 512
tokens, adapters on q_proj/v_proj (SPEC §3) and on all seven projections. On the CPU a tiny
layer runs once per case as a smoke check of the code path (no timing claims).

``test_qlora_layer_profile`` (CUDA) splits the GPU time of one step by kernel kind (frozen GEMMs,
4-bit dequantization, our low-rank kernels, attention, the rest) and compares the kernels' sum with
the step's wall time: it says where a speed-up over peft could still come from.

    pytest benchmarks/bench_qlora.py --benchmark-json=qlora.json
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from _models import quantize_linears_4bit
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    DIMS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    BATCH, SEQ, DTYPE = 8, 512, torch.bfloat16
else:
    DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    BATCH, SEQ, DTYPE = 2, 16, torch.float32
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all7": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RANK = 16


@functools.cache
def _base_layer() -> tuple[nn.Module, nn.Module]:
    """The 4-bit layer, built and quantized once per session (several seconds on the CPU)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    # SDPA, as a loaded model gets: with no mask it runs causal (flash) attention, as in training
    cfg = LlamaConfig(**DIMS, num_hidden_layers=1, max_position_embeddings=SEQ, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(DTYPE)
    layer = quantize_linears_4bit(layer, DTYPE, DEVICE).to(DEVICE).requires_grad_(False)
    return layer, LlamaRotaryEmbedding(cfg).to(DEVICE)


def _layer() -> tuple[nn.Module, nn.Module]:
    """A fresh copy of the 4-bit layer (each impl patches its own) and the rotary embedding."""
    layer, rope = _base_layer()
    return copy.deepcopy(layer), rope


def _adapt(layer: nn.Module, impl: str, targets: list[str]) -> nn.Module:
    if impl.startswith("peft"):
        peft = pytest.importorskip("peft")
        # peft picks its bitsandbytes LoRA layer only for models flagged as loaded in 4-bit (as
        # from_pretrained flags them); without it the generic layer runs, unlike real QLoRA
        layer.is_loaded_in_4bit = True
        # "peft": its default, adapters in fp32 (autocast_adapter_dtype), as a QLoRA user gets it;
        # "peft-bf16": adapters in the compute dtype, the closer match to ours (fp32 weights, bf16 math)
        model = peft.get_peft_model(
            layer,
            peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets),
            autocast_adapter_dtype=impl == "peft",
        )
        kinds = {
            type(m).__module__ + "." + type(m).__name__
            for n, m in model.named_modules()
            if n.endswith(targets[0])
        }
        assert kinds == {"peft.tuners.lora.bnb.Linear4bit"}, kinds
        return model
    from muscle_fast import MuScleConfig, patch_model

    cfg = MuScleConfig(lora_r=RANK, lora_alpha=2.0 * RANK, lora_targets=targets, mslr_targets=[])
    return patch_model(layer, cfg)


def _step_fn(targets: str, impl: str):
    """(model, one forward+backward step) for a fresh 4-bit layer with ``impl``'s adapters."""
    layer, rope = _layer()
    model = _adapt(layer, impl, TARGETS[targets])
    x = torch.randn(BATCH, SEQ, DIMS["hidden_size"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    pos = torch.arange(SEQ, device=DEVICE)[None].expand(BATCH, -1)
    cos_sin = rope(x, pos)

    def step() -> None:
        out = model(x, position_embeddings=cos_sin)
        y = out[0] if isinstance(out, tuple) else out
        y.float().pow(2).mean().backward()
        x.grad = None
        if CUDA:
            torch.cuda.synchronize()

    return model, step


@pytest.mark.parametrize("impl", ["peft", "peft-bf16", "ours"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_qlora_layer(benchmark, targets, impl):
    from muscle_fast import free_4bit_workspaces

    model, step = _step_fn(targets, impl)
    benchmark.extra_info.update(
        dict(impl=impl, targets=targets, batch=BATCH, seq=SEQ, rank=RANK, device=DEVICE, **DIMS)
    )
    step()
    free_4bit_workspaces()  # our dequant buffers are part of the step's peak: allocated inside it
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(step, rounds=5 if CUDA else 1, iterations=1)
    if CUDA:
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    if impl == "ours":  # what "auto" measured faster: our kernels or cuBLAS / bitsandbytes
        from muscle_fast.ops.lowrank import measured_choices

        benchmark.extra_info["picked"] = measured_choices()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


# Kernel kinds by name (lower case). Frozen GEMMs are cuBLAS/CUTLASS (peft's LoRA GEMMs too: they
# are small and counted there); ours are Triton kernels named after their functions.
KINDS = {
    "dequant": ("dequant",),
    "lowrank_triton": (
        "_shrink_kernel",
        "_expand_kernel",
        "_bwd_ds_db_kernel",
        "_grad_a_kernel",
        "_dropout_mask_kernel",
    ),  # fmt: skip
    "attention": ("flash", "fmha", "attention", "softmax", "efficient"),
    "gemm": ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "sm90_", "sm80_"),
}


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k in low for k in keys):
            return kind
    return "other"


@pytest.mark.skipif(not CUDA, reason="splits GPU kernel time: needs CUDA")
@pytest.mark.parametrize("impl", ["peft", "ours"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_qlora_layer_profile(benchmark, targets, impl):
    from torch.profiler import ProfilerActivity, profile

    model, step = _step_fn(targets, impl)
    for _ in range(2):
        step()
    n = 3
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    wall_ms = (time.perf_counter() - t0) / n * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()
        by_kind[kernel_kind(evt.name)] = by_kind.get(kernel_kind(evt.name), 0.0) + us / n / 1e3
        by_name[evt.name] = by_name.get(evt.name, 0.0) + us / n / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    gpu_ms = sum(by_kind.values())
    benchmark.extra_info.update(
        dict(impl=impl, targets=targets, batch=BATCH, seq=SEQ, rank=RANK, wall_ms=wall_ms, kernel_ms=gpu_ms,
             by_kind_ms=by_kind, top_kernels_ms=dict(top), gpu=torch.cuda.get_device_name(), **DIMS)
    )  # fmt: skip
    print(f"\n{targets}-{impl}: wall {wall_ms:.2f} ms, kernels {gpu_ms:.2f} ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))  # fmt: skip
    benchmark.pedantic(step, rounds=1, iterations=1)
    assert gpu_ms > 0
