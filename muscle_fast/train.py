"""The paper's training loop: AdamW, linear schedule, gradient alignment, clip 1.0, step (SPEC §4).

``train_muscle`` trains any model whose trainable parameters are set (a patched
MuScleLoRA model, a LoRA-only one, or a fully trainable one for the undefended
baseline), selects the epoch with the best dev accuracy, and checkpoints
atomically so a killed run resumes to the same state. Under torch.distributed
each rank takes its slice of every global batch and reference gradients are
averaged across ranks before alignment, so N ranks with batch B equal one
process with batch N*B.
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
import torch.distributed as dist
from torch import nn

from .config import model_family
from .dual import default_loss, dual_gradients, trainable_params
from .fileio import atomic_write

logger = logging.getLogger("muscle_fast")

Row = tuple[str, int]
StepCallback = Callable[[int, nn.Module], None]


#: Accepted Python types per TrainConfig annotation (a bool is not an int here; an int is a float).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "float": (int, float),
    "int": (int,),
    "bool": (bool,),
    "str": (str,),
    "str | None": (str, os.PathLike, type(None)),
    "bool | None": (bool, type(None)),
}


@dataclass
class TrainConfig:
    """Hyperparameters of one run; ``for_model`` fills the paper's defaults for the family."""

    lr: float = 2e-5
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    seed: int = 42
    align: bool = True  # gradient alignment on (MuScleLoRA) or off (baselines)
    min_ref_grad_norm: float = 5e-7
    min_ref_loss: float = 0.4
    max_raw_grad_ratio: float = 0.1
    ga_epoch: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    single_pass: bool | None = None  # None: single pass when every trainable param is in a MuScleLinear
    backend: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    progress: bool = True

    def __post_init__(self) -> None:
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

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> TrainConfig:
        fam = model_family(model)
        base: dict[str, Any] = fam.train_kwargs() if fam is not None else {}
        base.update(overrides)
        return cls(**base)


@dataclass
class TrainResult:
    best_epoch: int
    best_dev_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    wall_seconds: float = 0.0
    steps: int = 0
    skipped_steps: int = 0


# ---------------------------------------------------------------------------------------------- data


def as_rows(rows: Sequence[Any], what: str) -> list[Row]:
    """Accept (text, label) pairs or dicts with text/sentence and label."""
    out: list[Row] = []
    for i, r in enumerate(rows):
        if isinstance(r, Mapping):
            text = r.get("text", r.get("sentence"))
            label = r.get("label")
        else:
            text, label = r[0], r[1]
        if not isinstance(text, str) or label is None:
            raise ValueError(f"{what}: row {i} has no text/label: {r!r}")
        out.append((text, int(label)))
    return out


def encode(
    tokenizer: Any, rows: Sequence[Row], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {k: v.to(device) for k, v in enc.items()}
    batch["labels"] = torch.tensor([lab for _, lab in rows], dtype=torch.long, device=device)
    return batch


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def supports_checkpointing(model: nn.Module) -> bool:
    """Whether ``set_activation_checkpointing(model, True)`` can work (transformers' flag)."""
    return bool(getattr(_unwrap(model), "supports_gradient_checkpointing", False))


def set_activation_checkpointing(model: nn.Module, enabled: bool, reentrant: bool = False) -> None:
    """Per-layer activation (gradient) checkpointing on or off (non-reentrant unless asked).

    How a 7B model's activations fit: each decoder layer keeps only its input and is recomputed in
    backward (MuScleLinear and the single-pass reference split are recompute-safe; tested bit for
    bit). Uses transformers' ``activation_checkpointing_*`` where it exists, else the older
    ``gradient_checkpointing_*`` names; a model without support is a ValueError naming it.
    """
    core = _unwrap(model)
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


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer: Any, rows: Sequence[Row], batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Predicted labels for ``rows`` (eval mode for the call, the previous mode restored)."""
    core = _unwrap(model)
    was = core.training
    core.eval()
    device = next(core.parameters()).device
    preds = []
    try:
        for i in range(0, len(rows), batch_size):
            batch = encode(tokenizer, rows[i : i + batch_size], max_length, device)
            batch.pop("labels")
            preds.append(core(**batch).logits.argmax(-1).cpu())
    finally:
        core.train(was)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module, tokenizer: Any, rows: Sequence[Row], batch_size: int = 64, max_length: int = 128
) -> float:
    """Share of rows predicted as their label (on a poisoned set labelled with the target: the ASR)."""
    if not rows:
        raise ValueError("accuracy: empty evaluation set")
    pred = predict(model, tokenizer, rows, batch_size, max_length)
    gold = torch.tensor([lab for _, lab in rows])
    return float((pred == gold).float().mean())


# ---------------------------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(idx: Sequence[int], rank: int, nranks: int) -> tuple[list[int], float]:
    """This rank's rows of a global batch and the factor its mean loss is scaled by.

    Rows are dealt round-robin. DDP (and ``average_across_ranks``) take the plain mean of the
    ranks' gradients, which is the mean over the global batch only if every rank has as many
    rows; the last batch of an epoch need not split evenly, so each rank's loss is scaled by
    ``nranks * (its rows / all rows)``. A rank left with no row still has to take part in the
    collectives: it runs the batch's first row with scale 0.
    """
    if nranks == 1:
        return list(idx), 1.0
    mine = list(idx[rank::nranks])
    if not mine:
        return [idx[0]], 0.0
    return mine, nranks * len(mine) / len(idx)


def average_across_ranks(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Mean of each tensor over ranks, in one all-reduce of a flat buffer (no-op on one process)."""
    _, n = world()
    if n == 1:
        return list(tensors)
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).float() for t in present])
    dist.all_reduce(flat)
    flat /= n
    out: list[torch.Tensor | None] = []
    off = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[off : off + t.numel()].view_as(t).to(t.dtype))
        off += t.numel()
    return out


