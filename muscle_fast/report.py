"""The defense results as a table, a markdown file and a plot (results.md / results.png)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ResultsError
from .experiment import METHODS
from .fileio import write_json, write_text


def model_label(name: str) -> str:
    """A short model name for titles: a hub id as is, a local path by its last two parts."""
    p = Path(name)
    return "/".join(p.parts[-2:]) if p.exists() else name


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the results (rates in percent)."""
    head = (
        "| dataset | attack | method | CACC % (higher is better) | ASR % (lower is better) "
        "| dev CACC % | dev ASR % | best epoch | train s |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['method']} "
            f"| {100 * r['cacc']:.2f} | {100 * r['asr']:.2f} "
            f"| {100 * r['dev_cacc']:.2f} | {100 * r['dev_asr']:.2f} | {r['best_epoch']}/{r['epochs']} "
            f"| {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines)


def results_markdown(records: Sequence[dict[str, Any]], model_name: str) -> str:
    """results.md: what the numbers mean, then the table (readable without the code at hand)."""
    return (
        "# MuScleLoRA defense results\n\n"
        f"Model: `{model_label(model_name)}`. Each method trains on the poisoned training set; "
        "the epoch with the best dev-clean accuracy is kept.\n\n"
        "- **CACC**: accuracy on the clean test set (higher is better).\n"
        "- **ASR**: share of triggered test samples whose true label is not the target that the model "
        "classifies as the target (lower is better).\n"
        "- Methods: "
        + "; ".join(
            f"`{m}` = {spec.doc}" for m, spec in METHODS.items() if any(r["method"] == m for r in records)
        )
        + ".\n\n"
        + results_table(records)
        + "\n"
    )


def results_plot(records: Sequence[dict[str, Any]], path: Path, model_name: str) -> None:
    """Bar chart of test CACC/ASR per method and per-epoch dev curves, one row per (dataset, attack)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .fileio import atomic_write

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["attack"]), []).append(r)
    fig = Figure(figsize=(13, 4.2 * len(groups)))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, ((dataset, attack), recs) in enumerate(groups.items()):
        ax, ax2 = axes[row]
        x = np.arange(len(recs))
        w = 0.38
        b1 = ax.bar(
            x - w / 2, [100 * r["cacc"] for r in recs], w, color="tab:blue", label="CACC (higher is better)"
        )
        b2 = ax.bar(
            x + w / 2, [100 * r["asr"] for r in recs], w, color="tab:red", label="ASR (lower is better)"
        )
        ax.bar_label(b1, fmt="%.1f", fontsize=8)
        ax.bar_label(b2, fmt="%.1f", fontsize=8)
        ax.set_xticks(x, [r["method"] for r in recs])
        ax.set_ylim(0, 118)
        ax.set_ylabel("% of test samples")
        ax.set_title(f"{dataset} / {attack}: test set, selected checkpoint")
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        for i, r in enumerate(recs):
            c = r["curves"]
            color = f"C{i}"
            ax2.plot(
                c["epoch"], [100 * v for v in c["dev_cacc"]], "-o", color=color, label=f"{r['method']} CACC"
            )
            ax2.plot(
                c["epoch"], [100 * v for v in c["dev_asr"]], "--x", color=color, label=f"{r['method']} ASR"
            )
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        last = max((max(r["curves"]["epoch"], default=1) for r in recs), default=1)
        ax2.set_xlim(0.5, last + 0.5)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("% of dev samples")
        ax2.set_ylim(-3, 103)
        ax2.set_title(f"{dataset} / {attack}: dev per epoch (solid CACC, dashed ASR)")
        ax2.legend(fontsize=7, ncols=2)
    fig.suptitle(f"MuScleLoRA defense: {model_label(model_name)}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)


def write_results(out: Path, records: Sequence[dict[str, Any]], model_name: str) -> None:
    """results.json, results.md and results.png in ``out``, each written atomically."""
    write_json(out / "results.json", list(records))
    write_text(out / "results.md", results_markdown(records, model_name))
    results_plot(records, out / "results.png", model_name)


#: Keys every record needs for the table and the plot.
RECORD_KEYS = (
    "dataset", "attack", "method", "cacc", "asr", "dev_cacc", "dev_asr", "best_epoch", "epochs",
    "wall_seconds", "curves",
)  # fmt: skip


def merge_records(files: Sequence[Path]) -> list[dict[str, Any]]:
    """The records of several results.json files (runs split across processes), checked and ordered.

    A (dataset, attack, method) present twice is an error: which run counts must be explicit.
    Every problem with a file is a ResultsError naming it.
    """
    import json

    seen: dict[tuple[str, str, str], Path] = {}
    records: list[dict[str, Any]] = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise ResultsError(f"{f} does not exist") from None
        except json.JSONDecodeError as e:
            raise ResultsError(f"{f} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise ResultsError(f"{f}: expected a JSON list of records (defend's results.json)")
        for i, r in enumerate(data):
            missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
            if missing:
                raise ResultsError(f"{f}: record {i} lacks {missing}")
            key = (r["dataset"], r["attack"], r["method"])
            if key in seen:
                raise ResultsError(f"{'/'.join(key)} is in both {seen[key]} and {f}")
            seen[key] = Path(f)
            records.append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["dataset"], r["attack"], order.get(r["method"], len(order))))
    return records
