"""``muscle-fast demo``: the defense shown end to end in minutes on a laptop CPU.

Vanilla fine-tuning and MuScleLoRA train on a seeded subsample of the BadNets-poisoned SST-2 shipped
with the package (the poison share kept), with the ``minilm-sst2-demo`` preset: settings picked on
dev numbers so that both methods reach a useful clean accuracy in a few epochs of a few thousand rows.
The full protocol is ``muscle-fast defend``; the demo is a subsample of it, run by the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .experiment import DefendResult, RunSpec, run_defend

__all__ = ["DEMO_PRESET", "DemoSettings", "demo_spec", "run_demo", "verdict"]

#: The built-in preset the demo trains with (``muscle_fast/presets/<name>.json``).
DEMO_PRESET = "minilm-sst2-demo"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs: one attack, the undefended baseline and the defense, subsampled."""

    attack: str = "badnets"
    methods: tuple[str, ...] = ("vanilla", "muscle")
    max_train_rows: int = 2000  #: of 6,920 poisoned training rows (10 % poisoned, share kept)
    max_eval_rows: int = 600  #: per dev/test split


DEMO = DemoSettings()


def demo_spec(
    out: str | Path, *, device: str = "auto", progress: bool = True, settings: DemoSettings = DEMO
) -> RunSpec:
    """The RunSpec of the demo: the default model and the embedded data (no download)."""
    return RunSpec(
        out=out,
        methods=settings.methods,
        preset=DEMO_PRESET,
        attacks=settings.attack,
        max_train_rows=settings.max_train_rows,
        max_eval_rows=settings.max_eval_rows,
        device=device,
        progress=progress,
    )


def verdict(records: Sequence[dict[str, Any]]) -> str:
    """One line per attack comparing MuScleLoRA with vanilla fine-tuning on test CACC and ASR."""
    by = {(r["attack"], r["method"]): r for r in records}
    lines = []
    for attack in sorted({a for a, _ in by}):
        base, ours = by.get((attack, "vanilla")), by.get((attack, "muscle"))
        if base is None or ours is None:
            continue
        drop = 100 * (base["asr"] - ours["asr"])
        lines.append(
            f"{attack}: vanilla fine-tuning {100 * base['cacc']:.1f} % CACC, {100 * base['asr']:.1f} % ASR; "
            f"MuScleLoRA {100 * ours['cacc']:.1f} % CACC, {100 * ours['asr']:.1f} % ASR "
            f"({abs(drop):.1f} ASR points {'lower' if drop >= 0 else 'higher'})"
        )
    return "\n".join(lines)


def run_demo(out: str | Path, *, device: str = "auto", progress: bool = True) -> DefendResult:
    """Run the demo into ``out`` (results.json/md/png and the two checkpoints, as ``defend`` writes)."""
    return run_defend(demo_spec(out, device=device, progress=progress))
