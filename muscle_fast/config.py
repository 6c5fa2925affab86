"""MuScleConfig and the per-family defaults of SPEC §3 (one registry, one entry per family)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .ops.dispatch import BACKENDS, resolve_backend

INIT_CHOICES = ("kaiming", "zeros")

#: The one default seed (runs, subsampling, poisoning, reference-row draws).
DEFAULT_SEED: int = 42


@dataclass(frozen=True)
class AlignDefaults:
    """The paper's gradient-alignment settings (SPEC §4); every default of the alignment reads these."""

    min_ref_grad_norm: float = 5e-7
    min_ref_loss: float = 0.4
    max_raw_grad_ratio: float = 0.1
    ga_epoch: int = 1
    epochs: int = 10


ALIGN_DEFAULTS = AlignDefaults()


@dataclass(frozen=True)
class TrainDefaults:
    """The paper's training settings for the encoder families, and for a model of no known family
    (SPEC §4-5); TrainConfig, the family registry and the CLI read these."""

    lr: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    ref_samples: int = 96  # clean reference rows drawn from dev-clean for the alignment


TRAIN_DEFAULTS = TrainDefaults()


@dataclass(frozen=True)
class FamilyDefaults:
    """Paper defaults for one model family (SPEC §3 and §4)."""

    lora_targets: tuple[str, ...]
    mslr_targets: tuple[str, ...]
    lora_r: int
    lora_alpha: float
    mslr_scales: Callable[[Any], tuple[float, ...]]  # model config -> scales (base vs large)
    mslr_r: int
    mslr_alpha: float
    head_modules: tuple[str, ...]  # randomly initialised task head: frozen, saved with the adapter
    decoder_head: bool = False  # replace `score` by dense(hidden->16) -> dropout -> out_proj
    # training defaults (used by muscle_fast.train / the CLI)
    lr: float = TRAIN_DEFAULTS.lr
    epochs: int = ALIGN_DEFAULTS.epochs
    batch_size: int = TRAIN_DEFAULTS.batch_size
    ref_samples: int = TRAIN_DEFAULTS.ref_samples
    min_ref_loss: float = ALIGN_DEFAULTS.min_ref_loss
    max_raw_grad_ratio: float = ALIGN_DEFAULTS.max_raw_grad_ratio
    ga_epoch: int = ALIGN_DEFAULTS.ga_epoch

    def align_kwargs(self) -> dict[str, Any]:
        """The family's gradient-alignment settings, as GradientAligner / TrainConfig take them."""
        return dict(
            min_ref_loss=self.min_ref_loss, max_raw_grad_ratio=self.max_raw_grad_ratio, ga_epoch=self.ga_epoch
        )

    def train_kwargs(self) -> dict[str, Any]:
        """The family's training defaults, as TrainConfig takes them."""
        return dict(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size, **self.align_kwargs())


def model_family(model: Any) -> FamilyDefaults | None:
    """The registry entry for ``model.config.model_type``, or None for an unknown family."""
    return FAMILIES.get(str(getattr(getattr(model, "config", None), "model_type", None)))


def _hidden(cfg: Any) -> int:
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))


def _bert_scales(cfg: Any) -> tuple[float, ...]:
    if _hidden(cfg) >= 1024:  # BERT-large
        return tuple(float(k) for k in range(1, 10))
    return (1.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0)


def _roberta_scales(cfg: Any) -> tuple[float, ...]:
    if _hidden(cfg) >= 1024:
        return tuple(float(k) for k in range(1, 10))
    return (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0)


def _decoder_scales(cfg: Any) -> tuple[float, ...]:
    return (1.0, 2.0, 3.0, 4.0)


