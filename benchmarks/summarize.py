"""Ratios from a pytest-benchmark JSON: each implementation's time over the baseline of the same shape.

    python benchmarks/summarize.py results.json [--baseline base] [--stat median]

Benchmarks record ``impl``, ``mode`` and their shape in ``extra_info``; rows with the same shape
and mode are compared with the baseline impl measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any


def ratios(data: dict[str, Any], baseline: str = "base", stat: str = "median") -> list[dict[str, Any]]:
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        impl = info.pop("impl", None)
        if impl is None:
            continue
        info.pop("peak_mem_bytes", None)
        info.pop("picked", None)  # what "auto" measured faster (printed apart): not part of the shape
        key = tuple(sorted((k, str(v)) for k, v in info.items()))
        groups[key][impl] = b["stats"][stat]
    rows = []
    for key, times in groups.items():
        if baseline not in times:
            continue
        base = times[baseline]
        for impl, t in sorted(times.items()):
            rows.append({**dict(key), "impl": impl, "seconds": t, f"x_{baseline}": t / base})
    return rows


def picks(data: dict[str, Any]) -> list[str]:
    """One line per op and key of what ``backend="auto"`` chose (``extra_info["picked"]``), with times."""
    seen: dict[tuple, str] = {}
    for b in data["benchmarks"]:
        for op, rows in (b.get("extra_info", {}).get("picked") or {}).items():
            for r in rows:
                ms = r.get("ms") or {}
                times = ", ".join(f"{k} {1e3 * v:.1f} us" for k, v in ms.items())
                seen[(op, tuple(r["key"]))] = f"{op} {' '.join(r['key'])}: {r['chosen']}" + (
                    f" ({times})" if times else ""
                )
    return list(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json")
    p.add_argument("--baseline", default="base")
    p.add_argument("--stat", default="median")
    args = p.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    rows = ratios(data, args.baseline, args.stat)
    if not rows:
        print("no rows with extra_info['impl'] and the baseline")
        return
    cols = [c for c in rows[0] if c not in ("seconds",)]
    print(" | ".join(cols + ["ms"]))
    for r in rows:
        print(
            " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
            + f" | {1e3 * r['seconds']:.2f}"
        )
    chosen = picks(data)
    if chosen:
        print("backend auto chose:")
        print("\n".join(f"  {line}" for line in chosen))


if __name__ == "__main__":
    main()
