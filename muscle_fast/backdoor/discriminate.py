"""Find training rows unlike the clean reference rows of their label: a bag-of-n-grams logistic
regression, training rows against reference rows, cross-fitted, per label.

A style or syntax trigger leaves no n-gram frequent enough for :mod:`.scan` (a paraphrase
template opens with "when", "if" or "as"; a style transfer uses many archaic words, each rare),
but it leaves many weak ones in the same rows; a linear model over every n-gram adds them up.
Poisoned rows are the part of the training distribution the reference distribution lacks, so
they get the highest train-vs-reference scores. Every row is scored by a model fitted without its
fold, the reference rows too; a training row is flagged when its score exceeds the ``quantile`` of
the reference rows' held-out scores. Clean training rows and reference rows come from one
distribution, so on clean data about ``1 - quantile`` of the rows are flagged, whatever the
regression's calibration; poisoned rows are flagged as far as their n-grams set them apart.

The L2 weight is chosen per label from a grid by the held-out train-vs-reference log-loss: no
poison flag is involved anywhere. A label is filtered only when its training rows differ from its
reference rows at all: the chosen fit's held-out AUC (training over reference rows) must pass a
one-sided test at family-wise ``alpha``; otherwise the ``1 - quantile`` share it would flag is
clean rows, and none are. Deterministic for a seed (float64, LBFGS, sorted vocabulary).

What it cannot find: poison in too small a share of its label's rows for the AUC test to pass
(the test's power grows with the poisoned share and the number of reference rows; measured
figures: benchmarks/results/defense-minilm-sst2/README.md), and triggers that leave no n-gram at
all (a word-order change alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch

from .scan import ngrams

#: L2 weights tried per label (on the class-balanced mean log-loss; binary features)
DEFAULT_L2 = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class DiscriminatorResult:
    """What :func:`discriminate_rows` found: per training row whether it was flagged, and per label
    the fit (``train_rows``, ``ref_rows``, ``features``, ``l2``, ``held_out_loss``, ``auc``, ``z``,
    ``threshold``, ``passed`` (the test; else nothing is flagged), ``flagged``)."""

    flagged: list[bool]
    quantile: float
    labels: dict[int, dict[str, Any]]
    untested_labels: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able record without the per-row flags."""
        return {
            "quantile": self.quantile,
            "rows": len(self.flagged),
            "flagged": sum(self.flagged),
            "labels": {str(k): v for k, v in self.labels.items()},
            "untested_labels": self.untested_labels,
        }


def _features(texts: Sequence[str], max_n: int, min_df: int) -> tuple[torch.Tensor, int]:
    """Binary n-gram presence as a sparse float64 [rows, vocabulary] matrix; the vocabulary is the
    n-grams in at least ``min_df`` rows, in sorted order (the same in every process)."""
    grams = [ngrams(t, max_n) for t in texts]
    df: dict[str, int] = {}
    for g in grams:
        for s in g:
            df[s] = df.get(s, 0) + 1
    vocab = {s: i for i, s in enumerate(sorted(s for s, c in df.items() if c >= min_df))}
    rows, cols = [], []
    for r, g in enumerate(grams):
        idx = sorted(vocab[s] for s in g if s in vocab)
        rows += [r] * len(idx)
        cols += idx
    x = torch.sparse_coo_tensor(
        torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1),
        torch.ones(len(rows), dtype=torch.float64),
        (len(texts), len(vocab)),
        check_invariants=True,
    ).coalesce()
    return x, len(vocab)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L2-regularised logistic regression (LBFGS, float64, analytic gradient):
    minimises ``sum w * bce(x @ coef + bias, y) / sum w + l2 / 2 * |coef|^2``; ``x`` dense or
    sparse COO."""
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    xt = x.t().coalesce() if x.is_sparse else x.t()
    opt = torch.optim.LBFGS(
        [coef, bias],
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    wn = w / w.sum()

    def closure() -> torch.Tensor:
        with torch.no_grad():
            z = (x @ coef.detach()[:, None])[:, 0] + bias.detach()
            loss = (wn * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
            loss = loss + 0.5 * l2 * coef.detach().pow(2).sum()
            r = wn * (torch.sigmoid(z) - y)
            coef.grad = (xt @ r[:, None])[:, 0] + l2 * coef.detach()
            bias.grad = r.sum()
        return loss

    opt.step(closure)
    return coef.detach(), bias.detach()


def _balanced(y: torch.Tensor) -> torch.Tensor:
    """Weights giving each class half the total (training rows and reference rows count equally)."""
    n1 = y.sum()
    return torch.where(y > 0, 0.5 / n1, 0.5 / (len(y) - n1))


def _auc_z(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float]:
    """The AUC of ``pos`` over ``neg`` scores (Mann-Whitney U / (n1 n2), ties counted half) and its
    z-score against 0.5 under exchangeability (normal approximation, no tie correction)."""
    s = torch.cat([pos, neg])
    order = s.argsort()
    ranks = torch.empty(len(s), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    values, counts = torch.unique(s, return_counts=True)
    for v in values[counts > 1]:  # ties: their mean rank
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    n1, n2 = len(pos), len(neg)
    auc = float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))
    return auc, (auc - 0.5) / math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))


def _held_out_scores(
    x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, folds: int, l2: float
) -> torch.Tensor:
    """Every row's score from a regression fitted on the other folds."""
    rows = torch.arange(len(y))
    score = torch.zeros(len(y), dtype=torch.float64)
    for k in range(folds):
        fit = fold != k
        coef, bias = fit_logistic(x.index_select(0, rows[fit]), y[fit], _balanced(y[fit]), l2)
        held = rows[~fit]
        score[held] = (x.index_select(0, held) @ coef[:, None])[:, 0] + bias
    return score


