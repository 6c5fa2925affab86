"""``predict`` batches rows of similar length together and hands the results back in row order."""

from __future__ import annotations

import random

import torch
from helpers import HashTokenizer
from tiny_models import tiny_model

from muscle_fast.evaluation import _length_batches, predict, predict_proba


def _rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(1, 20))) for _ in range(n)]
    return [(t, rng.randrange(2)) for t in texts]


def test_batches_group_rows_by_length_and_cover_every_row_once():
    rows = _rows(37)
    batches = _length_batches(HashTokenizer(), rows, 8, max_length=12)
    assert sorted(j for b in batches for j in b) == list(range(37))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    lengths = [min(len(rows[j][0].split()), 12) for b in batches for j in b]
    assert lengths == sorted(lengths)  # truncated lengths, so the longest rows share batches


def test_predictions_come_back_in_row_order_as_one_row_at_a_time():
    torch.manual_seed(0)
    model = tiny_model("bert", num_labels=2).double()
    model.train()
    tok, rows = HashTokenizer(), _rows(29, seed=1)
    one = torch.cat([predict_proba(model, tok, [r], batch_size=1, max_length=16) for r in rows])
    many = predict_proba(model, tok, rows, batch_size=8, max_length=16)
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-12)
    assert torch.equal(predict(model, tok, rows, batch_size=8, max_length=16), one.argmax(-1))
    assert model.training  # the caller's mode is restored


def test_the_run_and_the_eval_command_score_the_same_batches():
    """defend's test scores (``evaluate_test``, with its progress bar) and ``muscle-fast eval``'s
    (``evaluate_backdoor``) come from the same batches: in bf16 other batches give other numbers."""
    from types import SimpleNamespace

    from muscle_fast.backdoor.metrics import evaluate_backdoor
    from muscle_fast.experiment.run import evaluate_test

    torch.manual_seed(0)
    model = tiny_model("llama", num_labels=2).to(torch.bfloat16)
    sets = {"test_clean": _rows(1000, seed=2), "test_poison": [(t, 1) for t, _ in _rows(1000, seed=3)]}
    ds = SimpleNamespace(split=sets.__getitem__, target_label=1)
    seen = []
    batches = _length_batches(HashTokenizer(), sets["test_clean"], 16, max_length=16)
    predict(model, HashTokenizer(), sets["test_clean"], 16, 16, on_batch=seen.append)
    assert seen == [len(b) for b in batches]
    want = evaluate_backdoor(model, HashTokenizer(), ds, batch_size=16, max_length=16)
    assert evaluate_test(model, HashTokenizer(), ds, batch_size=16, max_length=16) == want
