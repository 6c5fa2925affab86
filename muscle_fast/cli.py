"""The ``muscle-fast`` command line: ``inspect`` a patched model, ``defend`` (train and compare
defenses on poisoned data, SPEC §5), ``eval`` a saved checkpoint and ``fourier`` (track the
low/high-frequency errors of one method's training, SPEC §6).

Heavy imports (torch, transformers, datasets, matplotlib) happen inside the commands so
``--help`` and argument errors stay instant. Every input error ends the process with a
one-line ``muscle-fast: ...`` message (set ``MUSCLE_FAST_TRACEBACK=1`` to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .experiment import (
    DEFAULT_MODEL_PRESET,
    METHODS,
    RUN_FILE,
    BaseModels,
    _device,
    _load_sets,
    _one_line,
    builtin_presets,
    default_model,
    effective_hparams,
    load_classifier,
    load_preset,
    method_configs,
    parse_methods,
    reference_split,
    run_method,
)
from .report import model_label, results_table, write_results

__all__ = [
    "METHODS",
    "build_parser",
    "default_model",
    "effective_hparams",
    "load_classifier",
    "load_preset",
    "main",
]


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import MuScleConfig, patch_model

    model, _ = load_classifier(args.model or default_model(), args.num_labels)
    overrides = json.loads(args.config) if args.config else {}
    if not isinstance(overrides, dict):
        raise SystemExit(f"muscle-fast: --config must be a JSON object of MuScleConfig fields: {args.config}")
    cfg = MuScleConfig.for_model(model, **overrides)
    patch_model(model, cfg)
    rep = model.muscle_report
    print(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "lora_modules": rep.lora_modules,
                "mslr_modules": rep.mslr_modules,
                "head_modules": rep.head_modules,
            },
            indent=2,
        )
    )
    return 0


def _preset_for(args: argparse.Namespace) -> dict[str, Any]:
    """--config, or for the default model (no --model) the preset tuned for it."""
    if args.config is None and args.model is None:
        logging.getLogger("muscle_fast").info(
            f"muscle-fast: default model, built-in preset {DEFAULT_MODEL_PRESET!r} (--config overrides)"
        )
        return load_preset(DEFAULT_MODEL_PRESET)
    return load_preset(args.config)


def _model_name(args: argparse.Namespace) -> str:
    """--model (a local folder made absolute, so that ``eval`` finds it from anywhere) or the default."""
    if args.model is None:
        return default_model()
    return str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model


def _previous_records(out: Path, rerun: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The records of an earlier ``defend`` into ``out`` that this run does not redo.

    Rerunning into a folder (after an interruption, or to add a method) must not drop what
    was finished; a (dataset, attack, method) run again replaces its old record."""
    from .report import merge_records

    f = out / "results.json"
    if not f.is_file():
        return []
    old = merge_records([f])  # read and checked as `report` reads results (clear error if broken)
    kept = [r for r in old if (r["dataset"], r["attack"], r["method"]) not in rerun]
    if kept:
        logging.getLogger("muscle_fast").info(f"muscle-fast: keeping {len(kept)} earlier records of {f}")
    return kept


