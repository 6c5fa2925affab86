"""One Llama-2-7B-shaped decoder layer in 4-bit (NF4): MuScleLoRA vs peft LoRA on bitsandbytes Linear4bit.

Forward + backward (with the input gradient, as inside a model), time and peak memory, batch 8 x 512
tokens, adapters on q_proj/v_proj (SPEC §3) and on all seven projections. On the CPU a tiny
layer runs once per case as a smoke check of the code path (no timing claims).

    pytest benchmarks/bench_qlora.py --benchmark-json=qlora.json
"""

from __future__ import annotations

import pytest
import torch
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


def _layer() -> tuple[nn.Module, nn.Module]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(**DIMS, num_hidden_layers=1, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(DTYPE)
    for name, lin in list(layer.named_modules()):
        if type(lin) is nn.Linear:
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=False, compute_dtype=DTYPE, quant_type="nf4"
            )
            q.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="nf4")
            q = q.to(DEVICE)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, q)
    layer = layer.to(DEVICE).requires_grad_(False)
    return layer, LlamaRotaryEmbedding(cfg).to(DEVICE)


def _adapt(layer: nn.Module, impl: str, targets: list[str]) -> nn.Module:
    if impl == "peft":
        peft = pytest.importorskip("peft")
        return peft.get_peft_model(
            layer, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets)
        )
    from muscle_fast import MuScleConfig, patch_model

    cfg = MuScleConfig(lora_r=RANK, lora_alpha=2.0 * RANK, lora_targets=targets, mslr_targets=[])
    return patch_model(layer, cfg)


@pytest.mark.parametrize("impl", ["peft", "ours"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_qlora_layer(benchmark, targets, impl):
    layer, rope = _layer()
    model = _adapt(layer, impl, TARGETS[targets])
    x = torch.randn(BATCH, SEQ, DIMS["hidden_size"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    pos = torch.arange(SEQ, device=DEVICE)[None].expand(BATCH, -1)
    cos_sin = rope(x, pos)
    benchmark.extra_info.update(
        dict(impl=impl, targets=targets, batch=BATCH, seq=SEQ, rank=RANK, device=DEVICE, **DIMS)
    )

    def step() -> None:
        out = model(x, position_embeddings=cos_sin)
        y = out[0] if isinstance(out, tuple) else out
        y.float().pow(2).mean().backward()
        x.grad = None
        if CUDA:
            torch.cuda.synchronize()

    step()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(step, rounds=5 if CUDA else 1, iterations=1)
    if CUDA:
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
