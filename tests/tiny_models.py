"""Tiny random Hugging Face models built from configs (no downloads) for the tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

FAMILIES = ("bert", "roberta", "gpt2", "llama")

_KW = {
    "bert": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
    ),
    "roberta": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=70,
        pad_token_id=1,
    ),
    "gpt2": dict(
        n_embd=48,
        n_layer=2,
        n_head=4,
        vocab_size=101,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
}


def tiny_config(family: str, num_labels: int = 3, **kw):
    cfg = AutoConfig.for_model(family, num_labels=num_labels, **{**_KW[family], **kw})
    for k in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "classifier_dropout",
    ):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def tiny_model(family: str, seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels, **kw))
    return model.to(dtype).eval()


def tiny_batch(family: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row: decoders must read the last non-padding token
    pad = 1 if family == "roberta" else 0
    ids[0, -2:] = pad
    return {"input_ids": ids, "attention_mask": mask}


# bitsandbytes 0.50's CPU dequantizer is wrong when a row length is even but not a multiple of the
# blocksize (it counts blocks per row, its quantizer per tensor): 4-bit tests use widths of 64k.
LLAMA_4BIT = dict(hidden_size=64, intermediate_size=128)


def quantize_linears_4bit(model, skip: tuple[str, ...] = ("score", "classifier"), nested: bool = True):
    """Replace every nn.Linear (but the head) by a bitsandbytes NF4 Linear4bit, quantized on the CPU
    (``nested``: double-quantized absmax, bitsandbytes' default)."""
    import bitsandbytes as bnb

    targets = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(n == s or n.startswith(s + ".") for s in skip)
    ]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
            compress_statistics=nested,
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=nested
        )
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(lin.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return exact_cpu_4bit(model)


def exact_cpu_4bit(model):
    """bnb's CPU inference shortcut repacks 4-bit weights and runs a bf16 GEMM: keep the exact path."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model
