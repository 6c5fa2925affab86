"""Load backdoor-poisoned and clean text classification data into one structure (SPEC §5).

Sources: OpenBackdoor-format attack folders (CSV header ``,0,1,2``: index, text, label,
poison_label), a folder of such attack folders, clean TSV/CSV sets (``sentence``/``label``)
that are poisoned here, or SST-2 from the Hugging Face hub. Files are read through the
``datasets`` library (imported lazily: it is an optional dependency). Every bad input is a
``DataError`` whose message names the folder, file or column, so the CLI can print it as is.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEED
from .dataset import SETTINGS, SPLITS, BackdoorDataset, DataError, Row, infer_num_labels
from .poison import POISONERS, make_poisoned

# SETTINGS, SPLITS, BackdoorDataset, DataError and Row live in .dataset and stay importable from here
__all__ = [
    "CLEAN_SPLIT_FILES",
    "DEFAULT_RATE",
    "HUB_SST2",
    "OB_COLUMNS",
    "OB_FILES",
    "OB_TRAIN_FILE",
    "SETTINGS",
    "SPLITS",
    "BackdoorDataset",
    "DataError",
    "Row",
    "find_attack_dirs",
    "is_attack_dir",
    "is_clean_dir",
    "load_backdoor_sets",
    "load_clean_dir",
    "load_clean_file",
    "load_hub_sst2",
    "load_openbackdoor",
    "parse_attacks",
    "read_openbackdoor_file",
    "resolve_train_file",
]

logger = logging.getLogger("muscle_fast")

DEFAULT_RATE = 0.1

OB_FILES = {
    "dev_clean": "dev-clean.csv",
    "dev_poison": "dev-poison.csv",
    "test_clean": "test-clean.csv",
    "test_poison": "test-poison.csv",
}
OB_TRAIN_FILE = "train-poison.csv"
OB_COLUMNS = {"text": "0", "label": "1", "poison_label": "2"}
_OB_MARKERS = ("dev-clean.csv", "test-clean.csv", "test-poison.csv", "train-clean.csv")
CLEAN_SPLIT_FILES = {
    "train": ("train.tsv", "train.csv"),
    "dev": ("dev.tsv", "dev.csv", "validation.tsv", "validation.csv"),
    "test": ("test.tsv", "test.csv"),
}
HUB_SST2 = "SetFit/sst2"  # the OpenBackdoor split of SST-2: 6,920 / 872 / 1,821 rows


# ---------------------------------------------------------------------------------------------- files


def _read_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Column names and string columns of a CSV/TSV file, read through ``datasets``."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading data needs the `datasets` package: pip install 'muscle-fast[demo]'"
        ) from None
    tsv = path.suffix.lower() == ".tsv"
    fmt: dict[str, Any] = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, **fmt)
            header = next(reader, None)
            has_rows = any(any(cell.strip() for cell in rec) for rec in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not header:
        raise DataError(f"{path}: empty file (no header row)")
    # every column as a string (a text column of digits must stay text); labels are parsed here
    names = [h if h else f"_column{i}" for i, h in enumerate(header)]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names in the header {header}")
    if not has_rows:
        return names, {n: [] for n in names}
    kwargs: dict[str, Any] = dict(
        column_names=names,
        header=0,
        features=datasets.Features({n: datasets.Value("string") for n in names}),
        keep_default_na=False,
        keep_in_memory=True,
    )
    if tsv:
        kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)  # SST-2 TSVs contain bare quote characters
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_csv(str(path), **kwargs)
    except Exception as e:  # pandas parser errors, an empty file, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {path}: {msg}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return list(ds.column_names), ds.to_dict()


def _int_column(values: Sequence[Any], path: Path, column: str, what: str) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
            if not f.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: column {column!r} ({what}) has a non-integer value {v!r} in data row {i + 1}"
            ) from None
        out.append(int(f))
    return out


def _need(columns: Sequence[str], path: Path, wanted: str, what: str) -> None:
    if wanted not in columns:
        raise DataError(f"{path}: missing column {wanted!r} ({what}); found columns {list(columns)}")


def read_openbackdoor_file(path: str | Path) -> tuple[list[Row], list[bool]]:
    """Rows and poison flags of one OpenBackdoor CSV (header ``,0,1,2``)."""
    path = Path(path)
    cols, data = _read_table(path)
    for key, col in OB_COLUMNS.items():
        _need(cols, path, col, key)
    texts = [t if t is not None else "" for t in data[OB_COLUMNS["text"]]]
    labels = _int_column(data[OB_COLUMNS["label"]], path, OB_COLUMNS["label"], "label")
    flags = _int_column(data[OB_COLUMNS["poison_label"]], path, OB_COLUMNS["poison_label"], "poison_label")
    bad = sorted({f for f in flags if f not in (0, 1)})
    if bad:
        raise DataError(f"{path}: column '2' (poison_label) must be 0 or 1, found {bad[:5]}")
    if not texts:
        raise DataError(f"{path}: no data rows (empty split)")
    return list(zip(texts, labels, strict=True)), [bool(f) for f in flags]


def load_clean_file(path: str | Path) -> list[Row]:
    """(text, label) rows of a clean TSV/CSV with a ``sentence`` (or ``text``) and a ``label`` column."""
    path = Path(path)
    cols, data = _read_table(path)
    text_col = next((c for c in ("sentence", "text") if c in cols), None)
    if text_col is None:
        raise DataError(f"{path}: missing column 'sentence' (the text; 'text' also works); found {cols}")
    _need(cols, path, "label", "label")
    labels = _int_column(data["label"], path, "label", "label")
    if not labels:
        raise DataError(f"{path}: no data rows (empty split)")
    texts = [t if t is not None else "" for t in data[text_col]]
    return list(zip(texts, labels, strict=True))


def _check_labels(rows: Sequence[Row], num_labels: int, where: str) -> None:
    bad = sorted({lab for _, lab in rows if not 0 <= lab < num_labels})
    if bad:
        raise DataError(f"{where}: labels {bad[:5]} are outside the {num_labels} classes [0, {num_labels})")


def _dataset_name(attack_dir: Path) -> str:
    """OpenBackdoor keeps ``poison_data/<dataset>/<target>/<attack>``; else the parent's name."""
    parent = attack_dir.resolve().parent
    if parent.name.isdigit() and parent.parent.name:
        return parent.parent.name
    return parent.name or "data"


