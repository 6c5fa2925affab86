"""The training loop: it learns, selects on dev, and a killed run resumes to the same state."""

from __future__ import annotations

import pytest
import torch
from helpers import WordTokenizer, make_rows
from tiny_models import tiny_model

from muscle_fast import patch_model
from muscle_fast.train import TrainConfig, accuracy, train_muscle


def _model(family="bert"):
    model = tiny_model(family, num_labels=2)
    patch_model(model)
    return model


def _cfg(**kw):
    base = dict(
        lr=5e-3,
        epochs=2,
        batch_size=8,
        eval_batch_size=16,
        max_length=16,
        seed=3,
        min_ref_loss=0.4,
        max_raw_grad_ratio=0.1,
        ga_epoch=1,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_trains_and_selects_best_epoch():
    model = _model()
    tok = WordTokenizer()
    train, ref, dev = make_rows(96, 0), make_rows(24, 1), make_rows(48, 2)
    before = accuracy(model, tok, dev)
    res = train_muscle(
        model, tok, train, ref, dev, _cfg(epochs=3, align=False), eval_sets={"dev_poison": dev[:8]}
    )
    assert len(res.history) == 3 and {"epoch", "train_loss", "dev_acc", "dev_poison"} <= set(res.history[0])
    assert res.best_dev_acc == max(h["dev_acc"] for h in res.history)
    assert res.history[res.best_epoch - 1]["dev_acc"] == res.best_dev_acc
    assert accuracy(model, tok, dev) == pytest.approx(res.best_dev_acc)  # best state loaded back
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.best_dev_acc >= before


@pytest.mark.parametrize(
    "family, extra",
    [
        ("bert", {}),
        ("llama", {}),
        ("bert", {"ref_subspace": 3}),
        ("bert", {"teacher_epochs": 2}),
        ("bert", {"scan_alpha": 0.5, "teacher_epochs": 1}),
    ],
)
def test_resume_after_kill_reaches_the_same_state(tmp_path, family, extra):
    """(ref_subspace: the aligner's buffers of past reference gradients travel in the checkpoint;
    teacher_epochs: the resumed run trains the teacher again and gets the same corrected rows;
    scan_alpha: the resumed run scans again and drops the same rows.)"""
    tok = WordTokenizer()
    train, ref, dev = make_rows(40, 0), make_rows(16, 1), make_rows(16, 2)
    cfg = _cfg(checkpoint_every=2, min_ref_loss=0.0, **extra)
    full = _model(family)
    res_full = train_muscle(full, tok, train, ref, dev, cfg)
    killed = _model(family)
    cfg_k = _cfg(checkpoint_every=2, min_ref_loss=0.0, checkpoint_dir=str(tmp_path / "ck"), **extra)
    train_muscle(killed, tok, train, ref, dev, cfg_k, stop_after_steps=7)  # mid epoch 2 (5 steps/epoch)
    resumed = _model(family)
    res = train_muscle(resumed, tok, train, ref, dev, cfg_k)
    assert [h["dev_acc"] for h in res.history] == [h["dev_acc"] for h in res_full.history]
    # the interrupted epoch's mean loss covers its steps before the kill too
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in res_full.history]
    for (n, p), (_, q) in zip(resumed.named_parameters(), full.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """Same trainable parameters but another batch size, seed or method (lora vs lora+ga share
    names): resuming would silently mix two runs."""
    tok = WordTokenizer()
    train, ref, dev = make_rows(40, 0), make_rows(16, 1), make_rows(16, 2)
    ck = str(tmp_path / "ck")
    train_muscle(_model(), tok, train, ref, dev, _cfg(checkpoint_dir=ck), stop_after_steps=2)
    for change, match in (
        (dict(batch_size=4), r"batch_size 8 there, 4 here"),
        (dict(align=False), r"align True there, False here"),
        (dict(seed=1), r"seed 3 there, 1 here"),
    ):
        with pytest.raises(ValueError, match=f"written by another run: {match}"):
            train_muscle(_model(), tok, train, ref, dev, _cfg(checkpoint_dir=ck, **change))
    with pytest.raises(ValueError, match="train_rows 40 there, 32 here"):
        train_muscle(_model(), tok, train[:32], ref, dev, _cfg(checkpoint_dir=ck))
    # how it is run may change: progress bars, backend, checkpoint cadence
    train_muscle(_model(), tok, train, ref, dev, _cfg(checkpoint_dir=ck, checkpoint_every=3, progress=True))


def test_alignment_changes_the_update():
    tok = WordTokenizer()
    train, ref, dev = make_rows(32, 0), make_rows(16, 1), make_rows(16, 2)
    a, b = _model(), _model()
    train_muscle(a, tok, train, ref, dev, _cfg(epochs=1, align=True, min_ref_loss=0.0))
    train_muscle(b, tok, train, ref, dev, _cfg(epochs=1, align=False))
    diffs = [float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)]
    assert max(diffs) > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(train_rows=[]), "training set is empty"),
        (dict(dev_rows=[]), "dev set is empty"),
        (dict(ref_rows=[]), "non-empty reference set"),
        (dict(ref_rows=[("w1 w2", 5)]), r"ref_rows has labels outside \[0, 2\): \[5\]"),
    ],
)
def test_bad_input(kw, match):
    args = dict(train_rows=make_rows(8, 0), ref_rows=make_rows(4, 1), dev_rows=make_rows(4, 2))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        train_muscle(
            _model(), WordTokenizer(), args["train_rows"], args["ref_rows"], args["dev_rows"], _cfg()
        )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(grad_clip=-1.0), r"grad_clip must be a finite number >= 0, got -1.0"),
        (dict(grad_clip=float("nan")), "grad_clip must be a finite number >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
        (dict(checkpoint_every=-2), "checkpoint_every must be a finite number >= 0"),
        (dict(backend="cuda-fast"), r"TrainConfig.backend must be one of \('auto', 'torch', 'triton'\)"),
    ],
)
def test_bad_config_values(kw, match):
    """Values that would silently train wrongly (a negative max norm is gradient ascent) or fail late."""
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_grad_clip_zero_turns_clipping_off():
    """grad_clip=0 means no clipping: the run equals one whose max norm no gradient reaches."""
    tok = WordTokenizer()
    train, ref, dev = make_rows(24, 0), make_rows(8, 1), make_rows(8, 2)
    params = []
    for clip in (0.0, 1e9):
        model = _model()
        train_muscle(model, tok, train, ref, dev, _cfg(grad_clip=clip, epochs=1))
        params.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    assert params[0] and all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    assert any(float(p.abs().sum()) > 0 for p in params[0])


