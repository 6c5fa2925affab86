"""A whole MuScleLoRA training step: ours (single pass + fused alignment) vs the paper's (two passes + loop).

One step = training and reference gradients, gradient alignment, clip 1.0, AdamW step. Models
are random-weight, built from configs: BERT-base-shaped (batch 32 + reference 32, sequence 64)
and a Llama-shaped decoder (smaller on the CPU so that the CPU ratio is measurable here).

    pytest benchmarks/bench_step.py --benchmark-json=step.json
"""

from __future__ import annotations

import pytest
import torch

from muscle_fast import patch_model
from muscle_fast.align import GradientAligner, align_loop_reference
from muscle_fast.dual import dual_gradients, trainable_params

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    torch.set_num_threads(2)

MODELS = {
    "bert-base": (
        "bert",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    "llama": (
        "llama",
        dict(
            hidden_size=4096 if CUDA else 1024,
            num_hidden_layers=8 if CUDA else 4,
            num_attention_heads=32 if CUDA else 8,
            num_key_value_heads=32 if CUDA else 8,
            intermediate_size=11008 if CUDA else 2816,
            pad_token_id=0,
        ),
    ),
}
BATCH, SEQ = (32, 64) if CUDA else (16, 64)


def _model(name: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    family, kw = MODELS[name]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, num_labels=2, vocab_size=1000, **kw)
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = AutoModelForSequenceClassification.from_config(cfg).to(device=DEVICE, dtype=dtype)
    patch_model(model)
    return model.train()


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 1000, (n, SEQ), generator=g).to(DEVICE),
        "attention_mask": torch.ones(n, SEQ, dtype=torch.long, device=DEVICE),
        "labels": torch.randint(0, 2, (n,), generator=g).to(DEVICE),
    }


@pytest.mark.parametrize("impl", ["paper", "ours"])
@pytest.mark.parametrize("name", list(MODELS))
def test_step(benchmark, name, impl):
    model = _model(name)
    params = trainable_params(model)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    aligner = GradientAligner(params, min_ref_loss=0.0)
    batch, ref = _batch(BATCH, 1), _batch(BATCH, 2)
    benchmark.extra_info.update(
        dict(
            model=name,
            impl=impl,
            batch=BATCH,
            ref_batch=BATCH,
            seq=SEQ,
            device=DEVICE,
            n_params=len(params),
            adapter_numel=sum(p.numel() for p in params),
        )
    )
    if CUDA:
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()

    def step() -> None:
        if impl == "ours":
            _, ref_loss, c = dual_gradients(model, batch, ref, params=params, single_pass=True)
            aligner.align(c, ref_loss, epoch=1)
        else:
            _, ref_loss, c = dual_gradients(model, batch, ref, params=params, single_pass=False)
            align_loop_reference(params, c, ref_loss, 1, min_ref_loss=0.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up (autotune, allocator)
    benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