# ---------------------------------------------------------------------------------------------- checkpoints

CKPT = "train_state.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / CKPT, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    f = path / CKPT
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)


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
) -> TrainResult:
    """Train ``model`` (its trainable parameters) on ``train_rows``; align with ``ref_rows`` if configured.

    Selects the epoch with the best accuracy on ``dev_rows``; ``eval_sets`` (for example a
    dev-poison set, whose accuracy is the ASR) are evaluated each epoch into the history.
    The best trainable state is loaded into the model at the end and returned.
    ``stop_after_steps`` ends the run early (as a kill would) after that many global steps,
    once the checkpoint for that step is written.
    """
    from tqdm.auto import tqdm

    from .align import GradientAligner

    cfg = config or TrainConfig.for_model(_unwrap(model))
    core = _unwrap(model)
    train = as_rows(train_rows, "train_rows")
    ref = as_rows(ref_rows, "ref_rows")
    dev = as_rows(dev_rows, "dev_rows")
    extra = {k: as_rows(v, f"eval_sets[{k!r}]") for k, v in (eval_sets or {}).items()}
    if not train:
        raise ValueError("train_muscle: the training set is empty")
    if not dev:
        raise ValueError("train_muscle: the dev set is empty (needed for model selection)")
    if cfg.align and not ref:
        raise ValueError("train_muscle: gradient alignment needs a non-empty reference set (ref_rows)")
    num_labels = getattr(core.config, "num_labels", None)
    for name, rows in (("train_rows", train), ("ref_rows", ref), ("dev_rows", dev)):
        bad = [lab for _, lab in rows if num_labels is not None and not 0 <= lab < num_labels]
        if bad:
            raise ValueError(
                f"train_muscle: {name} has labels outside [0, {num_labels}): {sorted(set(bad))[:5]}"
            )

    rank, nranks = world()
    device = next(core.parameters()).device
    params = trainable_params(core)
    if not params:
        raise ValueError("train_muscle: the model has no trainable parameters")
    names = [n for n, p in core.named_parameters() if p.requires_grad]
    global_bs = cfg.batch_size * nranks
    steps_per_epoch = math.ceil(len(train) / global_bs)
    total_steps = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    aligner = (
        GradientAligner(
            params,
            cfg.min_ref_grad_norm,
            cfg.min_ref_loss,
            cfg.max_raw_grad_ratio,
            cfg.ga_epoch,
            cfg.epochs,
            backend=cfg.backend,
        )
        if cfg.align
        else None
    )
    data_gen = torch.Generator().manual_seed(cfg.seed)
    ref_gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed)

    result = TrainResult(best_epoch=-1, best_dev_acc=-1.0)
    start_epoch, start_step, global_step = 0, 0, 0
    resumed_losses: list[float] = []
    epoch_gen_state = data_gen.get_state()
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    # what makes a resumed run the same run (the rest only says how it is run or reported)
    how = {"progress", "checkpoint_dir", "checkpoint_every", "backend", "eval_batch_size"}
    run_key = {k: v for k, v in config_dict(cfg).items() if k not in how}
    run_key.update(world_size=nranks, train_rows=len(train), ref_rows=len(ref))
    if ckpt_dir is not None:
        st = _load_checkpoint(ckpt_dir)
        if st is not None:
            if st["names"] != names:
                raise ValueError(f"train_muscle: checkpoint in {ckpt_dir} is for other trainable parameters")
            saved = st.get("run", {})
            diff = sorted(k for k in run_key if k in saved and saved[k] != run_key[k])
            if diff:
                raise ValueError(
                    f"train_muscle: checkpoint in {ckpt_dir} was written by another run: "
                    + ", ".join(f"{k} {saved[k]!r} there, {run_key[k]!r} here" for k in diff)
                )
            with torch.no_grad():
                for p, v in zip(params, st["params"], strict=True):
                    p.copy_(v)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            ref_gen.set_state(st["ref_gen"])
            epoch_gen_state = st["epoch_gen"]
            torch.set_rng_state(st["torch_rng"])
            start_epoch, start_step, global_step = st["epoch"], st["step_in_epoch"], st["global_step"]
            result.history = list(st["history"])
            result.best_epoch, result.best_dev_acc = st["best_epoch"], st["best_dev_acc"]
            result.best_state = dict(zip(names, st["best_params"], strict=True)) if st["best_params"] else {}
            result.skipped_steps = st["skipped_steps"]
            resumed_losses = list(st.get("epoch_losses", []))
            logger.info(f"muscle_fast: resumed from {ckpt_dir} at epoch {start_epoch}, step {start_step}")

    def checkpoint(epoch: int, step_in_epoch: int, epoch_losses: Sequence[float] = ()) -> None:
        if ckpt_dir is None or rank != 0:
            return
        best = [result.best_state[n] for n in names] if result.best_state else []
        _save_checkpoint(
            ckpt_dir,
            {
                "names": names,
                "run": run_key,
                "params": [p.detach().cpu() for p in params],
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "ref_gen": ref_gen.get_state(),
                "epoch_gen": epoch_gen_state,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "history": result.history,
                "epoch_losses": list(epoch_losses),  # so a resumed epoch reports its whole mean loss
                "best_epoch": result.best_epoch,
                "best_dev_acc": result.best_dev_acc,
                "best_params": best,
                "skipped_steps": result.skipped_steps,
            },
        )

    t0 = time.perf_counter()
    was_training = core.training
    for epoch in range(start_epoch, cfg.epochs):
        data_gen.set_state(epoch_gen_state)
        perm = torch.randperm(len(train), generator=data_gen).tolist()
        next_epoch_state = data_gen.get_state()
        model.train()
        first = start_step if epoch == start_epoch else 0
        losses: list[float] = list(resumed_losses) if first else []
        bar = tqdm(
            range(first, steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            leave=False,
        )
        for step in bar:
            idx = perm[step * global_bs : (step + 1) * global_bs]
            mine, share = rank_share(idx, rank, nranks)
            batch = encode(tokenizer, [train[i] for i in mine], cfg.max_length, device)
            if aligner is not None:
                ridx = torch.randint(len(ref), (len(idx),), generator=ref_gen).tolist()
                rmine, _ = rank_share(ridx, rank, nranks)
                ref_batch = encode(tokenizer, [ref[i] for i in rmine], cfg.max_length, device)
                loss, ref_loss, ref_grads = dual_gradients(
                    model, batch, ref_batch, params=params, single_pass=cfg.single_pass, loss_scale=share
                )
                *ref_grads, ref_loss = average_across_ranks([*ref_grads, ref_loss * share])
                stats = aligner.align(ref_grads, ref_loss, epoch)
                bad_step = bool(stats.nonfinite_grad > 0)
            else:
                opt.zero_grad(set_to_none=True)
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = default_loss(model(**inputs).logits, batch["labels"])
                (loss * share).backward()
                bad_step = False
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if bad_step or not torch.isfinite(norm):
                result.skipped_steps += 1  # never write NaN into the parameters
                if result.skipped_steps == 1:
                    logger.warning("muscle_fast: non-finite gradient, optimizer step skipped")
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            global_step += 1
            if step_callback is not None:
                step_callback(global_step, core)
            if (
                cfg.checkpoint_every
                and global_step % cfg.checkpoint_every == 0
                and step + 1 < steps_per_epoch
            ):
                checkpoint(epoch, step + 1, losses)
            if stop_after_steps is not None and global_step >= stop_after_steps:
                checkpoint(epoch, step + 1, losses)
                result.steps = global_step
                result.wall_seconds = time.perf_counter() - t0
                core.train(was_training)
                return result
        # end of epoch: evaluate, select, checkpoint
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(1, len(losses)),
            "dev_acc": accuracy(model, tokenizer, dev, cfg.eval_batch_size, cfg.max_length),
        }
        for k, rows in extra.items():
            record[k] = accuracy(model, tokenizer, rows, cfg.eval_batch_size, cfg.max_length)
        record["seconds"] = time.perf_counter() - t0
        result.history.append(record)
        if record["dev_acc"] > result.best_dev_acc:
            result.best_dev_acc, result.best_epoch = record["dev_acc"], epoch + 1
            result.best_state = {n: p.detach().cpu().clone() for n, p in zip(names, params, strict=True)}
        logger.info(
            "muscle_fast: "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        )
        epoch_gen_state = next_epoch_state
        checkpoint(epoch + 1, 0)
    result.steps = global_step
    result.wall_seconds = time.perf_counter() - t0
    if result.best_state:
        with torch.no_grad():
            for n, p in zip(names, params, strict=True):
                p.copy_(result.best_state[n])
    core.train(was_training)
    return result


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a ``TrainResult.best_state`` back into a model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