_ENCODER = dict(
    lora_r=8,
    lora_alpha=32.0,
    mslr_r=1,
    mslr_alpha=6.0,
    lr=TRAIN_DEFAULTS.lr,
    epochs=ALIGN_DEFAULTS.epochs,
    batch_size=TRAIN_DEFAULTS.batch_size,
    ref_samples=TRAIN_DEFAULTS.ref_samples,
    min_ref_loss=ALIGN_DEFAULTS.min_ref_loss,
    max_raw_grad_ratio=ALIGN_DEFAULTS.max_raw_grad_ratio,
    ga_epoch=ALIGN_DEFAULTS.ga_epoch,
)
_DECODER = dict(
    lora_r=2,
    lora_alpha=8.0,
    mslr_r=1,
    mslr_alpha=4.0,
    mslr_targets=("score.dense",),
    mslr_scales=_decoder_scales,
    head_modules=("score",),
    decoder_head=True,
    lr=1e-5,
    epochs=5,
    batch_size=16,
    ref_samples=128,
    min_ref_loss=0.0,
    max_raw_grad_ratio=0.0,
    ga_epoch=0,
)

#: model_type -> defaults. Adding a family is one entry here.
FAMILIES: dict[str, FamilyDefaults] = {
    "bert": FamilyDefaults(
        lora_targets=("query", "value"),
        mslr_targets=("pooler.dense",),
        mslr_scales=_bert_scales,
        head_modules=("classifier",),
        **_ENCODER,
    ),
    "roberta": FamilyDefaults(
        lora_targets=("query", "value"),
        mslr_targets=("classifier.dense",),
        mslr_scales=_roberta_scales,
        head_modules=("classifier",),
        **_ENCODER,
    ),
    "gpt2": FamilyDefaults(lora_targets=("c_attn",), **_DECODER),
    "llama": FamilyDefaults(lora_targets=("q_proj", "v_proj"), **_DECODER),
}


