"""Single-pass dual gradients equal the two-pass result (SPEC §4)."""

from __future__ import annotations

import pytest
import torch
from reference import randomize_adapters
from tiny_models import FAMILIES, LLAMA_4BIT, quantize_linears_4bit, tiny_batch, tiny_model

from muscle_fast import patch_model
from muscle_fast.dual import dual_gradients, trainable_params
from muscle_fast.train import set_activation_checkpointing


def _batches(family: str):
    b = tiny_batch(family, batch=3, seq=7, seed=1)
    b["labels"] = torch.tensor([0, 2, 1])
    r = tiny_batch(family, batch=4, seq=5, seed=2)  # other length: the single pass pads
    r["labels"] = torch.tensor([1, 1, 0, 2])
    return b, r


def _model(family: str, four_bit: bool = False):
    model = tiny_model(family, **(LLAMA_4BIT if four_bit else {}))
    if four_bit:
        quantize_linears_4bit(model)
    patch_model(model)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_single_pass_equals_two_pass(family):
    model = _model(family).train()
    b, r = _batches(family)
    params = trainable_params(model)
    loss2, ref2, c2 = dual_gradients(model, b, r, single_pass=False)
    g2 = [p.grad.clone() for p in params]
    loss1, ref1, c1 = dual_gradients(model, b, r, single_pass=True)
    g1 = [p.grad.clone() for p in params]
    assert model.training
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref1, ref2, rtol=1e-5, atol=1e-6)
    for i, p in enumerate(params):
        scale = max(g2[i].abs().max().item(), c2[i].abs().max().item(), 1e-6)
        torch.testing.assert_close(g1[i], g2[i], rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(c1[i], c2[i], rtol=1e-4, atol=1e-5 * scale)
        assert c1[i].shape == p.shape and float(c1[i].abs().sum()) > 0
    # and the training gradient is the plain gradient of the training loss
    model.zero_grad()
    logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
    for p, g in zip(params, g1, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_mode_is_left_alone():
    model = _model("bert").eval()
    b, r = _batches("bert")
    dual_gradients(model, b, r)
    assert not model.training


def test_falls_back_to_two_passes_when_a_param_is_outside(caplog):
    model = _model("bert")
    model.classifier.weight.requires_grad_(True)
    b, r = _batches("bert")
    with caplog.at_level("INFO", logger="muscle_fast"):
        _, _, c = dual_gradients(model, b, r)
    assert "two passes" in caplog.text
    params = trainable_params(model)
    idx = next(i for i, p in enumerate(params) if p is model.classifier.weight)
    assert len(c) == len(params) and c[idx] is not None and c[idx].shape == (3, 48)
    with pytest.raises(ValueError, match="single_pass=True needs"):
        dual_gradients(model, b, r, single_pass=True)


def test_accumulate_adds():
    model = _model("llama")
    b, r = _batches("llama")
    dual_gradients(model, b, r)
    g = [p.grad.clone() for p in trainable_params(model)]
    dual_gradients(model, b, r, accumulate=True)
    for p, g0 in zip(trainable_params(model), g, strict=True):
        torch.testing.assert_close(p.grad, 2 * g0)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([0, 3, 1, 1]), r"reference labels must be in \[0, 3\), got values in \[0, 3\]"),
        (torch.tensor([-1, 0, 1, 1]), r"reference labels must be in \[0, 3\)"),
    ],
)
def test_bad_reference_labels(labels, match):
    model = _model("bert")
    b, r = _batches("bert")
    r["labels"] = labels
    with pytest.raises(ValueError, match=match):
        dual_gradients(model, b, r)


def test_empty_reference_batch():
    model = _model("bert")
    b, r = _batches("bert")
    r = {k: v[:0] for k, v in r.items()}
    with pytest.raises(ValueError, match="reference batch is empty"):
        dual_gradients(model, b, r)


CKPT_CASES = [(f, False) for f in FAMILIES] + [("llama", True)]


CKPT_IDS = [f + ("-4bit" if q else "") for f, q in CKPT_CASES]


def _backward_in_another_thread(monkeypatch):
    """Run reentrant checkpoints' backward (the layers' recompute) on another OS thread, as CUDA's
    autograd does on its device thread."""
    import threading

    import torch.utils.checkpoint as cp

    orig = cp.CheckpointFunction.backward

    def in_thread(ctx, *grads):
        out = {}

        def run():
            try:
                out["r"] = orig(ctx, *grads)
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                out["e"] = e

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if "e" in out:
            raise out["e"]
        return out["r"]

    monkeypatch.setattr(cp.CheckpointFunction, "backward", staticmethod(in_thread))