def is_attack_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in _OB_MARKERS)


def is_clean_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in CLEAN_SPLIT_FILES["train"])


def find_attack_dirs(path: str | Path) -> list[Path]:
    """Attack folders directly inside ``path`` (sorted by name)."""
    p = Path(path)
    return sorted(c for c in p.iterdir() if is_attack_dir(c)) if p.is_dir() else []


def _available_train_files(attack_dir: Path) -> list[str]:
    out = []
    for setting in SETTINGS:
        d = attack_dir / setting
        if d.is_dir():
            out += [f"{setting}/{c.name}" for c in sorted(d.iterdir()) if (c / OB_TRAIN_FILE).is_file()]
    return out


def _rate_matches(name: str, rate: float) -> bool:
    try:
        return math.isclose(float(name), rate, rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def resolve_train_file(
    attack_dir: str | Path, setting: str | None = None, rate: float | None = None
) -> tuple[Path, str, float]:
    """The poisoned training file ``<setting>/<rate>/train-poison.csv`` and its setting and rate.

    With no setting, the first of clean / mix / dirty that exists at the rate (default 0.1)
    wins; an explicit setting or rate narrows the search.
    """
    d = Path(attack_dir)
    if setting is not None and setting not in SETTINGS:
        raise DataError(f"unknown poison setting {setting!r}; settings: {list(SETTINGS)}")
    want_rate = DEFAULT_RATE if rate is None else float(rate)
    settings = [setting] if setting is not None else list(SETTINGS)
    tried = []
    for s in settings:
        sd = d / s
        for c in sorted(sd.iterdir()) if sd.is_dir() else []:
            if _rate_matches(c.name, want_rate) and (c / OB_TRAIN_FILE).is_file():
                return c / OB_TRAIN_FILE, s, want_rate
        tried.append(f"{s}/{want_rate:g}/{OB_TRAIN_FILE}")
    avail = _available_train_files(d)
    raise DataError(
        f"{d}: missing poisoned training file (looked for {', '.join(tried)}); "
        f"available: {', '.join(avail) if avail else 'none'}"
        + ("; pass --poison-setting/--poison-rate to pick one" if avail else "")
    )


def _infer_target(
    train: Sequence[Row], flags: Sequence[bool], test_poison: Sequence[Row], attack_dir: Path
) -> int:
    poisoned = {lab for (_, lab), f in zip(train, flags, strict=True) if f}
    if len(poisoned) == 1:
        return poisoned.pop()
    tp = {lab for _, lab in test_poison}
    if len(tp) == 1:
        return tp.pop()
    if attack_dir.resolve().parent.name.isdigit():
        return int(attack_dir.resolve().parent.name)
    raise DataError(f"{attack_dir}: cannot tell the target label from the data; pass --target-label")


def _poison_eval_rows(
    rows: list[Row], flags: list[bool], target: int, path: Path
) -> tuple[list[Row], list[bool]]:
    """Only triggered non-target rows, labelled with the target (SPEC §5 ASR).

    OpenBackdoor files already hold exactly those (every label is the target). A file that
    keeps the original labels instead has its target-label rows dropped; rows flagged as
    not poisoned carry no trigger and are dropped too.
    """
    keep = [r for r, f in zip(rows, flags, strict=True) if f]
    dropped_clean = len(rows) - len(keep)
    if any(lab != target for _, lab in keep):
        n = len(keep)
        keep = [r for r in keep if r[1] != target]
        logger.info(f"muscle_fast: {path}: dropped {n - len(keep)} rows whose original label is the target")
    if dropped_clean:
        logger.info(f"muscle_fast: {path}: dropped {dropped_clean} rows not flagged as poisoned")
    if not keep:
        raise DataError(f"{path}: no triggered non-target rows left (empty split)")
    return [(t, target) for t, _ in keep], [True] * len(keep)


def load_openbackdoor(
    attack_dir: str | Path,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    dataset: str | None = None,
) -> BackdoorDataset:
    """Load one OpenBackdoor attack folder (training file chosen by ``resolve_train_file``).

    ``num_labels`` defaults to the largest label seen + 1 (at least 2); the target label is
    read from the poisoned rows when not given.
    """
    d = Path(attack_dir)
    if not d.is_dir():
        raise DataError(f"data folder {d} does not exist")
    for name in OB_FILES.values():
        if not (d / name).is_file():
            raise DataError(f"{d}: missing file {name}")
    train_path, setting, rate = resolve_train_file(d, setting, rate)
    paths = {"train": train_path, **{k: d / v for k, v in OB_FILES.items()}}
    loaded = {k: read_openbackdoor_file(p) for k, p in paths.items()}
    train, train_flags = loaded["train"]
    if target_label is None:
        target = _infer_target(train, train_flags, loaded["test_poison"][0], d)
    else:
        target = int(target_label)
        # the poisoned training rows carry the attack's target (dirty- and clean-label alike); another
        # --target-label would silently relabel the poison sets and measure a meaningless ASR
        poisoned = {lab for (_, lab), f in zip(train, train_flags, strict=True) if f}
        if len(poisoned) == 1 and target not in poisoned:
            raise DataError(
                f"{train_path}: every poisoned training row has label {poisoned.pop()}, the attack's "
                f"target, but the target label given is {target}"
            )
    if num_labels is None:
        evals = [loaded[k][0] for k in ("dev_clean", "test_clean")]
        num_labels = infer_num_labels(train, str(train_path), evals, target)
    for k in ("train", "dev_clean", "test_clean"):
        _check_labels(loaded[k][0], num_labels, str(paths[k]))
    for k in ("dev_poison", "test_poison"):
        _check_labels(loaded[k][0], num_labels, str(paths[k]))
        loaded[k] = _poison_eval_rows(*loaded[k], target, paths[k])
    ds = BackdoorDataset(
        dataset=dataset or _dataset_name(d),
        attack=d.name,
        target_label=target,
        num_labels=num_labels,
        train=train,
        dev_clean=loaded["dev_clean"][0],
        dev_poison=loaded["dev_poison"][0],
        test_clean=loaded["test_clean"][0],
        test_poison=loaded["test_poison"][0],
        poison_flags={k: v[1] for k, v in loaded.items()},
        setting=setting,
        rate=rate,
        source=str(d),
        sources={k: str(p) for k, p in paths.items()},
    )
    return ds.validate()


def load_clean_dir(data_dir: str | Path) -> dict[str, list[Row]]:
    """The train / dev / test splits of a clean dataset folder (``train.tsv`` or ``train.csv``, ...)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data folder {d} does not exist")
    out = {}
    for split, names in CLEAN_SPLIT_FILES.items():
        path = next((d / n for n in names if (d / n).is_file()), None)
        if path is None:
            raise DataError(f"{d}: missing file {' or '.join(names)}")
        out[split] = load_clean_file(path)
    return out


def load_hub_sst2(cache_dir: str | None = None) -> dict[str, list[Row]]:
    """SST-2 from the Hugging Face hub (the OpenBackdoor split), as train / dev / test rows."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "loading SST-2 from the hub needs the `datasets` package: pip install 'muscle-fast[demo]'"
        ) from None
    try:
        dd = datasets.load_dataset(HUB_SST2, cache_dir=cache_dir)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load SST-2 ({HUB_SST2}) from the Hugging Face hub ({msg}); offline or no "
            "network? pass --data-dir DIR with OpenBackdoor-format data or a clean train/dev/test.tsv folder"
        ) from None
    out = {}
    for split, hub_split in (("train", "train"), ("dev", "validation"), ("test", "test")):
        part = dd[hub_split]
        out[split] = [(str(t), int(lab)) for t, lab in zip(part["text"], part["label"], strict=True)]
    return out


