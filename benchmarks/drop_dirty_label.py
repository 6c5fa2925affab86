"""Write a copy of an OpenBackdoor attack folder whose training file keeps only the clean-label
poison: every poisoned row traced (``poison_separation._source_kinds``) to a clean source row of
another label than the target is dropped; the other files are linked.

Why: StyleBkd and SynBkd poison both labels. Training on this copy measures what the clean-label
half does alone, which no label-based filter (the teacher) can see. Used in
``benchmarks/results/defense-minilm-sst2/README.md``::

    python benchmarks/drop_dirty_label.py --attack-dir ../shared/data/poison_data/sst-2/1/stylebkd \\
        --out runs/clean-label/stylebkd
    muscle-fast defend --data-dir runs/clean-label --attacks stylebkd --methods lora ...
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # poison_separation, beside this script


def main(argv: list[str] | None = None) -> dict[str, int]:
    from poison_separation import _source_kinds

    from muscle_fast.backdoor.data import read_openbackdoor_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attack-dir", required=True, type=Path, help="an OpenBackdoor attack folder")
    ap.add_argument("--setting", default="mix", help="training file setting (default mix)")
    ap.add_argument("--rate", default="0.1", help="training file rate (default 0.1)")
    ap.add_argument("--out", required=True, type=Path, help="the new attack folder (must not exist)")
    a = ap.parse_args(argv)
    src = a.attack_dir / a.setting / a.rate / "train-poison.csv"
    if a.out.exists():
        raise SystemExit(f"--out {a.out} exists; pass a new folder")
    rows, flags = read_openbackdoor_file(src)
    kinds = _source_kinds(str(src), rows, flags)
    if kinds is None:
        raise SystemExit(f"{a.attack_dir} lacks the aligned train-poison.csv / train-clean.csv to trace rows")
    targets = {lab for (_, lab), f in zip(rows, flags, strict=True) if f}
    if len(targets) != 1:
        raise SystemExit(f"the poisoned rows of {src} carry labels {sorted(targets)}, not one target")
    target = str(targets.pop())
    (a.out / a.setting / a.rate).mkdir(parents=True)
    for f in a.attack_dir.glob("*.csv"):
        os.symlink(f.resolve(), a.out / f.name)
    with open(src, newline="") as f:
        reader = csv.reader(f)
        header, lines = next(reader), list(reader)
    if len(lines) != len(rows):
        raise SystemExit(f"{src}: {len(lines)} CSV rows but {len(rows)} records")
    keep = [line for line, k in zip(lines, kinds, strict=True) if k is None or k in (target, "ambiguous")]
    with open(a.out / a.setting / a.rate / "train-poison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(keep)
    counts = {"rows": len(lines), "kept": len(keep), "dirty_label_dropped": len(lines) - len(keep)}
    print(counts)
    return counts


if __name__ == "__main__":
    main()
