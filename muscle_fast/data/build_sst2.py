"""Rebuild the embedded SST-2 (``sst2.parquet`` + ``sst2.json``) from the released data.

    python -m muscle_fast.data.build_sst2 ../shared/data [--out muscle_fast/data]

The files are read with the very loaders that read ``--data-dir`` folders, so the embedded rows
are those rows by construction. Each distinct file is stored once (dev/test/train-clean are the
same for every attack) as a row range of one table; the text column is dictionary-encoded, which
also stores each sentence once across files, and zstd-compressed. The manifest records every
source file's sha256 and row range, and the data file's sha256 (checked when it is read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from ..backdoor.data import (
    EMBEDDED_MANIFEST,
    OB_FILES,
    OB_TRAIN_FILE,
    SETTINGS,
    find_attack_dirs,
    load_clean_file,
    read_openbackdoor_file,
)
from ..backdoor.dataset import DataError, Row

#: Format version of the embedded copy; bump it when the rows or the layout change.
VERSION = 1
DATA_FILE = "sst2.parquet"
POISON_ROOT = "poison_data/sst-2/1"  # the release's layout: poison_data/<dataset>/<target>/<attack>
CLEAN_ROOT = "clean/sst-2"
#: Per attack, what the loader reads (see ``load_openbackdoor``) plus the clean training set; the
#: release's ``train-poison.csv`` (every row triggered) is left out: nothing reads it.
ATTACK_FILES = ("train-clean.csv", *OB_FILES.values())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_files(shared: Path) -> list[str]:
    """The release's files the embedded copy holds, relative to ``shared`` (``../shared/data``)."""
    out = []
    attacks = find_attack_dirs(shared / POISON_ROOT)
    if not attacks:
        raise DataError(f"{shared / POISON_ROOT}: no attack folders")
    for d in attacks:
        rel = f"{POISON_ROOT}/{d.name}"
        out += [f"{rel}/{name}" for name in ATTACK_FILES]
        for s in SETTINGS:
            for c in sorted((d / s).iterdir()) if (d / s).is_dir() else []:
                if (c / OB_TRAIN_FILE).is_file():
                    out.append(f"{rel}/{s}/{c.name}/{OB_TRAIN_FILE}")
    out += [f"{CLEAN_ROOT}/{split}.tsv" for split in ("train", "dev", "test")]
    return out


def read_source(path: Path) -> tuple[list[Row], list[bool]]:
    """A release file's rows and poison flags, read as ``--data-dir`` reads it."""
    if path.suffix == ".tsv":
        rows = load_clean_file(path)
        return rows, [False] * len(rows)
    return read_openbackdoor_file(path)


def build(shared: Path, out: Path) -> dict[str, Any]:
    """Write ``sst2.parquet`` and ``sst2.json`` under ``out``; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    labels: list[int] = []
    flags: list[bool] = []
    files: dict[str, dict[str, Any]] = {}
    ranges: dict[tuple[tuple[str, int, bool], ...], tuple[int, int]] = {}
    for rel in source_files(shared):
        rows, fl = read_source(shared / rel)
        key = tuple((t, lab, f) for (t, lab), f in zip(rows, fl, strict=True))
        if key not in ranges:  # an identical file (same rows, same order) is stored once
            ranges[key] = (len(texts), len(texts) + len(key))
            texts += [t for t, _, _ in key]
            labels += [lab for _, lab, _ in key]
            flags += [f for _, _, f in key]
        start, stop = ranges[key]
        files[rel] = {"start": start, "stop": stop, "source_sha256": _sha256(shared / rel)}
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.int8()),
            "poison": pa.array(flags, pa.bool_()),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        out / DATA_FILE,
        compression="zstd",
        compression_level=19,
        row_group_size=len(texts),
        dictionary_pagesize_limit=64 << 20,  # one dictionary: each distinct sentence stored once
    )
    attacks = sorted({rel.split("/")[3] for rel in files if rel.startswith(POISON_ROOT + "/")})
    manifest = {
        "name": "sst2",
        "version": VERSION,
        "data_file": DATA_FILE,
        "sha256": _sha256(out / DATA_FILE),
        "rows": len(texts),
        "dataset": "sst-2",
        "target_label": int(POISON_ROOT.rsplit("/", 1)[1]),
        "poison_root": POISON_ROOT,
        "clean_root": CLEAN_ROOT,
        "attacks": attacks,
        "files": files,
    }
    (out / EMBEDDED_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shared", type=Path, help="the release's root: holds poison_data/ and clean/")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="default: this folder")
    args = p.parse_args(argv)
    man = build(args.shared, args.out)
    size = (args.out / DATA_FILE).stat().st_size
    print(f"wrote {args.out / DATA_FILE} ({size:,} bytes, {man['rows']:,} rows, {len(man['files'])} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