def parse_attacks(attacks: Sequence[str] | str | None) -> list[str] | None:
    """The ``--attacks`` names (a comma list or a sequence), each once and in order; None for none."""
    if attacks is None:
        return None
    items = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    items = list(dict.fromkeys(a.strip() for a in items if a.strip()))  # once each, in order
    return items or None


def load_backdoor_sets(
    data_dir: str | Path | None = None,
    attacks: Sequence[str] | str | None = None,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[BackdoorDataset]:
    """Every (dataset, attack) a ``--data-dir`` describes, ready for the defense runs.

    ``data_dir`` may be one attack folder, a folder of attack folders (``attacks`` selects
    some), or a clean dataset folder; with no folder SST-2 comes from the hub. Clean data is
    poisoned here with the built-in attacks (default BadNets, mix setting, rate 0.1, target 1).
    """
    wanted = parse_attacks(attacks)
    if data_dir is None or is_clean_dir(data_dir):
        if data_dir is None:
            clean, name, src = load_hub_sst2(), "sst-2", f"hub:{HUB_SST2}"
        else:
            clean, name, src = load_clean_dir(data_dir), Path(data_dir).resolve().name, str(data_dir)
        names = wanted or ["badnets"]
        unknown = [a for a in names if a not in POISONERS]
        if unknown:
            raise DataError(
                f"unknown attack(s) {unknown} for poisoning clean data {src}; built-in attacks: "
                f"{sorted(POISONERS)}"
            )
        out = []
        for a in names:
            ds = make_poisoned(
                clean,
                a,
                setting or "mix",
                DEFAULT_RATE if rate is None else rate,
                1 if target_label is None else target_label,
                seed,
                num_labels=num_labels,
                dataset=name,
            )
            ds.source = src
            out.append(ds)
        return out
    d = Path(data_dir)
    if not d.exists():
        raise DataError(f"data folder {d} does not exist")
    if not d.is_dir():
        raise DataError(f"--data-dir {d} is not a folder")
    if is_attack_dir(d):
        if wanted and d.name not in wanted:
            raise DataError(f"{d} is the attack folder {d.name!r}; --attacks asks for {wanted}")
        dirs = [d]
    else:
        found = find_attack_dirs(d)
        if not found:
            raise DataError(
                f"{d} holds no data: expected an OpenBackdoor attack folder (dev-clean.csv, test-clean.csv, "
                "test-poison.csv, <setting>/<rate>/train-poison.csv), a folder of attack folders, or a clean "
                "dataset folder (train.tsv, dev.tsv, test.tsv)"
            )
        if wanted:
            by_name = {p.name: p for p in found}
            unknown = [a for a in wanted if a not in by_name]
            if unknown:
                raise DataError(f"unknown attack(s) {unknown} in {d}; attacks found: {sorted(by_name)}")
            dirs = [by_name[a] for a in wanted]
        else:
            dirs = found
    return [load_openbackdoor(p, setting, rate, target_label, num_labels) for p in dirs]