def discriminate_rows(
    train_rows: Sequence[tuple[str, int]],
    ref_rows: Sequence[tuple[str, int]],
    quantile: float = 0.9,
    max_n: int = 2,
    min_df: int = 3,
    l2: Sequence[float] = DEFAULT_L2,
    folds: int = 5,
    seed: int = 0,
    alpha: float | None = 0.05,
) -> DiscriminatorResult:
    """Flag the training rows whose held-out train-vs-reference score exceeds the ``quantile`` of
    the reference rows' held-out scores, per label (module docstring).

    A label with fewer than ``2 * folds`` reference rows cannot be calibrated: its rows stay
    unflagged and it is listed in ``untested_labels``. ``alpha`` None: no test, every label with
    reference rows is filtered at the quantile.
    """
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"discriminate_rows: quantile must be in [0.5, 1), got {quantile!r}")
    if max_n < 1 or min_df < 1:
        raise ValueError(f"discriminate_rows: max_n and min_df must be >= 1, got {max_n!r}, {min_df!r}")
    if folds < 2:
        raise ValueError(f"discriminate_rows: folds must be >= 2, got {folds!r}")
    if not l2 or any(not v > 0 for v in l2):
        raise ValueError(f"discriminate_rows: l2 must be a non-empty list of weights > 0, got {list(l2)!r}")
    if not ref_rows:
        raise ValueError(
            "discriminate_rows: the reference set is empty; nothing to compare the training rows with"
        )
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ValueError(f"discriminate_rows: alpha must be None or in (0, 1), got {alpha!r}")
    label_set = sorted({y for _, y in train_rows})
    # a label is filtered only when its training rows differ from its reference rows at family-wise
    # alpha over the labels and the L2 weights tried (the chosen weight's held-out AUC, one-sided)
    z_min = -math.inf if alpha is None else -NormalDist().inv_cdf(alpha / (max(len(label_set), 1) * len(l2)))
    flagged = [False] * len(train_rows)
    labels: dict[int, dict[str, Any]] = {}
    untested: list[int] = []
    g = torch.Generator().manual_seed(seed)
    for lab in label_set:
        members = [i for i, (_, y) in enumerate(train_rows) if y == lab]
        refs = [t for t, y in ref_rows if y == lab]
        if len(refs) < 2 * folds:
            untested.append(lab)
            continue
        x, n_features = _features([train_rows[i][0] for i in members] + refs, max_n, min_df)
        n = len(members)
        y = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(len(refs), dtype=torch.float64)])
        # stratified folds: each fold holds its share of training and of reference rows
        fold = torch.empty(len(y), dtype=torch.int64)
        for part in (torch.arange(n), torch.arange(n, len(y))):
            fold[part[torch.randperm(len(part), generator=g)]] = torch.arange(len(part)) % folds
        w = _balanced(y)
        losses, scores = {}, {}
        for v in l2:
            s = _held_out_scores(x, y, fold, folds, float(v))
            bce = torch.nn.functional.binary_cross_entropy_with_logits(s, y, reduction="none")
            losses[float(v)], scores[float(v)] = float((w * bce).sum()), s
        best = min(losses, key=losses.__getitem__)
        s = scores[best]
        auc, z = _auc_z(s[:n], s[n:])
        threshold = float(torch.quantile(s[n:], quantile))
        passed = z > z_min
        hits = (s[:n] > threshold).tolist() if passed else [False] * n
        for i, h in zip(members, hits, strict=True):
            flagged[i] = h
        labels[lab] = {
            "train_rows": n,
            "ref_rows": len(refs),
            "features": n_features,
            "l2": best,
            "held_out_loss": {str(k): v for k, v in losses.items()},
            "auc": auc,
            "z": z,
            "threshold": threshold,
            "passed": passed,
            "flagged": sum(hits),
        }
    return DiscriminatorResult(flagged, quantile, labels, untested)
