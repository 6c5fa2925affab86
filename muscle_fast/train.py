"""The paper's training loop: AdamW, linear schedule, gradient alignment, clip 1.0, step (SPEC §4).

``train_muscle`` trains any model whose trainable parameters are set (a patched
MuScleLoRA model, a LoRA-only one, or a fully trainable one for the undefended
baseline), selects the epoch with the best dev accuracy, and checkpoints
atomically so a killed run resumes to the same state. Under torch.distributed
each rank takes its slice of every global batch and reference gradients are
averaged across ranks before alignment, so N ranks with batch B equal one
process with batch N*B.

Where the pieces live: rows, batches and accuracy in :mod:`muscle_fast.evaluation`, the
torch.distributed helpers in :mod:`muscle_fast.distributed`, the state file in
:mod:`muscle_fast.checkpoint`; their public names are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CKPT, check_same_run, load_train_state, run_key, save_train_state
from .config import (
    ALIGN_DEFAULTS,
    BACKENDS,
    DEFAULT_SEED,
    TRAIN_DEFAULTS,
    check_align_settings,
    model_family,
)
from .distributed import average_across_ranks, rank_share, unwrap_model, world
from .dual import default_loss, dual_gradients, trainable_params
from .evaluation import Row, accuracy, as_rows, encode, predict, predict_proba

__all__ = [
    "CKPT",
    "Row",
    "StepCallback",
    "TeacherCache",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "as_rows",
    "average_across_ranks",
    "config_dict",
    "encode",
    "predict",
    "rank_share",
    "set_activation_checkpointing",
    "supports_checkpointing",
    "train_muscle",
    "world",
]

logger = logging.getLogger("muscle_fast")

#: Called after every optimizer step with the global step count and the (unwrapped) model.
StepCallback = Callable[[int, nn.Module], None]


#: Accepted Python types per TrainConfig annotation (a bool is not an int here; an int is a float).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "float": (int, float),
    "int": (int,),
    "bool": (bool,),
    "str": (str,),
    "str | None": (str, os.PathLike, type(None)),
    "bool | None": (bool, type(None)),
    "float | None": (int, float, type(None)),
}

#: when a ``teacher_epochs`` teacher runs (``TrainConfig.teacher_gate``; docs/SPEC.md §4)
TEACHER_GATES = ("always", "unexplained")


@dataclass
class TrainConfig:
    """Hyperparameters of one run; ``for_model`` fills the paper's defaults for the family."""

    lr: float = TRAIN_DEFAULTS.lr
    epochs: int = ALIGN_DEFAULTS.epochs
    batch_size: int = TRAIN_DEFAULTS.batch_size
    eval_batch_size: int = TRAIN_DEFAULTS.eval_batch_size
    max_length: int = TRAIN_DEFAULTS.max_length
    seed: int = DEFAULT_SEED
    align: bool = True  # gradient alignment on (MuScleLoRA) or off (baselines)
    min_ref_grad_norm: float = ALIGN_DEFAULTS.min_ref_grad_norm
    min_ref_loss: float = ALIGN_DEFAULTS.min_ref_loss
    max_raw_grad_ratio: float = ALIGN_DEFAULTS.max_raw_grad_ratio
    ga_epoch: int = ALIGN_DEFAULTS.ga_epoch
    # not in the paper, off by default (docs/SPEC.md §4): an aligned tensor with cos(g, c) >= this keeps g
    keep_raw_cos: float | None = None
    # not in the paper, off by default: training rows to which the model (eval mode, before the step)
    # gives their label a probability below this are left out of the training loss
    row_filter_min_prob: float = 0.0
    # not in the paper, off by default: project g onto the span of the last K reference gradients
    ref_subspace: int = 0
    # not in the paper, off by default: first train this many epochs on the reference rows alone (the
    # teacher), then relabel (teacher confidence >= teacher_relabel_prob) or drop (below) every
    # training row whose label the teacher contradicts, and train on the corrected rows from there
    teacher_epochs: int = 0
    teacher_relabel_prob: float = 1.0
    # when the teacher runs: "always", or "unexplained": not when the n-gram scan found a trigger and
    # the discriminator's test then finds no label whose training rows differ from its reference
    # rows (the poison was lexical and is gone; the teacher would only drop clean rows)
    teacher_gate: str = "always"
    # not in the paper, off by default: before training, drop the training rows that hold an n-gram
    # over-represented against the reference rows of their label at this family-wise significance
    # level (a lexical trigger; muscle_fast.backdoor.scan); 0 = off
    scan_alpha: float = 0.0
    # not in the paper, off by default: after the scan, drop the training rows a bag-of-n-grams
    # regression tells from the reference rows of their label beyond this quantile of the reference
    # rows' own held-out scores (a style or syntax trigger; muscle_fast.backdoor.discriminate); 0 = off
    disc_quantile: float = 0.0
    # the family-wise level of the test that a label's training rows differ from its reference rows
    # at all (held-out AUC); a label that does not pass loses no row
    disc_alpha: float = 0.05
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    weight_decay: float = 0.0
    single_pass: bool | None = None  # None: single pass when every trainable param is in a MuScleLinear
    backend: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject a field of the wrong type or out of range, naming it (``train_muscle`` calls this
        again: the dataclass is mutable)."""
        # types first (presets are JSON): "epochs": 1.5 or "lr": "3e-4" must fail here, naming the field
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kinds = _FIELD_TYPES.get(str(f.type))
            bad_bool = isinstance(v, bool) and bool not in (kinds or ())
            if kinds is not None and (bad_bool or not isinstance(v, kinds)):
                want = str(f.type).replace("float", "number")
                raise TypeError(f"TrainConfig.{f.name} must be {want}, got {v!r} ({type(v).__name__})")
        for name in ("lr", "batch_size", "epochs", "eval_batch_size", "max_length"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be finite, got {self.lr!r}")
        if not -(2**63) <= self.seed < 2**64 - 1:  # what torch.manual_seed takes, seed + 1 included
            raise ValueError(f"TrainConfig.seed must be in [-2**63, 2**64 - 1), got {self.seed!r}")
        check_align_settings(
            "TrainConfig.", self.min_ref_grad_norm, self.min_ref_loss, self.max_raw_grad_ratio, self.ga_epoch
        )
        # a negative max norm flips the gradient's sign in clip_grad_norm_ (gradient ascent)
        for name in ("grad_clip", "weight_decay", "checkpoint_every"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.keep_raw_cos is not None and not -1.0 <= self.keep_raw_cos <= 1.0:
            raise ValueError(
                f"TrainConfig.keep_raw_cos must be None or in [-1, 1], got {self.keep_raw_cos!r}"
            )
        if self.ref_subspace < 0:
            raise ValueError(f"TrainConfig.ref_subspace must be >= 0, got {self.ref_subspace!r}")
        if self.ref_subspace and self.keep_raw_cos is not None:
            raise ValueError("TrainConfig: ref_subspace and keep_raw_cos cannot be combined; set one")
        if self.teacher_epochs < 0:
            raise ValueError(f"TrainConfig.teacher_epochs must be >= 0, got {self.teacher_epochs!r}")
        if not 0.5 <= self.teacher_relabel_prob <= 1.0:
            raise ValueError(
                f"TrainConfig.teacher_relabel_prob must be in [0.5, 1], got {self.teacher_relabel_prob!r}"
            )
        if self.teacher_gate not in TEACHER_GATES:
            raise ValueError(
                f"TrainConfig.teacher_gate must be one of {TEACHER_GATES}, got {self.teacher_gate!r}"
            )
        if (
            self.teacher_gate == "unexplained"
            and self.teacher_epochs
            and not (self.scan_alpha and self.disc_quantile)
        ):
            raise ValueError(
                "TrainConfig.teacher_gate='unexplained' needs scan_alpha and disc_quantile on (the scan "
                f"explains the poison, the discriminator checks nothing is left), got scan_alpha="
                f"{self.scan_alpha!r}, disc_quantile={self.disc_quantile!r}; set teacher_gate='always' "
                "to train the teacher without them"
            )
        if self.disc_quantile != 0.0 and not 0.5 <= self.disc_quantile < 1.0:
            raise ValueError(
                f"TrainConfig.disc_quantile must be 0 (off) or in [0.5, 1), got {self.disc_quantile!r}"
            )
        if not 0.0 < self.disc_alpha < 1.0:
            raise ValueError(f"TrainConfig.disc_alpha must be in (0, 1), got {self.disc_alpha!r}")
        if not 0.0 <= self.scan_alpha < 1.0:
            raise ValueError(f"TrainConfig.scan_alpha must be in [0, 1) (0 = off), got {self.scan_alpha!r}")
        if not 0.0 <= self.row_filter_min_prob < 1.0:
            raise ValueError(
                f"TrainConfig.row_filter_min_prob must be in [0, 1), got {self.row_filter_min_prob!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> TrainConfig:
        fam = model_family(model)
        base: dict[str, Any] = fam.train_kwargs() if fam is not None else {}
        base.update(overrides)
        return cls(**base)


@dataclass
class TrainResult:
    """What ``train_muscle`` returns: the selected epoch, the per-epoch history and the best state."""

    best_epoch: int
    best_dev_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    wall_seconds: float = 0.0
    steps: int = 0
    skipped_steps: int = 0
    #: with ``teacher_epochs``: the teacher's history and best epoch, how many training rows it
    #: kept as labelled, relabelled and dropped, and ``relabeled_index``/``dropped_index`` (positions
    #: in ``train_rows``)
    teacher: dict[str, Any] = field(default_factory=dict)
    #: with ``scan_alpha``: the n-grams found and how many rows were dropped (``ScanResult.summary``),
    #: plus ``dropped_index``, the positions in ``train_rows`` of the dropped rows
    scan: dict[str, Any] = field(default_factory=dict)
    #: with ``disc_quantile``: the discriminator's per-label fit and how many rows it dropped
    #: (``DiscriminatorResult.summary``), plus ``dropped_index`` (positions in ``train_rows``)
    disc: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherCache:
    """A teacher trained by one ``train_muscle`` call and reused by later calls that would train the
    very same one, so a run over several attacks trains it once.

    The caller vouches that they would: the same initial model (weights, patch), TrainConfig, and
    reference and dev rows (the teacher never sees the training rows or the eval sets). A reusing
    call's teacher record is the one the training call made.
    """

    result: TrainResult | None = None  #: the teacher's training, once a call has trained it
    trained_by: str | None = None  #: the caller's name for the run that trained it (train_muscle ignores it)


# ---------------------------------------------------------------------------------------------- memory


def supports_checkpointing(model: nn.Module) -> bool:
    """Whether ``set_activation_checkpointing(model, True)`` can work (transformers' flag)."""
    return bool(getattr(unwrap_model(model), "supports_gradient_checkpointing", False))


def set_activation_checkpointing(model: nn.Module, enabled: bool, reentrant: bool = False) -> None:
    """Per-layer activation (gradient) checkpointing on or off (non-reentrant unless asked).

    How a 7B model's activations fit: each decoder layer keeps only its input and is recomputed in
    backward (MuScleLinear and the single-pass reference split are recompute-safe; tested bit for
    bit). Uses transformers' ``activation_checkpointing_*`` where it exists, else the older
    ``gradient_checkpointing_*`` names; a model without support is a ValueError naming it.
    """
    core = unwrap_model(model)
    if enabled and not supports_checkpointing(core):
        name = getattr(getattr(core, "config", None), "_name_or_path", "") or type(core).__name__
        raise ValueError(f"{name} does not support activation (gradient) checkpointing")
    if enabled and reentrant and hasattr(core, "enable_input_require_grads"):
        # reentrant checkpoints only backpropagate into layers whose input requires grad; the
        # frozen embeddings' output does not (newer transformers do this themselves)
        core.enable_input_require_grads()
    if hasattr(core, "activation_checkpointing_enable"):
        if enabled:
            core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            core.activation_checkpointing_disable()
    elif enabled:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    elif hasattr(core, "gradient_checkpointing_disable"):
        core.gradient_checkpointing_disable()  # (a model without either name has nothing to turn off)


# ---------------------------------------------------------------------------------------------- the loop


def train_muscle(
    model: nn.Module,
    tokenizer: Any,
    train_rows: Sequence[Any],
    ref_rows: Sequence[Any],
    dev_rows: Sequence[Any],
    config: TrainConfig | None = None,
    eval_sets: Mapping[str, Sequence[Any]] | None = None,
    step_callback: StepCallback | None = None,
    stop_after_steps: int | None = None,
    teacher_cache: TeacherCache | None = None,
) -> TrainResult:
    """Train ``model`` (its trainable parameters) on ``train_rows``; align with ``ref_rows`` if configured.

    Selects the epoch with the best accuracy on ``dev_rows``; ``eval_sets`` (for example a
    dev-poison set, whose accuracy is the ASR) are evaluated each epoch into the history.
    The best trainable state is loaded into the model at the end and returned.
    ``stop_after_steps`` ends the run early (as a kill would) after that many global steps,
    once the checkpoint for that step is written. ``teacher_cache`` (with ``teacher_epochs``): reuse
    the teacher it holds, or keep the one trained here in it.
    """
    from tqdm.auto import tqdm

    core = unwrap_model(model)
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(
            f"train_muscle: config must be a TrainConfig (TrainConfig(**d) for a dict), got "
            f"{type(config).__name__}"
        )
    cfg = config or TrainConfig.for_model(core)
    cfg.validate()
    data = _checked_data(core, cfg, train_rows, ref_rows, dev_rows, eval_sets)
    at = list(range(len(data.train)))  # each row's position in the caller's train_rows
    filters: dict[str, dict[str, Any]] = {}  # the row filters' records, in the order they ran
    for name, on, drop in (("scan", cfg.scan_alpha, _scanned), ("disc", cfg.disc_quantile, _discriminated)):
        if on:
            data.train, rec = drop(cfg, data)
            rec["dropped_index"] = [at[i] for i in rec["dropped_index"]]
            gone = set(rec["dropped_index"])
            at = [i for i in at if i not in gone]
            filters[name] = rec
    teacher: dict[str, Any] = {}
    explained = _poison_explained(cfg, filters)
    if explained:
        teacher = {"skipped": explained}
        logger.info(f"muscle_fast: teacher not trained (teacher_gate='unexplained'): {explained}")
    elif cfg.teacher_epochs:
        data.train, teacher = _teacher_corrected(model, tokenizer, cfg, data, teacher_cache)
        for key in ("dropped_index", "relabeled_index"):
            teacher[key] = [at[i] for i in teacher[key]]
    run = _Run(model, tokenizer, cfg, data)
    run.result.teacher = teacher
    run.result.scan = filters.get("scan", {})
    run.result.disc = filters.get("disc", {})
    run.resume()
    t0 = run.t0 = time.perf_counter()
    was_training = core.training
    for epoch in range(run.start_epoch, cfg.epochs):
        order = run.epoch_order()
        model.train()
        first = run.start_step if epoch == run.start_epoch else 0
        losses: list[float] = list(run.resumed_losses) if first else []
        bar = tqdm(
            range(first, run.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or run.rank != 0,
            leave=False,
        )
        for step in bar:
            losses.append(run.step(order, step, epoch))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step_callback is not None:
                step_callback(run.global_step, core)
            mid_epoch = step + 1 < run.steps_per_epoch  # the epoch's end writes its own checkpoint
            if cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0 and mid_epoch:
                run.save(epoch, step + 1, losses)
            if stop_after_steps is not None and run.global_step >= stop_after_steps:
                run.save(epoch, step + 1, losses)
                return run.finish(t0, was_training, load_best=False)
        run.end_epoch(epoch, losses, t0)
    return run.finish(t0, was_training, load_best=True)


def _scanned(cfg: TrainConfig, data: _Data) -> tuple[list[Row], dict[str, Any]]:
    """The training rows without those holding a lexical trigger found against the reference rows,
    with the scan's record; deterministic, so a resumed run drops the same rows."""
    from muscle_fast.backdoor.scan import scan_ngrams

    _needs_ref(data, "scan_alpha")
    res = scan_ngrams(data.train, data.ref, alpha=cfg.scan_alpha)
    if res.untested_labels:
        logger.warning(
            f"muscle_fast: n-gram scan: no reference row has label(s) {res.untested_labels}; "
            "their training rows were not scanned"
        )
    found = ", ".join(f"{f.ngram!r} (label {f.label}, {f.train_rows} rows)" for f in res.findings)
    setting = f"scan_alpha={cfg.scan_alpha}"
    return _drop_flagged(data, res, "n-gram scan", setting, f"found {found or 'nothing'}")


def _discriminated(cfg: TrainConfig, data: _Data) -> tuple[list[Row], dict[str, Any]]:
    """The training rows without those the n-gram discriminator tells from the reference rows, with
    its record; deterministic for the seed, so a resumed run drops the same rows."""
    from muscle_fast.backdoor.discriminate import discriminate_rows

    _needs_ref(data, "disc_quantile")
    res = discriminate_rows(data.train, data.ref, cfg.disc_quantile, seed=cfg.seed, alpha=cfg.disc_alpha)
    if res.untested_labels:
        logger.warning(
            f"muscle_fast: n-gram discriminator: label(s) {res.untested_labels} have too few reference rows "
            "to calibrate; their training rows were kept"
        )
    per_label = ", ".join(
        f"label {lab}: AUC {v['auc']:.3f} (z {v['z']:.1f}), {v['flagged']} rows"
        for lab, v in res.labels.items()
    )
    setting = f"disc_quantile={cfg.disc_quantile}"
    return _drop_flagged(data, res, "n-gram discriminator", setting, per_label or "tested no label")


def _poison_explained(cfg: TrainConfig, filters: Mapping[str, dict[str, Any]]) -> str | None:
    """Why the teacher need not run (``teacher_gate='unexplained'``), or None: the scan dropped the
    rows of a lexical trigger and no label's remaining training rows passed the discriminator's
    test against its reference rows."""
    if cfg.teacher_gate != "unexplained" or not cfg.teacher_epochs:
        return None
    scan, disc = filters["scan"], filters["disc"]
    unsure = scan["untested_labels"] or disc["untested_labels"]
    if not scan["flagged"] or unsure or any(v["passed"] for v in disc["labels"].values()):
        return None
    grams = ", ".join(repr(f["ngram"]) for f in scan["findings"])
    return (
        f"the n-gram scan dropped {scan['flagged']} rows holding {grams} and no label's remaining rows "
        "differ from its reference rows (discriminator test)"
    )


def _needs_ref(data: _Data, option: str) -> None:
    if not data.ref:
        raise ValueError(f"train_muscle: {option} needs a non-empty reference set (ref_rows)")


def _drop_flagged(
    data: _Data, res: Any, name: str, setting: str, found: str
) -> tuple[list[Row], dict[str, Any]]:
    """``data.train`` without the rows a filter's result flagged, and its record (``summary()`` plus
    ``dropped_index``: positions in ``data.train``); a ValueError when it flagged every row."""
    kept = [row for row, f in zip(data.train, res.flagged, strict=True) if not f]
    if not kept:
        raise ValueError(f"train_muscle: the {name} ({setting}) flagged every training row")
    record = res.summary()
    record["dropped_index"] = [i for i, f in enumerate(res.flagged) if f]
    n = len(data.train)
    logger.info(f"muscle_fast: {name} {found}; {record['flagged']} of {n} training rows dropped")
    return kept, record


def _teacher_corrected(
    model: nn.Module, tokenizer: Any, cfg: TrainConfig, data: _Data, cache: TeacherCache | None = None
) -> tuple[list[Row], dict[str, Any]]:
    """Train the teacher (``teacher_epochs`` on the reference rows, no alignment, best dev epoch kept
    in the model; or load the one ``cache`` holds) and return the training rows it corrects, with
    its record.

    A row whose label the teacher (eval mode) finds less likely than another label is relabelled
    to that label when the teacher gives it at least ``teacher_relabel_prob``, else dropped: a
    dirty-label poisoned row, read for its content, contradicts a model that never saw a trigger.
    Deterministic for a seed, so a resumed run repeats it and gets the same rows.
    """
    if not data.ref:
        raise ValueError("train_muscle: teacher_epochs needs a non-empty reference set (ref_rows)")
    tcfg = dataclasses.replace(
        cfg,
        epochs=cfg.teacher_epochs,
        align=False,
        teacher_epochs=0,
        scan_alpha=0.0,
        disc_quantile=0.0,
        row_filter_min_prob=0.0,
        checkpoint_dir=None,
        checkpoint_every=0,
    )
    if cache is not None and cache.result is not None:
        res = cache.result
        _load_trainable(model, res.best_state, "teacher_cache")
        logger.info("muscle_fast: teacher reused from an earlier run with the same model, config and rows")
    else:
        # scored on the dev rows only: the extra sets (a dev ASR) say nothing of a model that never
        # sees the training rows, and cost as much as a third of its epochs
        res = train_muscle(model, tokenizer, data.ref, data.ref, data.dev, tcfg)
        if cache is not None:
            cache.result = res
    probs = predict_proba(model, tokenizer, data.train, cfg.eval_batch_size, cfg.max_length)
    conf, pred = probs.max(dim=-1)
    own = probs.gather(1, torch.tensor([lab for _, lab in data.train])[:, None])[:, 0]
    rows: list[Row] = []
    relabeled: list[int] = []
    dropped: list[int] = []
    for i, ((text, label), p, c, o) in enumerate(
        zip(data.train, pred.tolist(), conf.tolist(), own.tolist(), strict=True)
    ):
        if o >= c:  # the label is (one of) the teacher's most likely: kept as it is
            rows.append((text, label))
        elif c >= cfg.teacher_relabel_prob:
            rows.append((text, p))
            relabeled.append(i)
        else:
            dropped.append(i)
    if not rows:
        raise ValueError("train_muscle: the teacher dropped every training row (lower teacher_relabel_prob)")
    record = {
        "epochs": cfg.teacher_epochs,
        "best_epoch": res.best_epoch,
        "best_dev_acc": res.best_dev_acc,
        "history": res.history,
        "rows": len(data.train),
        "relabeled": len(relabeled),
        "dropped": len(dropped),
        "relabeled_index": relabeled,
        "dropped_index": dropped,
    }
    logger.info(
        f"muscle_fast: teacher (epoch {res.best_epoch}, dev_acc={res.best_dev_acc:.4f}) relabelled "
        f"{len(relabeled)} and dropped {len(dropped)} of {len(data.train)} training rows"
    )
    return rows, record


def _load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` into the model's trainable parameters; a ValueError when their names differ."""
    core = unwrap_model(model)
    params = {n: p for n, p in core.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(
            f"train_muscle: {what} holds another model's parameters (unknown here: {extra[:3]}, "
            f"missing: {missing[:3]})"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


@dataclass
class _Data:
    """The sets of one run as rows: training, reference, dev (model selection), extra evaluations."""

    train: list[Row]
    ref: list[Row]
    dev: list[Row]
    extra: dict[str, list[Row]]


def _checked_data(
    core: nn.Module,
    cfg: TrainConfig,
    train_rows: Sequence[Any],
    ref_rows: Sequence[Any],
    dev_rows: Sequence[Any],
    eval_sets: Mapping[str, Sequence[Any]] | None,
) -> _Data:
    """The sets as rows, refused before any state is built when the run could not train or select."""
    data = _Data(
        train=as_rows(train_rows, "train_rows"),
        ref=as_rows(ref_rows, "ref_rows"),
        dev=as_rows(dev_rows, "dev_rows"),
        extra={k: as_rows(v, f"eval_sets[{k!r}]") for k, v in (eval_sets or {}).items()},
    )
    if not data.train:
        raise ValueError("train_muscle: the training set is empty")
    if not data.dev:
        raise ValueError("train_muscle: the dev set is empty (needed for model selection)")
    if cfg.align and not data.ref:
        raise ValueError("train_muscle: gradient alignment needs a non-empty reference set (ref_rows)")
    num_labels = getattr(core.config, "num_labels", None)
    named = [("train_rows", data.train), ("ref_rows", data.ref), ("dev_rows", data.dev)]
    named += [(f"eval_sets[{k!r}]", rows) for k, rows in data.extra.items()]  # an ASR set: target labels
    for name, rows in named:
        bad = [lab for _, lab in rows if num_labels is not None and not 0 <= lab < num_labels]
        if bad:
            raise ValueError(
                f"train_muscle: {name} has labels outside [0, {num_labels}): {sorted(set(bad))[:5]}"
            )
    return data


class _Run:
    """The state of one ``train_muscle`` call: optimizer, schedule, aligner, generators, result.

    Everything a resumed run needs to continue bit for bit is here, so ``save`` / ``resume``
    are the only places that know the checkpoint's layout.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, data: _Data) -> None:
        from .align import GradientAligner

        self.model, self.core, self.tokenizer = model, unwrap_model(model), tokenizer
        self.cfg, self.data = cfg, data
        self.rank, self.nranks = world()
        self.device = next(self.core.parameters()).device
        self.params = trainable_params(self.core)
        if not self.params:
            raise ValueError("train_muscle: the model has no trainable parameters")
        self.names = [n for n, p in self.core.named_parameters() if p.requires_grad]
        self.global_bs = cfg.batch_size * self.nranks
        self.steps_per_epoch = math.ceil(len(data.train) / self.global_bs)
        total_steps = self.steps_per_epoch * cfg.epochs
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: max(0.0, 1.0 - s / total_steps))
        self.aligner = (
            GradientAligner(
                self.params,
                cfg.min_ref_grad_norm,
                cfg.min_ref_loss,
                cfg.max_raw_grad_ratio,
                cfg.ga_epoch,
                cfg.epochs,
                backend=cfg.backend,
                keep_raw_cos=cfg.keep_raw_cos,
                ref_subspace=cfg.ref_subspace,
            )
            if cfg.align
            else None
        )
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the epochs' shuffles
        self.ref_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the reference rows' draws
        torch.manual_seed(cfg.seed)
        self.epoch_gen_state = self.data_gen.get_state()  # data_gen at the start of the current epoch
        self.next_epoch_state = self.epoch_gen_state
        self.result = TrainResult(best_epoch=-1, best_dev_acc=-1.0)
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.resumed_losses: list[float] = []
        self.rows_seen = self.rows_kept = 0  # row filter counts of the current epoch (this rank)
        self.t0 = time.perf_counter()  # reset when training starts
        self.prior_seconds = 0.0  # training time before the resumed checkpoint (earlier processes)
        self.ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.key = run_key(
            config_dict(cfg), world_size=self.nranks, train_rows=len(data.train), ref_rows=len(data.ref)
        )

    def resume(self) -> None:
        """Continue from the checkpoint in ``checkpoint_dir`` if there is one (refused if another run's)."""
        state = load_train_state(self.ckpt_dir) if self.ckpt_dir is not None else None
        if state is None:
            return
        check_same_run(state, self.names, self.key, self.ckpt_dir)
        with torch.no_grad():
            for p, v in zip(self.params, state["params"], strict=True):
                p.copy_(v)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ref_gen.set_state(state["ref_gen"])
        self.epoch_gen_state = state["epoch_gen"]
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        res = self.result
        res.history = list(state["history"])
        res.best_epoch, res.best_dev_acc = state["best_epoch"], state["best_dev_acc"]
        best = state["best_params"]
        res.best_state = dict(zip(self.names, best, strict=True)) if best else {}
        res.skipped_steps = state["skipped_steps"]
        self.resumed_losses = list(state.get("epoch_losses", []))
        self.prior_seconds = float(state.get("elapsed_seconds", 0.0))
        if self.aligner is not None:
            self.aligner.load_state_dict(state.get("aligner", {}))
        logger.info(
            f"muscle_fast: resumed from {self.ckpt_dir} at epoch {self.start_epoch}, step {self.start_step}"
        )

    def save(self, epoch: int, step_in_epoch: int, epoch_losses: Sequence[float] = ()) -> None:
        """Write the state at ``step_in_epoch`` of ``epoch`` (rank 0, when checkpointing is on)."""
        if self.ckpt_dir is None or self.rank != 0:
            return
        res = self.result
        best = [res.best_state[n] for n in self.names] if res.best_state else []
        save_train_state(
            self.ckpt_dir,
            {
                "names": self.names,
                "run": self.key,
                "params": [p.detach().cpu() for p in self.params],
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "ref_gen": self.ref_gen.get_state(),
                "epoch_gen": self.epoch_gen_state,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "history": res.history,
                "epoch_losses": list(epoch_losses),  # so a resumed epoch reports its whole mean loss
                "best_epoch": res.best_epoch,
                "best_dev_acc": res.best_dev_acc,
                "best_params": best,
                "skipped_steps": res.skipped_steps,
                "elapsed_seconds": self.elapsed(),  # so a resumed run reports its whole training time
                "aligner": {} if self.aligner is None else self.aligner.state_dict(),
            },
        )

    def elapsed(self) -> float:
        """Seconds of training so far, those before a resume included."""
        return self.prior_seconds + time.perf_counter() - self.t0

    def epoch_order(self) -> list[int]:
        """The current epoch's shuffle of the training rows (the same again when the epoch is resumed)."""
        self.data_gen.set_state(self.epoch_gen_state)
        order = torch.randperm(len(self.data.train), generator=self.data_gen).tolist()
        self.next_epoch_state = self.data_gen.get_state()
        return order

    def step(self, order: Sequence[int], step: int, epoch: int) -> float:
        """One optimizer step on global batch ``step`` of the epoch's ``order``; this rank's loss."""
        cfg = self.cfg
        idx = order[step * self.global_bs : (step + 1) * self.global_bs]
        mine, share = rank_share(idx, self.rank, self.nranks)
        batch = encode(self.tokenizer, [self.data.train[i] for i in mine], cfg.max_length, self.device)
        loss, bad_step = self._gradients(batch, len(idx), share, epoch)
        # grad_clip 0: no clipping (the norm is still taken, to skip non-finite steps)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
        if bad_step or not torch.isfinite(norm):
            self.result.skipped_steps += 1  # never write NaN into the parameters
            if self.result.skipped_steps == 1:
                logger.warning("muscle_fast: non-finite gradient, optimizer step skipped")
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(loss.detach())

    def _gradients(
        self, batch: dict[str, torch.Tensor], global_rows: int, share: float, epoch: int
    ) -> tuple[torch.Tensor, bool]:
        """Set the step's gradients, aligned with a reference batch if configured; (loss, non-finite?)."""
        loss_fn = default_loss
        if self.cfg.row_filter_min_prob > 0:
            batch = self._filter_rows(batch)
            loss_fn = _masked_loss
        if self.aligner is None:
            self.opt.zero_grad(set_to_none=True)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = loss_fn(self.model(**inputs).logits, batch["labels"])
            (loss * share).backward()
            return loss, False
        ref = self.data.ref
        ridx = torch.randint(len(ref), (global_rows,), generator=self.ref_gen).tolist()
        rmine, _ = rank_share(ridx, self.rank, self.nranks)
        ref_batch = encode(self.tokenizer, [ref[i] for i in rmine], self.cfg.max_length, self.device)
        loss, ref_loss, ref_grads = dual_gradients(
            self.model,
            batch,
            ref_batch,
            params=self.params,
            single_pass=self.cfg.single_pass,
            loss_scale=share,
            loss_fn=loss_fn,
        )
        *ref_grads, ref_loss = average_across_ranks([*ref_grads, ref_loss * share])
        stats = self.aligner.align(ref_grads, ref_loss, epoch)
        return loss, bool(stats.nonfinite_grad > 0)

    def _filter_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with the label of every row the model finds unlikely set to -100 (left out).

        The model is asked in eval mode (no dropout) before the step: a row whose label it gives a
        probability below ``row_filter_min_prob`` contradicts what it has learned so far, as a
        relabelled (dirty-label) poisoned row does once the model reads its content.
        """
        was_training = self.core.training
        self.model.eval()
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            probs = torch.softmax(self.model(**inputs).logits.float(), dim=-1)
        self.model.train(was_training)
        labels = batch["labels"]
        keep = probs.gather(1, labels[:, None])[:, 0] >= self.cfg.row_filter_min_prob
        self.rows_seen += labels.numel()
        self.rows_kept += int(keep.sum())
        return {**batch, "labels": torch.where(keep, labels, torch.full_like(labels, -100))}

    def end_epoch(self, epoch: int, losses: Sequence[float], t0: float) -> None:
        """Evaluate, keep the state if dev accuracy improved, log, and checkpoint the epoch's end."""
        cfg, res = self.cfg, self.result

        def acc(rows: Sequence[Row]) -> float:
            return accuracy(self.model, self.tokenizer, rows, cfg.eval_batch_size, cfg.max_length)

        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(1, len(losses)),
            "dev_acc": acc(self.data.dev),
        }
        if cfg.row_filter_min_prob > 0:
            record["rows_kept"] = self.rows_kept / max(1, self.rows_seen)
            self.rows_seen = self.rows_kept = 0
        for k, rows in self.data.extra.items():
            record[k] = acc(rows)
        record["seconds"] = self.elapsed()
        res.history.append(record)
        if record["dev_acc"] > res.best_dev_acc:
            res.best_dev_acc, res.best_epoch = record["dev_acc"], epoch + 1
            state = zip(self.names, self.params, strict=True)
            res.best_state = {n: p.detach().cpu().clone() for n, p in state}
        logger.info(
            "muscle_fast: "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        )
        self.epoch_gen_state = self.next_epoch_state
        self.save(epoch + 1, 0)

    def finish(self, t0: float, was_training: bool, load_best: bool) -> TrainResult:
        """The result, with the best state loaded into the model if asked and the model's mode restored."""
        res = self.result
        res.steps = self.global_step
        res.wall_seconds = self.elapsed()
        if load_best and res.best_state:
            _load_trainable(self.core, res.best_state, "the best state")
        self.core.train(was_training)
        return res


def _masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the rows not marked -100, divided by all rows: a left-out row adds
    nothing and the others keep the weight they have in an unfiltered batch."""
    return torch.nn.functional.cross_entropy(
        logits.float(), labels, ignore_index=-100, reduction="sum"
    ) / max(1, labels.numel())


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
