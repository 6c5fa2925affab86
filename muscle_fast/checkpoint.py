"""The training state file of ``train_muscle``: written atomically, refused when it is another run's.

A killed run restarted with the same ``checkpoint_dir`` resumes from this file to the same final
state; a file left by a different run (other data sizes, hyperparameters, world size or trainable
parameters) is an error rather than a silent mix of two runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import FileFormatError
from .fileio import atomic_write

__all__ = ["CKPT", "RUN_KEY_IGNORES", "check_same_run", "load_train_state", "run_key", "save_train_state"]

#: The file name of the training state inside ``TrainConfig.checkpoint_dir``.
CKPT = "train_state.pt"

#: TrainConfig fields that only say how a run is executed or reported: a resumed run may change them.
RUN_KEY_IGNORES = frozenset({"progress", "checkpoint_dir", "checkpoint_every", "backend", "eval_batch_size"})


def run_key(config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """What makes a resumed run the same run: the config's defining fields plus ``extra`` (data sizes...)."""
    key = {k: v for k, v in config.items() if k not in RUN_KEY_IGNORES}
    key.update(extra)
    return key


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path / CKPT`` atomically (a kill mid-write leaves the previous file)."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / CKPT, lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict[str, Any] | None:
    """The state saved in ``path`` (tensors on the CPU), or None when there is none."""
    f = path / CKPT
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated or not a torch file
        raise FileFormatError(
            f"{f} (a training checkpoint) is truncated or corrupt ({type(e).__name__}); "
            "delete it to start the run over"
        ) from None


def check_same_run(
    state: Mapping[str, Any], names: Sequence[str], key: Mapping[str, Any], where: Path
) -> None:
    """Raise ValueError unless ``state`` was written for these trainable ``names`` and this run ``key``."""
    if state["names"] != names:
        raise ValueError(f"train_muscle: checkpoint in {where} is for other trainable parameters")
    saved = state.get("run", {})
    diff = sorted(k for k in key if k in saved and saved[k] != key[k])
    if diff:
        raise ValueError(
            f"train_muscle: checkpoint in {where} was written by another run: "
            + ", ".join(f"{k} {saved[k]!r} there, {key[k]!r} here" for k in diff)
        )
