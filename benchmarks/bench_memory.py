"""Measured peak GPU memory of training Llama-2-7B (or SmolLM2-135M) in 4-bit: MuScleLoRA vs LoRA-only
vs peft LoRA.

A Llama-2-7B-shaped sequence classifier (32 layers, hidden 4096, random weights: memory depends on
shapes only) is built in bf16 on the GPU and every decoder linear quantized to NF4 with double
quantization (the QLoRA default). One full optimizer step per case, batch 1 at sequence 512 and
2048, gradient checkpointing off and on. ``MEMORY_MODEL=smollm2-135m`` takes SmolLM2-135M's shape
instead (30 layers, hidden 576, 3 KV heads; batch 16 at 128 and 512): the real model's GGUF is
too large to travel to a lent GPU, and its weights' values do not change the memory.

* ``muscle``: the MuScleLoRA step of ``train_muscle`` (training + reference batch of the same size in
  one single-pass backward, gradient alignment, clip 1.0, AdamW), the library's Llama defaults
  (LoRA r=2 on q_proj/v_proj, MSLR on the score head);
* ``lora``: the same adapters, training batch only (what the baselines run);
* ``peft``: peft LoRA (same rank, alpha and targets, ``task_type=SEQ_CLS``) on the same 4-bit model.

Recorded per case: ``torch.cuda.max_memory_allocated`` over the step after a warm-up step (so the
AdamW state exists), the memory held before the step (weights, adapters, optimizer state) and the
analytic estimate of ``benchmarks/estimate_memory.py`` for the same setting. On the CPU a
two-layer model runs one step per case as a smoke check of the code path (no memory claims).

    pytest benchmarks/bench_memory.py --benchmark-json=memory.json
"""

from __future__ import annotations

import gc
import os

import estimate_memory  # benchmarks/, on sys.path under pytest like _models
import pytest
import torch
from _models import quantize_linears_4bit

pytest.importorskip("bitsandbytes")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: ``MEMORY_MODEL=smollm2-135m``: the SmolLM2-135M shape (issue #18) at its preset's batch 16 instead
#: of Llama-2-7B at batch 1 (the shapes: ``estimate_memory.SHAPES``).
MODEL = os.environ.get("MEMORY_MODEL", "llama-2-7b")
if MODEL not in estimate_memory.SHAPES:
    raise ValueError(f"MEMORY_MODEL must be one of {sorted(estimate_memory.SHAPES)}, got {MODEL!r}")
SHAPE = estimate_memory.SHAPES[MODEL]
if CUDA:
    DIMS, SEQS, BATCH, DTYPE = SHAPE.config(), list(SHAPE.seqs), SHAPE.batch, torch.bfloat16
else:
    DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=SHAPE.kv_heads * 4 // SHAPE.heads, vocab_size=101)  # fmt: skip
    SEQS, BATCH, DTYPE = [16], 1, torch.float32
GiB = 1024**3


def _build(impl: str):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**DIMS, num_labels=2, pad_token_id=0, max_position_embeddings=max(SEQS))
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # initialise in the training dtype: no fp32 copy of 7B weights
    try:
        with torch.device(DEVICE):
            model = LlamaForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(prev)
    quantize_linears_4bit(model.model, DTYPE, DEVICE)
    model.requires_grad_(False)
    if impl == "peft":
        peft = pytest.importorskip("peft")
        from muscle_fast.config import family_defaults

        fam = family_defaults("llama")
        targets = list(fam.lora_targets)
        lcfg = peft.LoraConfig(
            task_type="SEQ_CLS", r=fam.lora_r, lora_alpha=fam.lora_alpha, target_modules=targets
        )
        model.is_loaded_in_4bit = True  # as from_pretrained flags it: peft's bitsandbytes LoRA layer
        model = peft.get_peft_model(model, lcfg)  # its defaults (fp32 adapters), as a QLoRA user runs it
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(q).__module__ == "peft.tuners.lora.bnb", type(q)
    else:
        from muscle_fast import patch_model

        patch_model(model)
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return model.train()


# peft first: the baseline must not be what a time limit cuts
@pytest.fixture(scope="module", params=["peft", "muscle", "lora"])
def built(request):
    model = _build(request.param)
    yield request.param, model
    del model
    from muscle_fast import free_4bit_workspaces

    free_4bit_workspaces()  # the shared dequantization buffers must not count against the next impl
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _batch(seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, DIMS["vocab_size"], (BATCH, seq), generator=g).to(DEVICE),
        "attention_mask": torch.ones(BATCH, seq, dtype=torch.long, device=DEVICE),
        "labels": torch.randint(0, 2, (BATCH,), generator=g).to(DEVICE),
    }


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("seq", SEQS, ids=lambda s: f"seq{s}")
def test_train_step_memory(benchmark, built, seq: int, checkpointing: bool) -> None:
    from muscle_fast.align import GradientAligner
    from muscle_fast.dual import default_loss, dual_gradients, trainable_params
    from muscle_fast.train import set_activation_checkpointing

    impl, model = built
    set_activation_checkpointing(model, checkpointing)
    if not checkpointing and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()  # a hook a checkpointed case may have left (no-op if none)
    params = trainable_params(model)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    aligner = GradientAligner(params, min_ref_loss=0.0) if impl == "muscle" else None
    batch, ref = _batch(seq, 1), _batch(seq, 2)

    def step() -> None:
        if aligner is not None:
            _, ref_loss, c = dual_gradients(model, batch, ref, params=params)
            aligner.align(c, ref_loss, epoch=1)
        else:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            default_loss(model(**inputs).logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up: AdamW state, autotuning, workspaces (and LoRA B moves off zero)
    before = [p.detach().clone() for p in params]
    info = dict(impl=impl, model=MODEL, seq=seq, batch=BATCH, ref_batch=BATCH if aligner else 0,
                checkpointing=checkpointing, device=DEVICE, n_params=len(params),
                adapter_numel=sum(p.numel() for p in params), **DIMS)  # fmt: skip
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        info["held_before_gib"] = torch.cuda.memory_allocated() / GiB
    benchmark.pedantic(step, rounds=2 if CUDA else 1, iterations=1)
    if CUDA:
        info["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        info["gpu"] = torch.cuda.get_device_name()
        est = estimate_memory.components(BATCH, seq, checkpointing, info["ref_batch"], SHAPE)
        info["estimate_gib"] = {k: v / GiB for k, v in est.items()}
    benchmark.extra_info.update(info)
    set_activation_checkpointing(model, False)
    # every adapter tensor took a finite step: gradients reached it through 4-bit layers (and
    # through recomputed ones with checkpointing)
    pairs = zip(params, before, strict=True)
    moved = [bool(torch.isfinite(p).all()) and not torch.equal(p, b) for p, b in pairs]
    assert all(moved), f"{impl}: {moved.count(False)} of {len(params)} trainable tensors did not move"
