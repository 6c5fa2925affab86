"""Side-by-side Fourier curves of several runs (``muscle-fast fourier`` outputs), plus a numeric summary.

    python benchmarks/fourier_compare.py OUT.png RUN_DIR [RUN_DIR ...]

One column per run, one row per width: low-frequency error e_low of the clean and the backdoor
mapping against the training step. Prints, per run and width, e_low at the first record and the
step at which it first falls to half of that, for dev-clean and dev-poison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def half_time(steps: list[int], vals: list[float | None]) -> int | None:
    """First step at which the series reaches half its first value (None if it never does)."""
    first = vals[0]
    if first is None:
        return None
    for s, v in zip(steps, vals, strict=True):
        if v is not None and v <= first / 2:
            return s
    return None


def summary(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, per in run["series"].items():
        for delta, m in per.items():
            e = m["e_low"]
            rows.append(
                {
                    "set": name,
                    "delta": float(delta),
                    "e_low_first": e[0],
                    "e_low_last": e[-1],
                    "half_step": half_time(run["steps"], e),
                }
            )
    return rows


def main() -> None:
    from matplotlib.figure import Figure

    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    runs = [json.loads((d / "fourier.json").read_text()) for d in dirs]
    deltas = [str(d) for d in runs[0]["deltas"]]
    fig = Figure(figsize=(5 * len(runs), 3.2 * len(deltas)))
    axes = fig.subplots(len(deltas), len(runs), squeeze=False, sharey=True)
    colours = {"dev_clean": "tab:blue", "dev_poison": "tab:red"}
    for j, (d, run) in enumerate(zip(dirs, runs, strict=True)):
        method = run["meta"].get("method", d.name)
        cacc, asr = run["meta"].get("cacc"), run["meta"].get("asr")
        for i, delta in enumerate(deltas):
            ax = axes[i][j]
            for name, per in run["series"].items():
                key = delta if delta in per else next(iter(per))
                ax.plot(
                    run["steps"],
                    per[key]["e_low"],
                    color=colours.get(name, "k"),
                    marker=".",
                    label=f"{name.replace('dev_', '')} mapping",
                )
            head = f"{method}" + (f" (test CACC {cacc:.3f}, ASR {asr:.3f})" if cacc is not None else "")
            ax.set_title(f"{head}\nwidth {float(delta):g}", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("low-frequency error e_low")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Low-frequency error of the clean vs the backdoor mapping during training", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    for d, run in zip(dirs, runs, strict=True):
        for r in summary(run):
            print(
                f"{d.name:>10} {r['set']:>10} delta {r['delta']:>5g}: e_low {r['e_low_first']:.3f} -> "
                f"{r['e_low_last']:.3f}, half at step {r['half_step']}"
            )


if __name__ == "__main__":
    main()