@pytest.mark.parametrize(
    "reentrant,threaded", [(False, False), (True, False), (True, True)],
    ids=["non-reentrant", "reentrant", "reentrant-other-thread"],
)  # fmt: skip
@pytest.mark.parametrize("family,four_bit", CKPT_CASES, ids=CKPT_IDS)
def test_gradient_checkpointing_single_pass(family, four_bit, reentrant, threaded, monkeypatch):
    """HF gradient checkpointing (how a 7B model fits) recomputes the adapted layers in backward; the
    single pass must still route training and reference rows apart: same losses and gradients,
    bit for bit, as without checkpointing; also when the recompute runs on autograd's own thread."""
    from muscle_fast.layers import MuScleLinear

    if threaded:
        _backward_in_another_thread(monkeypatch)

    b, r = _batches(family)
    got = []
    for ckpt in (False, True):
        model = _model(family, four_bit).train()
        if ckpt:
            set_activation_checkpointing(model, True, reentrant=reentrant)
        calls: list[int] = []
        hook = lambda *_, sink=calls: sink.append(1)  # noqa: E731
        for m in model.modules():
            if isinstance(m, MuScleLinear):
                m.register_forward_hook(hook)
        loss, ref_loss, refs = dual_gradients(model, b, r, single_pass=True)
        grads = [p.grad for p in trainable_params(model)]
        got.append((loss, ref_loss, grads, refs, len(calls)))
    (l0, rl0, g0, c0, n0), (l1, rl1, g1, c1, n1) = got
    assert n1 > n0  # the decoder layers' adapters really ran again in backward
    assert torch.equal(l0, l1) and torch.equal(rl0, rl1)
    for a0, a1, r0, r1 in zip(g0, g1, c0, c1, strict=True):
        assert torch.equal(a0, a1)
        assert (r0 is None and r1 is None) or torch.equal(r0, r1)
        assert float(a0.abs().sum()) > 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_two_pass(family, reentrant):
    """The two-pass path (a trainable parameter outside the adapters) under checkpointing: the same
    training and reference gradients as without. ``torch.autograd.grad`` returned None for every
    adapter inside a reentrant checkpoint and added c into their ``p.grad``."""
    b, r = _batches(family)
    got = []
    for ckpt in (False, True):
        model = _model(family).train()
        # bert's classifier is plain; llama's score head holds an MSLR module: train its final norm
        (model.model.norm if family == "llama" else model.classifier).requires_grad_(True)
        if ckpt:
            set_activation_checkpointing(model, True, reentrant=reentrant)
        loss, ref_loss, refs = dual_gradients(model, b, r)
        got.append((loss, ref_loss, [p.grad for p in trainable_params(model)], refs))
    (l0, rl0, g0, c0), (l1, rl1, g1, c1) = got
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(rl1, rl0, rtol=0, atol=0)
    assert len(g0) == len(c0) > 4
    for a0, a1, r0, r1 in zip(g0, g1, c0, c1, strict=True):
        assert r0 is not None and r1 is not None and float(r0.abs().sum()) > 0
        torch.testing.assert_close(a1, a0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r1, r0, rtol=1e-6, atol=1e-7)


def test_loss_scale_scales_both_gradients():
    """``loss_scale`` (a DDP rank's share of an uneven batch) multiplies g and c, not the losses."""
    b, r = _batches("bert")
    out = []
    for scale in (1.0, 0.375):
        model = _model("bert").train()
        loss, ref_loss, refs = dual_gradients(model, b, r, loss_scale=scale)
        out.append((loss, ref_loss, [p.grad for p in trainable_params(model)], refs))
    (l0, rl0, g0, c0), (l1, rl1, g1, c1) = out
    assert torch.equal(l0, l1) and torch.equal(rl0, rl1)
    for a0, a1, r0, r1 in zip(g0, g1, c0, c1, strict=True):
        # the scale enters at the loss and is rounded through every layer: relative to the tensor
        for x1, x0 in ((a1, a0), (r1, r0)):
            torch.testing.assert_close(x1, x0 * 0.375, rtol=1e-5, atol=1e-6 * float(x0.abs().max()))