def cmd_defend(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    preset = _preset_for(args)
    seed = args.seed if args.seed is not None else preset.get("seed", 42)
    device = _device(args.device)
    full = [m for m in methods if not METHODS[m].patch]
    if args.load_in_4bit and full:
        raise SystemExit(
            f"muscle-fast: {', '.join(full)} fine-tunes every weight, and a 4-bit model's weights are "
            "frozen: with --load-in-4bit run adapter methods only (e.g. --methods lora,muscle)"
        )
    sets = _load_sets(args, args.attacks, seed)  # data errors before the (slow) model loads
    model_name = _model_name(args)
    models = BaseModels(model_name, seed, args.load_in_4bit, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = _previous_records(out, {(ds.dataset, ds.attack, m) for ds in sets for m in methods})
    from .train import supports_checkpointing

    for num_labels in sorted({ds.num_labels for ds in sets}):  # config errors now, not after hours
        base, _ = models.get(num_labels)
        if args.gradient_checkpointing and not supports_checkpointing(base):
            raise SystemExit(f"muscle-fast: {model_name} does not support --gradient-checkpointing")
        for method in methods:
            try:
                _, _, hp = method_configs(base, method, preset, args)
            except (ValueError, TypeError) as e:
                raise SystemExit(f"muscle-fast: method {method}: {_one_line(e)}") from None
            for ds in sets:
                if ds.num_labels == num_labels:  # its reference split fits this attack's dev-clean
                    reference_split(ds.dev_clean, hp["ref_samples"], seed, hp["ref_disjoint"])
        del base
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for ds in sets:
        for method in methods:
            records.append(run_method(ds, method, models, preset, args, out))
            write_results(out, kept + records, model_name)  # partial results survive an interrupted run
    records = kept + records
    print(results_table(records))
    print(f"\nwrote {out / 'results.json'}, results.md, results.png in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import merge_records

    records = merge_records([Path(f) for f in args.results])
    models = {str((r.get("config") or {}).get("model", "")) for r in records} - {""}
    model_name = args.model or (models.pop() if len(models) == 1 else "several models" if models else "model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, records, model_name)
    print(results_table(records))
    total = sum(r["wall_seconds"] for r in records)
    print(
        f"\n{len(records)} runs, {total / 60:.1f} min of training in all; wrote {out / 'results.json'}, "
        "results.md, results.png"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .adapter import ADAPTER_CONFIG, load_adapter, read_adapter_config
    from .backdoor.data import is_attack_dir
    from .backdoor.metrics import evaluate_backdoor

    d = Path(args.adapter)
    if not d.is_dir():
        raise SystemExit(f"muscle-fast: checkpoint folder {d} does not exist")
    full = (d / "config.json").is_file()
    if not full and not (d / ADAPTER_CONFIG).is_file():
        raise SystemExit(
            f"muscle-fast: {d} is neither a muscle_fast adapter ({ADAPTER_CONFIG}) "
            "nor a saved model (config.json)"
        )
    run: dict[str, Any] = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).is_file() else {}
    for key, rec in (
        ("data_dir", "data_dir"), ("seed", "seed"), ("max_eval_rows", "max_eval_rows"),
        ("target_label", "target_label"), ("num_labels", "num_labels"),
        ("poison_setting", "setting"), ("poison_rate", "rate"),  # which training file the run used
    ):  # fmt: skip
        if getattr(args, key) is None and run.get(rec) is not None:
            setattr(args, key, run[rec])
    seed = args.seed if args.seed is not None else 42
    attacks = args.attacks
    if attacks is None and run.get("attack") and not (args.data_dir and is_attack_dir(args.data_dir)):
        attacks = run["attack"]
    sets = _load_sets(args, attacks, seed)
    device = _device(args.device)
    if full:
        for flag, given in (("--load-in-4bit", args.load_in_4bit), ("--model", args.model)):
            if given:
                raise SystemExit(f"muscle-fast: {d} is a fully fine-tuned model; {flag} is for adapters")
        model, tok = load_classifier(str(d), sets[0].num_labels)
    else:
        read_adapter_config(d)  # a wrong format version fails here, before the model loads
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
        base = args.model or run.get("model") or meta.get("base_model_name_or_path")
        if not base:
            raise SystemExit(f"muscle-fast: {d} does not record its base model; pass --model")
        four_bit = args.load_in_4bit or bool(run.get("load_in_4bit"))
        model, tok = load_classifier(base, sets[0].num_labels, four_bit, device)
        load_adapter(model, d)
    model.to(device)
    batch = args.batch_size or run.get("eval_batch_size", 64)
    max_length = args.max_length or run.get("max_length", 128)
    for ds in sets:
        scores = evaluate_backdoor(model, tok, ds, batch, max_length)
        print(
            f"{ds.dataset}/{ds.attack} {run.get('method', d.name)}: CACC {100 * scores['cacc']:.2f} % "
            f"({len(ds.test_clean)} test-clean rows), ASR {100 * scores['asr']:.2f} % "
            f"({len(ds.test_poison)} test-poison rows)"
        )
        print(json.dumps({"dataset": ds.dataset, "attack": ds.attack, "method": run.get("method"), **scores}))
    return 0


def parse_deltas(spec: str | None) -> list[float] | None:
    """Widths from a comma-separated list (None: chosen from the data), or SystemExit saying why."""
    if spec is None:
        return None
    out: list[float] = []
    for part in (s.strip() for s in spec.split(",")):
        try:
            v = float(part)
        except ValueError:
            raise SystemExit(f"muscle-fast: bad --deltas {spec!r}: {part!r} is not a number") from None
        if not (v > 0 and v != float("inf")):
            raise SystemExit(f"muscle-fast: bad --deltas {spec!r}: every width must be a positive number")
        out.append(v)
    if len({f"{v:g}" for v in out}) != len(out):
        raise SystemExit(f"muscle-fast: bad --deltas {spec!r}: a width is repeated")
    return out


def cmd_fourier(args: argparse.Namespace) -> int:
    """Train one method like ``defend`` does while a FourierTracker records dev-clean / dev-poison."""
    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise SystemExit(f"muscle-fast: fourier trains one method at a time, got {methods}")
    method = methods[0]
    deltas = parse_deltas(args.deltas)
    for flag, v, least in (("--every", args.every, 1), ("--samples", args.samples, 2)):
        if v < least:
            raise SystemExit(f"muscle-fast: {flag} must be >= {least}, got {v}")
    preset = _preset_for(args)  # the default model's tuned preset, as defend uses
    seed = args.seed if args.seed is not None else preset.get("seed", 42)
    device = _device(args.device)
    sets = _load_sets(args, args.attacks, seed)  # data errors before the (slow) model loads
    if len(sets) != 1:
        raise SystemExit(
            "muscle-fast: fourier analyses one attack at a time; pass --attacks with one of "
            f"{[ds.attack for ds in sets]}"
        )
    ds = sets[0]

    import torch

    from .analysis.tracking import FourierTracker
    from .backdoor.metrics import evaluate_backdoor
    from .patch import patch_model
    from .train import config_dict, train_muscle

    model_name = _model_name(args)
    model, tok = BaseModels(model_name, seed).get(ds.num_labels)  # the head defend would start from
    torch.manual_seed(seed)
    try:
        pcfg, tcfg, hp = method_configs(model, method, preset, args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"muscle-fast: method {method}: {_one_line(e)}") from None
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(device)
    ref, select = reference_split(ds.dev_clean, hp["ref_samples"], seed, hp["ref_disjoint"])
    tracker = FourierTracker(
        tok,
        {"dev_clean": ds.dev_clean, "dev_poison": ds.dev_poison},
        deltas=deltas,
        every=args.every,
        max_length=tcfg.max_length,
        max_samples=args.samples,
        batch_size=tcfg.eval_batch_size,
        seed=seed,
    )
    spec = METHODS[method]
    tracker.meta.update(
        {
            "dataset": ds.dataset,
            "attack": ds.attack,
            "method": method,
            "method_doc": spec.doc,
            "model": model_name,
            "train": config_dict(tcfg),
            "muscle_config": pcfg.to_dict() if pcfg is not None else None,
            "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
            "rows": ds.summary(),
            "complete": False,
        }
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "fourier.json"

    def step(global_step: int, m: Any) -> None:
        if tracker(global_step, m):
            tracker.to_json(json_path)  # partial series survive an interrupted run

    logging.getLogger("muscle_fast").info(
        f"muscle-fast: fourier {ds.dataset}/{ds.attack} {method} ({spec.doc}): {len(ds.train)} train rows, "
        f"{tcfg.epochs} epochs; tracking "
        + ", ".join(f"{len(tracker.sample(n))} {n} rows" for n in tracker.set_names)
        + f" every {args.every} steps"
    )
    step(0, model)
    evals = {"dev_asr": ds.dev_poison}
    res = train_muscle(model, tok, ds.train, ref, select, tcfg, eval_sets=evals, step_callback=step)
    scores = evaluate_backdoor(model, tok, ds, tcfg.eval_batch_size, tcfg.max_length)
    tracker.meta.update(
        {
            "cacc": scores["cacc"],
            "asr": scores["asr"],
            "selected": "cacc/asr: the epoch with the best dev-clean accuracy, as in defend",
            "best_epoch": res.best_epoch,
            "dev_history": res.history,
            "train_steps": res.steps,
            "wall_seconds": res.wall_seconds,
            "complete": True,
        }
    )
    tracker.to_json(json_path)
    tracker.plot(
        out / "fourier.png",
        title=f"Fourier analysis: {ds.dataset}/{ds.attack}, {method} ({spec.doc}), {model_label(model_name)}",
    )
    print(
        f"{ds.dataset}/{ds.attack} {method}: test CACC {100 * scores['cacc']:.2f} %, ASR "
        f"{100 * scores['asr']:.2f} %; {len(tracker.steps)} records at widths {tracker.deltas}"
    )
    print(f"wrote {json_path} and {out / 'fourier.png'}")
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        help="an OpenBackdoor attack folder, a folder of attack folders, or a clean train/dev/test.tsv "
        "folder (poisoned here); default: SST-2 from the Hugging Face hub, poisoned with BadNets",
    )
    p.add_argument("--attacks", help="comma-separated attacks to run (attack folders, or badnets,addsent)")
    p.add_argument("--poison-setting", choices=("clean", "mix", "dirty"), help="training file setting")
    p.add_argument("--poison-rate", type=float, help="training file poison rate (default 0.1)")
    p.add_argument("--target-label", type=int, help="the attack's target label (default: from the data)")
    p.add_argument("--num-labels", type=int, help="number of classes (default: from the data)")
    p.add_argument("--max-eval-rows", type=int, help="seeded subsample of each dev/test split (smoke runs)")
    p.add_argument("--seed", type=int, help="seed for data subsampling, poisoning, reference set, training")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Training hyperparameters shared by defend and fourier (flags override the preset file)."""
    p.add_argument("--epochs", type=int, help="default: the family preset (10 for BERT/RoBERTa)")
    p.add_argument("--batch-size", type=int, help="default: the family preset (32 for BERT/RoBERTa)")
    p.add_argument("--max-length", type=int, help="tokens per sample (default 128)")
    p.add_argument("--lr", type=float, help="default: the family preset (2e-5 for BERT/RoBERTa)")
    p.add_argument("--ref-samples", type=int, help="clean reference rows from dev-clean (default: preset)")
    p.add_argument(
        "--ref-overlap",
        action="store_true",
        help="select the epoch on all of dev-clean, reference rows included (the paper's "
        "protocol); by default selection uses the dev-clean rows not in the reference set",
    )
    p.add_argument("--max-train-rows", type=int, help="seeded training subsample, poison share kept")
    p.add_argument(
        "--config",
        help='JSON preset file: {"lr": ..., "methods": {"vanilla": {"lr": 2e-5}, "muscle": {...}}}; '
        "keys are TrainConfig fields, ref_samples, ref_disjoint and muscle_config (MuScleConfig overrides); "
        f"or a built-in preset: {', '.join(builtin_presets())} (the default without --model is "
        f"{DEFAULT_MODEL_PRESET})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muscle-fast", description="MuScleLoRA on possibly backdoor-poisoned data"
    )
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="patch a model with the paper defaults and print what was patched")
    ins.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    ins.add_argument("--num-labels", type=int, default=2)
    ins.add_argument("--config", help="JSON object of MuScleConfig overrides, e.g. '{\"lora_r\": 4}'")
    ins.set_defaults(func=cmd_inspect)

    d = sub.add_parser(
        "defend",
        help="train vanilla / LoRA / MuScleLoRA on poisoned data and compare CACC and ASR",
        description="Train each method on the poisoned training set, select the epoch by dev-clean "
        "accuracy, report test-clean CACC and test-poison ASR; writes results.json, results.md, "
        "results.png and one checkpoint per (attack, method) under --out.",
    )
    _add_data_args(d)
    d.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    d.add_argument(
        "--methods",
        default="vanilla,lora,muscle",
        help=f"comma-separated, from {', '.join(METHODS)} (default: vanilla,lora,muscle)",
    )
    d.add_argument("--out", required=True, help="output folder")
    _add_train_args(d)
    d.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: quantize the base model's linear layers to NF4 while loading (bitsandbytes); "
        "adapter methods only",
    )
    d.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer's activations in backward (less memory, ~30 %% more compute)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_defend)

    e = sub.add_parser("eval", help="CACC and ASR of a checkpoint saved by defend")
    e.add_argument("--adapter", required=True, help="a checkpoint folder: OUT/<attack>/<method>")
    _add_data_args(e)  # defaults: the data folder, seed and row cap recorded with the checkpoint
    e.add_argument("--model", help="base model (default: the one recorded with the checkpoint)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size (default: as in training)")
    e.add_argument("--max-length", type=int, help="default: as in training")
    e.add_argument(
        "--load-in-4bit", action="store_true", help="load the base model in NF4 (default: as in training)"
    )
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "report",
        help="merge results.json files of runs split across processes into one table and plot",
    )
    r.add_argument("results", nargs="+", help="results.json files written by defend")
    r.add_argument("--out", required=True, help="folder for the merged results.json/md/png")
    r.add_argument("--model", help="model name for the titles (default: the one the records name)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser(
        "fourier",
        help="train one method and track the low/high-frequency errors of dev-clean and dev-poison",
        description="The paper's Fourier analysis (SPEC §6): train one method as defend does and, every "
        "--every steps, record e_low and e_high (Gaussian low-pass over the input embeddings) of a fixed "
        "sample of dev-clean (clean mapping) and dev-poison (backdoor mapping); writes fourier.json and "
        "fourier.png under --out, with the test CACC/ASR of the selected checkpoint.",
    )
    _add_data_args(f)
    f.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    f.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    f.add_argument("--out", required=True, help="output folder")
    _add_train_args(f)
    f.add_argument("--every", type=int, default=10, help="record every N optimizer steps (default 10)")
    f.add_argument(
        "--samples", type=int, default=400, help="seeded sample of dev-clean and of dev-poison (default 400)"
    )
    f.add_argument(
        "--deltas",
        help="comma-separated kernel widths, e.g. 0.5,1,2 (default: chosen at the first record so each "
        "point's Gaussian neighbourhood holds about 2, 8, 32, 128 samples)",
    )
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fourier)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError) as e:  # bad input: one line, no traceback
        if os.environ.get("MUSCLE_FAST_TRACEBACK"):
            raise
        raise SystemExit(f"muscle-fast: {_one_line(e)}") from None


if __name__ == "__main__":
    sys.exit(main())
