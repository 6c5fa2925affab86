"""What a run is: the compared methods (:data:`METHODS`) and :class:`RunSpec`, the value object a
``defend`` or ``fourier`` run is described by, checked when built."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

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
    #: TrainConfig values that make the method what it is, under every preset key (the preset
    #: file's top level and sections may still change them)
    defaults: tuple[tuple[str, Any], ...] = ()


#: The row filters of the ``+filter`` methods (docs/SPEC.md §4), applied before their training.
FILTER_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("scan_alpha", 1e-3),
    ("disc_quantile", 0.9),
    ("teacher_epochs", 20),
    ("teacher_relabel_prob", 1.0),
    ("teacher_gate", "unexplained"),
)
_FILTER_DOC = (
    "on the training rows the reference set vouches for: the n-gram scan drops rows holding a lexical "
    "trigger, an n-gram regression drops rows it tells from the reference rows (style, syntax), a "
    "teacher trained on the reference rows drops the rows whose label it contradicts, unless the scan "
    "found the trigger and nothing else is left (docs/SPEC.md §4: scan_alpha, disc_quantile, "
    "teacher_epochs, teacher_gate)"
)

METHODS: dict[str, Method] = {
    "vanilla": Method(False, False, False, "full fine-tune, no defense"),
    "lora": Method(True, False, False, "LoRA only"),
    "muscle": Method(True, True, True, "MuScleLoRA: LoRA + MSLR + gradient alignment"),
    "lora+mslr": Method(True, True, False, "ablation: LoRA + MSLR, no alignment"),
    "lora+ga": Method(True, False, True, "ablation: LoRA + gradient alignment, no MSLR"),
    "lora+filter": Method(
        True, False, False, f"LoRA (lora's settings) {_FILTER_DOC}", inherits="lora", defaults=FILTER_DEFAULTS
    ),
    "full+filter": Method(
        False,
        False,
        False,
        f"full fine-tune (vanilla's settings) {_FILTER_DOC}; the teacher is a full fine-tune too",
        inherits="vanilla",
        defaults=FILTER_DEFAULTS,
    ),
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