def test_activation_checkpointing_switch():
    from muscle_fast.train import set_activation_checkpointing

    model = tiny_model("llama")
    set_activation_checkpointing(model, True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    set_activation_checkpointing(model, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    set_activation_checkpointing(plain, False)  # nothing to turn off: no error
    with pytest.raises(ValueError, match="Sequential does not support activation"):
        set_activation_checkpointing(plain, True)


@pytest.mark.parametrize("align", [False, True])
def test_row_filter_leaves_out_unlikely_rows(align):
    """min_prob ~0 keeps every row (same run as no filter); one above every row's probability keeps
    none, so the parameters never move (AdamW with zero gradients, no weight decay); in between the
    kept share is recorded per epoch."""
    tok = WordTokenizer()
    train, ref, dev = make_rows(32, 0), make_rows(16, 1), make_rows(16, 2)
    kw = dict(epochs=1, align=align, min_ref_loss=0.0)
    plain, tiny, none, half = _model(), _model(), _model(), _model()
    start = [p.detach().clone() for p in none.parameters()]
    train_muscle(plain, tok, train, ref, dev, _cfg(**kw))
    res = train_muscle(tiny, tok, train, ref, dev, _cfg(row_filter_min_prob=1e-12, **kw))
    assert res.history[0]["rows_kept"] == 1.0
    for (n, p), q in zip(tiny.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    res = train_muscle(none, tok, train, ref, dev, _cfg(row_filter_min_prob=0.999, **kw))
    assert res.history[0]["rows_kept"] == 0.0
    assert all(torch.equal(p, s) for p, s in zip(none.parameters(), start, strict=True))
    res = train_muscle(half, tok, train, ref, dev, _cfg(row_filter_min_prob=0.5, **kw))
    assert 0.0 < res.history[0]["rows_kept"] < 1.0


def test_masked_loss_is_the_kept_rows_share_of_the_mean():
    from muscle_fast.train import _masked_loss

    logits, labels = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    masked = torch.tensor([0, -100, 1, -100, -100, 2])
    keep = masked != -100
    want = torch.nn.functional.cross_entropy(logits[keep], labels[keep]) * keep.sum() / 6
    torch.testing.assert_close(_masked_loss(logits, masked), want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(keep_raw_cos=1.5), r"keep_raw_cos must be None or in \[-1, 1\], got 1.5"),
        (dict(row_filter_min_prob=1.0), r"row_filter_min_prob must be in \[0, 1\), got 1.0"),
        (dict(row_filter_min_prob="0.5"), "row_filter_min_prob must be number"),
        (dict(ref_subspace=-2), "ref_subspace must be >= 0, got -2"),
        (dict(ref_subspace=1.5), "ref_subspace must be int"),
        (dict(ref_subspace=4, keep_raw_cos=0.2), "ref_subspace and keep_raw_cos cannot be combined"),
        (dict(teacher_epochs=-1), "teacher_epochs must be >= 0, got -1"),
        (dict(teacher_relabel_prob=0.4), r"teacher_relabel_prob must be in \[0.5, 1\], got 0.4"),
    ],
)
def test_bad_defense_option_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _cfg(**kw)


@pytest.mark.parametrize(
    "relabel_prob, want_rows, relabeled, dropped",
    [
        (0.5, [("a", 0), ("b", 1), ("c", 0), ("d", 1)], 2, 0),
        (0.8, [("a", 0), ("b", 1), ("d", 1)], 1, 1),
        (1.0, [("a", 0), ("d", 1)], 0, 2),
    ],
)
def test_teacher_relabels_confident_contradictions_and_drops_the_rest(
    monkeypatch, relabel_prob, want_rows, relabeled, dropped
):
    """Rows the teacher agrees with (or ties) keep their label; a contradicted row takes the
    teacher's label when it is at least relabel_prob sure, else leaves the training set."""
    import muscle_fast.train as tr

    probs = torch.tensor([[0.9, 0.1], [0.05, 0.95], [0.7, 0.3], [0.5, 0.5]])  # rows a, b, c, d
    monkeypatch.setattr(tr, "predict_proba", lambda *a, **k: probs)
    seen = {}

    def fake_train(model, tok, train, ref, dev, cfg, eval_sets=None):
        seen.update(train=train, cfg=cfg)
        return tr.TrainResult(best_epoch=2, best_dev_acc=0.75, history=[{"epoch": 1}, {"epoch": 2}])

    monkeypatch.setattr(tr, "train_muscle", fake_train)
    data = tr._Data(train=[("a", 0), ("b", 0), ("c", 1), ("d", 1)], ref=[("r", 1)], dev=[("v", 0)], extra={})
    cfg = _cfg(
        teacher_epochs=4, teacher_relabel_prob=relabel_prob, checkpoint_dir="x", row_filter_min_prob=0.3
    )
    rows, record = tr._teacher_corrected(None, None, cfg, data)
    assert rows == want_rows
    assert (record["relabeled"], record["dropped"], record["rows"], record["best_epoch"]) == (
        relabeled,
        dropped,
        4,
        2,
    )
    # the rows it touched, by position: b (index 1) is contradicted at 0.95, c (index 2) at 0.7
    assert len(record["relabeled_index"]) == relabeled and len(record["dropped_index"]) == dropped
    assert sorted(record["relabeled_index"] + record["dropped_index"]) == [1, 2]
    # the teacher trains on the reference rows alone, unaligned, unfiltered and without checkpoints
    t = seen["cfg"]
    assert seen["train"] == [("r", 1)] and t.epochs == 4 and not t.align and t.teacher_epochs == 0
    assert t.row_filter_min_prob == 0.0 and t.checkpoint_dir is None


def test_teacher_cache_trains_once_and_loads_the_teacher(monkeypatch):
    """The first call trains the teacher into the cache; a later one loads its best state into the
    model's trainable parameters instead of training, and corrects its own rows with it; a cache
    holding another model's parameters is refused by name."""
    import muscle_fast.train as tr

    monkeypatch.setattr(tr, "predict_proba", lambda m, t, rows, *a: torch.tensor([[0.2, 0.8]] * len(rows)))
    trained = []

    def fake_train(model, tok, train, ref, dev, cfg, eval_sets=None):
        with torch.no_grad():
            model.weight.fill_(0.5)
        trained.append(cfg.epochs)
        best = {"weight": model.weight.detach().clone()}
        return tr.TrainResult(best_epoch=1, best_dev_acc=0.5, best_state=best)

    monkeypatch.setattr(tr, "train_muscle", fake_train)
    cfg = _cfg(teacher_epochs=3)
    cache = tr.TeacherCache()
    first, second = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    data = tr._Data(train=[("a", 0), ("b", 1)], ref=[("r", 1)], dev=[("v", 0)], extra={})
    rows, _ = tr._teacher_corrected(first, None, cfg, data, cache)
    assert trained == [3] and cache.result is not None and rows == [("b", 1)]  # a: dropped
    data2 = tr._Data(train=[("c", 1)], ref=[("r", 1)], dev=[("v", 0)], extra={})
    rows, record = tr._teacher_corrected(second, None, cfg, data2, cache)
    assert trained == [3] and rows == [("c", 1)] and record["best_epoch"] == 1
    assert torch.equal(second.weight, torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"teacher_cache holds another model's parameters .*'bias'"):
        tr._teacher_corrected(torch.nn.Linear(2, 2), None, cfg, data2, cache)


def test_teacher_run_trains_on_the_corrected_rows():
    """End to end on the tiny model: the teacher's record is in the result, the main run's epochs
    follow it."""
    tok = WordTokenizer()
    train, ref, dev = make_rows(48, 0), make_rows(24, 1), make_rows(16, 2)
    flipped = [(t, 1 - lab) for t, lab in train]  # every label wrong: a teacher that learned contradicts many
    res = train_muscle(_model(), tok, flipped, ref, dev, _cfg(teacher_epochs=3, teacher_relabel_prob=0.5))
    t = res.teacher
    assert t["rows"] == 48 and t["dropped"] == 0 and t["relabeled"] > 0 and len(t["history"]) == 3
    assert len(res.history) == 2 and res.best_epoch in (1, 2)


def test_teacher_row_positions_count_the_rows_the_scan_dropped(monkeypatch):
    """With the scan before it, the teacher's row lists still name positions in the caller's
    train_rows: the rows the scan dropped are skipped, not renumbered."""
    import muscle_fast.train as tr

    train = make_rows(5, 0)

    def fake_scan(cfg, data):
        return [data.train[i] for i in (0, 2, 4)], {"flagged": 2, "dropped_index": [1, 3]}

    def fake_teacher(model, tok, cfg, data, cache=None):
        assert data.train == [train[0], train[2], train[4]]
        return data.train[:1], {
            "rows": 3,
            "dropped": 1,
            "relabeled": 1,
            "dropped_index": [1],
            "relabeled_index": [2],
        }

    monkeypatch.setattr(tr, "_scanned", fake_scan)
    monkeypatch.setattr(tr, "_teacher_corrected", fake_teacher)
    tok = WordTokenizer()
    cfg = _cfg(scan_alpha=1e-3, teacher_epochs=1, epochs=1)
    res = train_muscle(_model(), tok, train, make_rows(8, 1), make_rows(8, 2), cfg)
    assert res.teacher["dropped_index"] == [2] and res.teacher["relabeled_index"] == [4]
    assert res.scan["dropped_index"] == [1, 3]


def test_teacher_record_counts_poisoned_rows():
    from muscle_fast.experiment.run import _teacher_record

    teacher = {
        "rows": 6,
        "dropped": 2,
        "relabeled": 1,
        "history": [{}],
        "dropped_index": [0, 3],
        "relabeled_index": [5],
    }
    flags = [True, False, False, False, True, True]
    assert _teacher_record(teacher, flags) == {
        "rows": 6,
        "dropped": 2,
        "relabeled": 1,
        "poison_rows": 3,
        "poison_dropped": 1,
        "clean_dropped": 1,
        "poison_relabeled": 1,
        "clean_relabeled": 0,
    }
    assert _teacher_record(teacher, None) == {"rows": 6, "dropped": 2, "relabeled": 1}


def test_teacher_that_drops_every_row_is_refused(monkeypatch):
    import muscle_fast.train as tr

    monkeypatch.setattr(tr, "predict_proba", lambda m, t, rows, *a: torch.tensor([[0.1, 0.9]] * len(rows)))
    tok = WordTokenizer()
    train = [(t, 0) for t, _ in make_rows(8, 0)]
    with pytest.raises(ValueError, match="the teacher dropped every training row"):
        train_muscle(_model(), tok, train, make_rows(8, 1), make_rows(8, 2), _cfg(teacher_epochs=1))
