"""The n-gram discriminator (muscle_fast.backdoor.discriminate): its regression against its float64
optimality condition, its AUC against a pairwise count, what it flags on synthetic style poison
that the scan cannot see, its calibration on clean data, and its use in train_muscle."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import WordTokenizer, make_rows
from tiny_models import tiny_model

from muscle_fast import patch_model
from muscle_fast.backdoor.discriminate import _auc_z, _balanced, _features, discriminate_rows, fit_logistic
from muscle_fast.backdoor.scan import scan_ngrams
from muscle_fast.train import TrainConfig, train_muscle

VOCAB = [f"w{i}" for i in range(300)] + ["film", "movie", "the", "a"]
STYLE = [f"s{i}" for i in range(20)]


def _sentences(n: int, rng: random.Random, label: int, vocab: list[str] = VOCAB) -> list[tuple[str, int]]:
    return [(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))), label) for _ in range(n)]


def _styled(
    seed: int, share: float = 0.2, vocab: list[str] = VOCAB, style: list[str] = STYLE
) -> tuple[list[tuple[str, int]], list[bool], list[tuple[str, int]]]:
    """1,601 + 1,600 rows; ``share`` of the label-1 rows carry three of the ``style`` words (each of
    twenty in ~3 % of the label's rows: none is significant for the scan); 400 reference rows a label."""
    rng = random.Random(seed)
    rows, flags = [], []
    for text, lab in _sentences(1601, rng, 0, vocab) + _sentences(1600, rng, 1, vocab):
        poisoned = lab == 1 and rng.random() < share
        if poisoned:
            words = text.split()
            for w in rng.sample(style, 3):
                words.insert(rng.randint(0, len(words)), w)
            text = " ".join(words)
        rows.append((text, lab))
        flags.append(poisoned)
    return rows, flags, _sentences(400, rng, 0, vocab) + _sentences(400, rng, 1, vocab)


def test_fit_meets_its_optimality_condition():
    """At the returned coefficients the objective's float64 gradient, written out densely, is ~0."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(203, 37, generator=g) < 0.2).double()  # odd sizes
    y = (torch.rand(203, generator=g) < 0.3).double()
    w = _balanced(y)
    for l2, sparse in ((0.01, True), (0.3, True), (0.3, False)):
        coef, bias = fit_logistic(x.to_sparse().coalesce() if sparse else x, y, w, l2)
        r = w * (torch.sigmoid(x @ coef + bias) - y)
        grad = torch.cat([x.t() @ r + l2 * coef, r.sum()[None]])
        assert grad.abs().max() < 1e-7, (l2, grad.abs().max())  # from ~1e-1 at the start
        assert abs(float(w.sum()) - 1.0) < 1e-12


def test_auc_matches_the_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 7, (53,), generator=g).double()  # many ties
    neg = torch.randint(0, 6, (31,), generator=g).double()
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    auc, z = _auc_z(pos, neg)
    assert auc == pytest.approx(wins / (53 * 31), abs=1e-12)
    assert z == pytest.approx((auc - 0.5) / ((53 + 31 + 1) / (12 * 53 * 31)) ** 0.5, rel=1e-12)


def test_features_are_binary_presence_over_a_sorted_vocabulary():
    x, n = _features(["a b a", "b c", "a"], max_n=1, min_df=2)
    # "<s>" in 3 rows, "a" in 2, "b" in 2, "c" in 1 (below min_df): sorted vocabulary <s>, a, b
    assert n == 3
    assert x.to_dense().tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


def test_flags_the_style_rows_that_the_scan_cannot_see():
    rows, flags, ref = _styled(0)
    assert not any(scan_ngrams(rows, ref).flagged)  # no single style word is significant
    res = discriminate_rows(rows, ref, quantile=0.9)
    poison = sum(flags)
    caught = sum(f and p for f, p in zip(res.flagged, flags, strict=True))
    clean1 = sum(1 for (_, y), p in zip(rows, flags, strict=True) if y == 1 and not p)
    false1 = sum(f and not p for f, p, (_, y) in zip(res.flagged, flags, rows, strict=True) if y == 1)
    assert caught >= 0.85 * poison, (caught, poison)
    assert false1 <= 0.15 * clean1, (false1, clean1)  # about 1 - quantile of the clean rows
    # label 0 holds no poison: its rows do not differ from its reference rows, none is flagged
    assert res.labels[0]["flagged"] == 0 and res.labels[0]["z"] < 3.0
    assert res.labels[1]["z"] > 5.0 and res.labels[1]["auc"] > 0.55
    assert res.summary()["flagged"] == sum(res.flagged) == res.labels[1]["flagged"]


def test_clean_data_is_left_alone_and_the_quantile_sets_the_share_without_the_test():
    rng = random.Random(3)
    rows = _sentences(1500, rng, 0) + _sentences(1500, rng, 1)
    ref = _sentences(400, rng, 0) + _sentences(400, rng, 1)
    assert not any(discriminate_rows(rows, ref).flagged)
    for q in (0.8, 0.95):
        share = sum(discriminate_rows(rows, ref, quantile=q, alpha=None).flagged) / len(rows)
        assert abs(share - (1 - q)) < 0.05, (q, share)


def test_deterministic_and_seeded():
    rows, _, ref = _styled(4, share=0.25)
    a, b = discriminate_rows(rows, ref), discriminate_rows(rows, ref)
    assert a.flagged == b.flagged and a.labels == b.labels
    assert discriminate_rows(rows, ref, seed=1).labels[1]["threshold"] != a.labels[1]["threshold"]


def test_a_label_without_enough_reference_rows_is_untested():
    rows, _, ref = _styled(5)
    res = discriminate_rows(rows, [r for r in ref if r[1] == 0] + [r for r in ref if r[1] == 1][:9])
    assert res.untested_labels == [1] and 1 not in res.labels and not any(res.flagged)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(quantile=0.4), r"quantile must be in \[0.5, 1\), got 0.4"),
        (dict(quantile=1.0), r"quantile must be in \[0.5, 1\), got 1.0"),
        (dict(max_n=0), "max_n and min_df must be >= 1"),
        (dict(folds=1), "folds must be >= 2, got 1"),
        (dict(l2=[]), "l2 must be a non-empty list"),
        (dict(l2=[0.1, 0.0]), "l2 must be a non-empty list of weights > 0"),
        (dict(alpha=0.0), r"alpha must be None or in \(0, 1\), got 0.0"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        discriminate_rows([("a", 0)], [("a", 0)], **kw)
    with pytest.raises(ValueError, match="reference set is empty"):
        discriminate_rows([("a", 0)], [])


def test_train_muscle_drops_the_discriminated_rows_after_the_scan():
    """disc_quantile: the flagged rows leave the training set; dropped_index counts positions in the
    caller's rows, past the rows the scan dropped first."""
    from helpers import WORDS

    tok = WordTokenizer()  # knows WORDS only: sentences of w0-w19, style words w20-w39
    rows, _, ref = _styled(6, share=0.15, vocab=WORDS[:20], style=WORDS[20:])
    lexical = [(t + " w7 w7 w7 w7", 1) for t, _ in make_rows(120, 3)]  # a sequence the scan finds
    train = lexical + rows
    cfg = dict(epochs=1, batch_size=64, lr=1e-3, max_length=24, align=False, progress=False)
    m = tiny_model("bert", num_labels=2)
    patch_model(m)
    both = TrainConfig(**cfg, scan_alpha=1e-3, disc_quantile=0.9)
    res = train_muscle(m, tok, train, ref, make_rows(16, 2), both)
    scan = scan_ngrams(train, ref)
    assert res.scan["dropped_index"] == [i for i, f in enumerate(scan.flagged) if f]
    assert set(range(120)) <= set(res.scan["dropped_index"])
    at = [i for i, f in enumerate(scan.flagged) if not f]
    expected = discriminate_rows([train[i] for i in at], ref, quantile=0.9, seed=both.seed)
    assert res.disc["dropped_index"] == [at[i] for i, f in enumerate(expected.flagged) if f]
    assert res.disc["flagged"] == sum(expected.flagged) > 0
    assert res.steps == -(-(len(at) - sum(expected.flagged)) // 64)
    with pytest.raises(ValueError, match=r"disc_quantile must be 0 \(off\) or in \[0.5, 1\)"):
        TrainConfig(disc_quantile=0.3)
    with pytest.raises(ValueError, match=r"disc_alpha must be in \(0, 1\), got 0.0"):
        TrainConfig(disc_alpha=0.0)


def test_disc_record_counts_the_poisoned_rows_it_dropped():
    from types import SimpleNamespace

    from muscle_fast.experiment.run import filter_records

    disc = {"flagged": 2, "quantile": 0.9, "dropped_index": [1, 3]}
    res = SimpleNamespace(teacher={}, scan={}, disc=disc)
    ds = SimpleNamespace(train_poison_flags=[False, True, False, False])
    assert filter_records("lora+filter", res, ds) == {
        "disc": {"flagged": 2, "quantile": 0.9, "poison_rows": 1, "poison_dropped": 1, "clean_dropped": 1}
    }


def _gate_run(monkeypatch, train, ref, gate: str) -> tuple[object, list[int]]:
    """train_muscle with the scan, the discriminator and a stand-in teacher (it keeps every row and
    counts its calls), one epoch on the tiny model."""
    from helpers import WordTokenizer as Tok

    import muscle_fast.train as tr

    calls: list[int] = []

    def fake_teacher(model, tok, cfg, data, cache=None):
        calls.append(len(data.train))
        kept = {"rows": len(data.train), "dropped": 0, "relabeled": 0}
        return data.train, {**kept, "dropped_index": [], "relabeled_index": []}

    monkeypatch.setattr(tr, "_teacher_corrected", fake_teacher)
    cfg = TrainConfig(
        epochs=1, batch_size=64, lr=1e-3, max_length=24, align=False, progress=False,
        scan_alpha=1e-3, disc_quantile=0.9, teacher_epochs=2, teacher_gate=gate,
    )  # fmt: skip
    m = tiny_model("bert", num_labels=2)
    patch_model(m)
    return train_muscle(m, Tok(), train, ref, make_rows(16, 2), cfg), calls


def test_teacher_gate_skips_the_teacher_only_when_the_scan_explained_the_poison(monkeypatch):
    """teacher_gate='unexplained': a lexical trigger the scan removes, with nothing left for the
    discriminator's test, trains no teacher; a style trigger beside it (the test passes), or no
    finding at all (clean data), trains it as 'always' does."""
    from helpers import WORDS

    clean, _, ref = _styled(6, share=0.0, vocab=WORDS[:20], style=WORDS[20:])
    styled, _, _ = _styled(6, share=0.15, vocab=WORDS[:20], style=WORDS[20:])
    lexical = [(t + " w7 w7 w7 w7", 1) for t, _ in make_rows(120, 3)]

    res, calls = _gate_run(monkeypatch, lexical + clean, ref, "unexplained")
    assert calls == [] and set(res.scan["dropped_index"]) >= set(range(120))
    assert not any(v["passed"] for v in res.disc["labels"].values()) and res.disc["flagged"] == 0
    assert res.teacher == {"skipped": res.teacher["skipped"]} and "'w7 w7 w7'" in res.teacher["skipped"]
    assert res.steps == -(-(len(clean) + 120 - res.scan["flagged"]) // 64)

    res, calls = _gate_run(monkeypatch, lexical + clean, ref, "always")
    assert calls == [len(clean) + 120 - res.scan["flagged"]] and "skipped" not in res.teacher

    res, calls = _gate_run(monkeypatch, lexical + styled, ref, "unexplained")
    assert res.scan["flagged"] >= 120 and any(v["passed"] for v in res.disc["labels"].values())
    assert len(calls) == 1 and "skipped" not in res.teacher

    res, calls = _gate_run(monkeypatch, clean, ref, "unexplained")
    assert res.scan["flagged"] == 0 and len(calls) == 1 and "skipped" not in res.teacher


def test_teacher_gate_needs_both_filters_and_a_known_value():
    with pytest.raises(ValueError, match=r"teacher_gate must be one of \('always', 'unexplained'\), got 'x'"):
        TrainConfig(teacher_gate="x")
    with pytest.raises(ValueError, match=r"teacher_gate='unexplained' needs scan_alpha and disc_quantile .*"
                       r"scan_alpha=0.001, disc_quantile=0.0"):  # fmt: skip
        TrainConfig(teacher_epochs=3, scan_alpha=1e-3, teacher_gate="unexplained")
    TrainConfig(teacher_gate="unexplained")  # no teacher: nothing to gate


def test_a_skipped_teacher_is_recorded_as_such():
    from types import SimpleNamespace

    from muscle_fast.experiment.run import filter_records

    why = "the n-gram scan dropped 2 rows holding 'cf' and ..."
    res = SimpleNamespace(teacher={"skipped": why}, scan={}, disc={})
    ds = SimpleNamespace(train_poison_flags=[False, True])
    assert filter_records("lora+filter", res, ds) == {"teacher": {"skipped": why}}
