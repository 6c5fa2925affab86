"""Find lexical triggers: n-grams that a training set's rows of one label hold far more often than
the clean reference rows of that label.

A trigger (rare words, a fixed sentence, a template's opening) sits in a share of the target
label's training rows that clean text of that label never reaches; the reference rows are a clean
sample of the same distribution. Per label, every n-gram's document frequency in the training
rows is compared with the reference rows' by a one-sided G-test (log-likelihood ratio, 1 degree
of freedom). The n-grams above the Bonferroni bound (``alpha`` over every (label, n-gram) pair
tested) are the candidates. The purest candidate (highest ratio of training to reference share)
flags the training rows of that label that hold it; the counts are then taken again without
those rows, so a trigger's parts and the common words it inflates are explained away rather than
flagged, and so on while a candidate stays significant at ``confirm_alpha``.

What it cannot find: triggers that are not word sequences (style transfer, syntactic
paraphrase), and triggers in too few rows for the reference set to refute: with no reference hit
an n-gram needs a share of roughly G*/(2 n_ref) of the label's training rows (about 5 % for 300
reference rows per label at the default alpha).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

#: words (letters/digits of any script, with an inner apostrophe) and single punctuation marks
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]")
#: the sentence-start marker, so that a template's opening ("<s> when") is an n-gram of its own
START = "<s>"


def ngrams(text: str, max_n: int = 3) -> set[str]:
    """The distinct 1..``max_n``-grams of ``text`` (case-folded words, ``<s>`` first)."""
    words = [START, *_TOKEN.findall(text.casefold())]
    return {" ".join(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def g_excess(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
    """One-sided G statistic per n-gram: ``a`` of ``na`` training rows vs ``b`` of ``nb`` reference
    rows hold it; 0 where the training share is not above the reference share."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)

    def xlogx(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    n = na + nb
    k = a + b
    # G = 2 * sum O ln(O / E) over the 2x2 table (rows: holds / not; columns: train / ref)
    g = 2.0 * (
        xlogx(a)
        + xlogx(na - a)
        + xlogx(b)
        + xlogx(nb - b)
        - xlogx(k)
        - xlogx(n - k)
        - (na * np.log(na) + nb * np.log(nb))
        + n * np.log(n)
    )
    return np.where(a * nb > b * na, np.maximum(g, 0.0), 0.0)


def g_critical(alpha: float, tests: int) -> float:
    """The G above which one of ``tests`` one-sided tests is significant at family-wise ``alpha``."""
    z = -NormalDist().inv_cdf(alpha / max(tests, 1))  # the upper quantile, exact for tiny alpha/tests
    return z * z


@dataclass(frozen=True)
class Finding:
    """One n-gram the scan flagged, in the order found; counts are over the rows not yet flagged."""

    label: int
    ngram: str
    train_rows: int  # training rows of ``label`` that hold it (and held no earlier finding)
    train_label_rows: int  # training rows of ``label`` still unflagged when it was found
    ref_rows: int  # reference rows of ``label`` that hold it
    ref_label_rows: int
    g: float


@dataclass
class ScanResult:
    """What ``scan_ngrams`` found: the n-grams, and per training row whether it was flagged."""

    findings: list[Finding]
    flagged: list[bool]
    alpha: float
    g_critical: float
    tests: int
    candidates: int  # n-grams significant before explaining away
    untested_labels: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able record without the per-row flags."""
        return {
            "alpha": self.alpha,
            "g_critical": self.g_critical,
            "tests": self.tests,
            "candidates": self.candidates,
            "rows": len(self.flagged),
            "flagged": sum(self.flagged),
            "findings": [asdict(f) for f in self.findings],
            "untested_labels": self.untested_labels,
        }


def scan_ngrams(
    train_rows: Sequence[tuple[str, int]],
    ref_rows: Sequence[tuple[str, int]],
    alpha: float = 1e-3,
    max_n: int = 3,
    confirm_alpha: float = 0.05,
) -> ScanResult:
    """Flag the training rows holding an n-gram significantly over-represented against the clean
    ``ref_rows`` of the same label (module docstring); deterministic.

    A label with no reference row cannot be tested: its rows stay unflagged and it is listed in
    ``untested_labels``. The vocabulary is built in row order with each row's n-grams sorted, so
    ties resolve the same way in every process (no dependence on Python's string hashing).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"scan_ngrams: alpha must be in (0, 1), got {alpha!r}")
    if not 0.0 < confirm_alpha < 1.0:
        raise ValueError(f"scan_ngrams: confirm_alpha must be in (0, 1), got {confirm_alpha!r}")
    if max_n < 1:
        raise ValueError(f"scan_ngrams: max_n must be >= 1, got {max_n!r}")
    if not ref_rows:
        raise ValueError("scan_ngrams: the reference set is empty; nothing to compare the training rows with")
    train_grams = [ngrams(t, max_n) for t, _ in train_rows]
    labels = sorted({lab for _, lab in train_rows})
    ref_by_label: dict[int, list[set[str]]] = {}
    for text, lab in ref_rows:
        ref_by_label.setdefault(lab, []).append(ngrams(text, max_n))

    # per label: a vocabulary of the training rows' n-grams, the count arrays, each row's indices
    tables: dict[int, tuple[list[str], np.ndarray, np.ndarray, list[int], list[np.ndarray]]] = {}
    untested: list[int] = []
    for lab in labels:
        refs = ref_by_label.get(lab, [])
        if not refs:
            untested.append(lab)
            continue
        vocab: dict[str, int] = {}
        members = [i for i, (_, y) in enumerate(train_rows) if y == lab]
        row_idx = [
            np.fromiter((vocab.setdefault(g, len(vocab)) for g in sorted(train_grams[i])), dtype=np.int64)
            for i in members
        ]
        a = np.zeros(len(vocab), dtype=np.int64)
        for idx in row_idx:
            a[idx] += 1
        b = np.zeros(len(vocab), dtype=np.int64)
        for grams in refs:
            hit = [vocab[g] for g in grams if g in vocab]
            b[hit] += 1
        tables[lab] = (list(vocab), a, b, members, row_idx)
    tests = sum(len(t[0]) for t in tables.values())
    gcrit = g_critical(alpha, tests)

    flagged = [False] * len(train_rows)
    findings: list[Finding] = []
    candidates = 0
    for lab, (names, a, b, members, row_idx) in tables.items():
        nb = len(ref_by_label[lab])
        alive = np.ones(len(members), dtype=bool)
        # discovery: the n-grams significant over every test; only they can be findings
        cand = np.flatnonzero(g_excess(a, len(members), b, nb) > gcrit)
        candidates += len(cand)
        if not len(cand):
            continue
        # explaining away: take the purest passing candidate, drop its rows, test the rest again on the
        # rows left (family-wise confirm_alpha over the candidates); a common word that a trigger inflated
        # (AddSent's "movie") loses its excess, a second trigger word (BadNets' "bb" after "cf") keeps it
        gconf = g_critical(confirm_alpha, len(cand))
        while alive.any() and len(cand):
            na = int(alive.sum())
            g = g_excess(a[cand], na, b[cand], nb)
            passing = g > gconf
            if not passing.any():
                break
            # of the passing candidates the purest goes first: the highest ratio of training share to
            # reference share (half a row added to each), so a trigger ("3d", never in the reference)
            # goes before a common word it inflated ("i"), whose G may be larger
            lift = np.where(passing, (a[cand] / na) / ((b[cand] + 0.5) / (nb + 0.5)), -1.0)
            k = int(np.argmax(lift))  # ties: the first in vocabulary order (rows in order, n-grams sorted)
            best = int(cand[k])
            hits = [j for j in np.flatnonzero(alive) if np.any(row_idx[j] == best)]
            findings.append(Finding(lab, names[best], len(hits), na, int(b[best]), nb, float(g[k])))
            for j in hits:
                alive[j] = False
                flagged[members[j]] = True
                a[row_idx[j]] -= 1
            cand = np.delete(cand, k)
    return ScanResult(findings, flagged, alpha, gcrit, tests, candidates, untested)