def family_defaults(model_type: str) -> FamilyDefaults:
    """Defaults for a model family, or a ValueError listing the known ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"muscle_fast has no defaults for model_type {model_type!r}; known types: "
            f"{sorted(FAMILIES)}. Pass lora_targets/mslr_targets explicitly to patch it anyway."
        ) from None


@dataclass
class MuScleConfig:
    """Where the multi-scale low-rank modules go and how they are shaped (SPEC §2-3).

    ``lora_*`` describe the single-scale LoRA modules, ``mslr_*`` the multi-scale
    ones. ``head_modules`` are frozen but saved with the adapter because their
    weights are not in the base checkpoint; ``decoder_head`` replaces a decoder's
    ``score`` layer by ``dense -> dropout -> out_proj`` as the paper does.
    """

    model_type: str | None = None
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    mslr_scales: list[float] = field(default_factory=lambda: [1.0])
    mslr_r: int = 1
    mslr_alpha: float = 6.0
    mslr_dropout: float = 0.0
    mslr_targets: list[str] = field(default_factory=list)
    lora_init_B: str = "zeros"
    mslr_init_B: str = "kaiming"
    head_modules: list[str] = field(default_factory=list)
    decoder_head: bool = False
    head_hidden: int = 16
    head_dropout: float = 0.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        # list fields come from JSON too: a bare string would split into characters, a number fail
        # with "not iterable"; name the field instead
        for name in ("lora_targets", "mslr_targets", "head_modules", "mslr_scales"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                raise ValueError(f"MuScleConfig.{name} must be a list, got {v!r}")
        for name in ("lora_targets", "mslr_targets", "head_modules"):
            v = getattr(self, name)
            if not all(isinstance(t, str) for t in v):
                raise ValueError(f"MuScleConfig.{name} must be a list of module names, got {v!r}")
            setattr(self, name, list(v))
        self.validate()

    def validate(self) -> None:
        """Reject values that would silently give a wrong model; numpy scalars (a sweep's np.arange,
        say) become the Python numbers JSON stores, also when set after construction."""
        for name in ("lora_r", "mslr_r", "head_hidden"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MuScleConfig.{name} must be an integer >= 1, got {v!r}")
            setattr(self, name, int(v))
        for name in ("lora_alpha", "mslr_alpha", "lora_dropout", "mslr_dropout", "head_dropout"):
            if is_number(getattr(self, name)):
                setattr(self, name, float(getattr(self, name)))
        for name in ("lora_alpha", "mslr_alpha"):
            v = getattr(self, name)
            if not (is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"MuScleConfig.{name} must be > 0, got {v!r}")
        for name in ("lora_dropout", "mslr_dropout", "head_dropout"):
            v = getattr(self, name)
            if not (is_number(v) and 0.0 <= v < 1.0):
                raise ValueError(f"MuScleConfig.{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.decoder_head, bool):
            raise ValueError(f"MuScleConfig.decoder_head must be true or false, got {self.decoder_head!r}")
        if self.model_type is not None and not isinstance(self.model_type, str):
            raise ValueError(f"MuScleConfig.model_type must be a string or None, got {self.model_type!r}")
        self.mslr_scales = list(validate_scales(self.mslr_scales, where="MuScleConfig.mslr_scales"))
        for name in ("lora_init_B", "mslr_init_B"):
            if getattr(self, name) not in INIT_CHOICES:
                raise ValueError(
                    f"MuScleConfig.{name} must be one of {INIT_CHOICES}, got {getattr(self, name)!r}"
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"MuScleConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        overlap = set(self.lora_targets) & set(self.mslr_targets)
        if overlap:
            raise ValueError(f"MuScleConfig: {sorted(overlap)} listed as both LoRA and MSLR targets")

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> MuScleConfig:
        """Paper defaults (SPEC §3) for ``model.config.model_type``, then ``overrides``."""
        mcfg = getattr(model, "config", None)
        model_type = getattr(mcfg, "model_type", None)
        explicit = "lora_targets" in overrides or "mslr_targets" in overrides
        if model_type in FAMILIES:
            fam = FAMILIES[model_type]
            base: dict[str, Any] = dict(
                model_type=model_type,
                lora_r=fam.lora_r,
                lora_alpha=fam.lora_alpha,
                lora_targets=list(fam.lora_targets),
                mslr_scales=list(fam.mslr_scales(mcfg)),
                mslr_r=fam.mslr_r,
                mslr_alpha=fam.mslr_alpha,
                mslr_targets=list(fam.mslr_targets),
                head_modules=list(fam.head_modules),
                decoder_head=fam.decoder_head,
            )
        elif explicit:
            base = dict(model_type=model_type)
        else:
            family_defaults(str(model_type))  # raises the error listing known types
            raise AssertionError("unreachable")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MuScleConfig has no field(s) {sorted(unknown)}")
        base.update(overrides)
        return cls(**base)

    def resolved_backend(self) -> str:
        """The backend in force: the ``MUSCLE_FAST_BACKEND`` env var overrides the config."""
        return resolve_backend(self.backend)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MuScleConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MuScleConfig.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def is_number(v: Any) -> bool:
    """A real number that is not a bool (True would pass as 1)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_align_settings(
    prefix: str, min_ref_grad_norm: Any, min_ref_loss: Any, max_raw_grad_ratio: Any, ga_epoch: Any
) -> None:
    """The alignment rule's thresholds (SPEC §4) must be finite and in range: a NaN threshold compares
    false, which turns the alignment off without a word, and a ratio above 1 is silently capped."""
    for name, v in (("min_ref_grad_norm", min_ref_grad_norm), ("min_ref_loss", min_ref_loss)):
        if not (is_number(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {v!r}")
    if not (is_number(max_raw_grad_ratio) and 0.0 <= max_raw_grad_ratio <= 1.0):
        raise ValueError(f"{prefix}max_raw_grad_ratio must be a number in [0, 1], got {max_raw_grad_ratio!r}")
    if not (is_number(ga_epoch) and math.isfinite(ga_epoch) and ga_epoch >= 0):
        raise ValueError(f"{prefix}ga_epoch must be a finite number >= 0, got {ga_epoch!r}")


def validate_scales(scales: Any, where: str) -> tuple[float, ...]:
    """Scales must be a non-empty sequence of finite positive numbers."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ValueError(f"{where} must be a sequence of positive numbers, got {scales!r}")
    scales = list(scales)
    try:
        if any(isinstance(k, (str, bytes, bool)) for k in scales):
            raise TypeError
        out = tuple(float(k) for k in scales)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a sequence of positive numbers, got {scales!r}") from None
    if not out:
        raise ValueError(f"{where} must not be empty")
    bad = [k for k in out if not (math.isfinite(k) and k > 0)]
    if bad:
        raise ValueError(f"{where} must all be finite and > 0, got {bad}")
    return out
