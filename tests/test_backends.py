"""Whole patched models give the same loss and gradients on the Triton and the torch backends."""

from __future__ import annotations

import pytest
import torch
from reference import randomize_adapters
from tiny_models import tiny_batch, tiny_model

from muscle_fast import MuScleConfig, patch_model
from muscle_fast.dual import dual_gradients, trainable_params

LABELS = torch.tensor([0, 2, 1])


def _model(family: str, backend: str, device: str):
    model = tiny_model(family).to(device)
    patch_model(model, MuScleConfig.for_model(model, backend=backend))
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_triton_equals_torch(family, device):
    batch = {k: v.to(device) for k, v in tiny_batch(family).items()}
    out = {}
    for backend in ("torch", "triton"):
        model = _model(family, backend, device)
        loss = model(**batch, labels=LABELS.to(device)).loss
        loss.backward()
        out[backend] = (loss.detach(), [p.grad.clone() for p in trainable_params(model)])
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["triton"][1], out["torch"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1e-3, b.abs().max().item()))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_triton_single_pass_grouped_gradients(family, device):
    b = {k: v.to(device) for k, v in tiny_batch(family, batch=3, seq=7, seed=1).items()}
    b["labels"] = LABELS.to(device)
    r = {k: v.to(device) for k, v in tiny_batch(family, batch=2, seq=6, seed=2).items()}
    r["labels"] = torch.tensor([1, 0], device=device)
    res = {}
    for backend, single in (("torch", False), ("triton", True)):
        model = _model(family, backend, device)
        loss, ref_loss, c = dual_gradients(model, b, r, single_pass=single)
        res[backend] = (loss, ref_loss, [p.grad.clone() for p in trainable_params(model)], c)
    for i in (0, 1):
        torch.testing.assert_close(res["triton"][i], res["torch"][i], rtol=1e-5, atol=1e-6)
    for k in (2, 3):
        for a, e in zip(res["triton"][k], res["torch"][k], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * max(1e-3, e.abs().max().item()))
