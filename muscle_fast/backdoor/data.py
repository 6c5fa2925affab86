"""Load backdoor-poisoned and clean text classification data into one structure (SPEC §5).

Sources: OpenBackdoor-format attack folders (CSV header ``,0,1,2``: index, text, label,
poison_label), a folder of such attack folders, clean TSV/CSV sets (``sentence``/``label``)
that are poisoned here, and named sources: ``embedded:sst2`` (the default when no folder is
given: the paper's poisoned SST-2, shipped in ``muscle_fast/data`` so a fresh clone runs
offline), ``embedded:sst2-clean`` and ``hub:sst2`` (SST-2 from the Hugging Face hub). Files
are read through the ``datasets`` library (imported lazily: it is an optional dependency).
Every bad input is a ``DataError`` whose message names the folder, file, line or column, so
the CLI can print it as is.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from ..config import DEFAULT_SEED
from .dataset import SETTINGS, SPLITS, BackdoorDataset, DataError, Row, infer_num_labels
from .poison import POISONERS, make_poisoned

# SETTINGS, SPLITS, BackdoorDataset, DataError and Row live in .dataset and stay importable from here
__all__ = [
    "CLEAN_SPLIT_FILES",
    "DEFAULT_RATE",
    "EMBEDDED_DIR",
    "EMBEDDED_SST2",
    "EMBEDDED_SST2_CLEAN",
    "HUB_SST2",
    "HUB_SST2_NAME",
    "OB_COLUMNS",
    "OB_FILES",
    "OB_TRAIN_FILE",
    "SETTINGS",
    "SPLITS",
    "BackdoorDataset",
    "DataError",
    "Row",
    "canonical_data_dir",
    "embedded_attacks",
    "embedded_manifest",
    "embedded_source",
    "find_attack_dirs",
    "is_attack_dir",
    "is_clean_dir",
    "load_backdoor_sets",
    "load_clean_dir",
    "load_clean_file",
    "load_embedded",
    "load_embedded_clean",
    "load_hub_sst2",
    "load_openbackdoor",
    "parse_attacks",
    "read_embedded_file",
    "read_openbackdoor_file",
    "resolve_train_file",
    "source_name",
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

#: The embedded copy: ``sst2.parquet`` (every row once per distinct file) and its manifest.
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data"
EMBEDDED_MANIFEST = "sst2.json"
EMBEDDED_SST2 = "embedded:sst2"  # the four released attacks (the default source)
EMBEDDED_SST2_CLEAN = "embedded:sst2-clean"  # the clean split, poisoned by the built-in attacks
HUB_SST2_NAME = "hub:sst2"  # HUB_SST2 from the Hugging Face hub, poisoned by the built-in attacks
_NAMED_SOURCES = {
    "embedded:sst2": EMBEDDED_SST2,
    "embedded:sst-2": EMBEDDED_SST2,
    "embedded:sst2-clean": EMBEDDED_SST2_CLEAN,
    "embedded:sst-2-clean": EMBEDDED_SST2_CLEAN,
    "hub:sst2": HUB_SST2_NAME,
    "hub:sst-2": HUB_SST2_NAME,
    f"hub:{HUB_SST2.lower()}": HUB_SST2_NAME,
}


# ---------------------------------------------------------------------------------------------- files


class _Table(NamedTuple):
    """A CSV/TSV file read as strings: its column names, its columns, and each data row's line."""

    names: list[str]
    columns: dict[str, list[str]]
    lines: list[int] | None  # 1-based file line of each data row; None when it cannot be told


def _scan_lines(path: Path, fmt: dict[str, Any]) -> tuple[list[str] | None, list[int]]:
    """The header and the file line of every data row, checking each row's field count.

    ``datasets`` (pandas) reports a row with an extra field only as "an error occurred while
    generating the dataset"; this pass names the line instead.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, **fmt)
            header = next(reader, None)
            lines, last = [], reader.line_num
            for rec in reader:
                start, last = last + 1, reader.line_num  # a quoted field may span several lines
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue  # a blank line: pandas skips it too
                if header is not None and len(rec) != len(header):
                    raise DataError(
                        f"{path}: line {start} has {len(rec)} fields but the header has {len(header)} "
                        f"({'an unquoted tab' if fmt else 'an unquoted comma'} in the text?)"
                    )
                lines.append(start)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return header, lines


def _read_table(path: Path) -> _Table:
    """Column names and string columns of a CSV/TSV file, read through ``datasets``."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    datasets = _import_datasets("reading data")
    tsv = path.suffix.lower() == ".tsv"
    fmt: dict[str, Any] = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else {}
    header, lines = _scan_lines(path, fmt)
    if not header:
        raise DataError(f"{path}: empty file (no header row)")
    # every column as a string (a text column of digits must stay text); labels are parsed here
    names = [h if h else f"_column{i}" for i, h in enumerate(header)]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names in the header {header}")
    if not lines:
        return _Table(names, {n: [] for n in names}, [])
    kwargs: dict[str, Any] = dict(
        column_names=names,
        header=0,
        features=datasets.Features({n: datasets.Value("string") for n in names}),
        keep_default_na=False,
        keep_in_memory=True,
    )
    if tsv:
        kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)  # SST-2 TSVs contain bare quote characters
    with _quiet(datasets):
        try:
            ds = datasets.Dataset.from_csv(str(path), **kwargs)
        except Exception as e:  # pandas parser errors, an empty file, ...
            raise DataError(f"cannot read {path}: {_first_line(e)}") from None
    return _Table(list(ds.column_names), ds.to_dict(), lines if len(lines) == ds.num_rows else None)


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the `datasets` package: pip install 'muscle-fast[demo]'") from None
    return datasets


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars while ``datasets`` builds a table (they are restored after)."""
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _int_column(
    values: Sequence[Any], path: Path | str, column: str, what: str, lines: Sequence[int] | None = None
) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
            if not f.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            where = f"line {lines[i]}" if lines is not None else f"data row {i + 1}"
            raise DataError(
                f"{path}: column {column!r} ({what}) has a non-integer value {v!r} on {where}"
            ) from None
        out.append(int(f))
    return out


def _need(columns: Sequence[str], path: Path, wanted: str, what: str) -> None:
    if wanted not in columns:
        raise DataError(f"{path}: missing column {wanted!r} ({what}); found columns {list(columns)}")


def read_openbackdoor_file(path: str | Path) -> tuple[list[Row], list[bool]]:
    """Rows and poison flags of one OpenBackdoor CSV (header ``,0,1,2``)."""
    path = Path(path)
    cols, data, lines = _read_table(path)
    for key, col in OB_COLUMNS.items():
        _need(cols, path, col, key)
    texts = [t if t is not None else "" for t in data[OB_COLUMNS["text"]]]
    labels = _int_column(data[OB_COLUMNS["label"]], path, OB_COLUMNS["label"], "label", lines)
    flags = _int_column(
        data[OB_COLUMNS["poison_label"]], path, OB_COLUMNS["poison_label"], "poison_label", lines
    )
    bad = next((i for i, f in enumerate(flags) if f not in (0, 1)), None)
    if bad is not None:
        where = f"line {lines[bad]}" if lines is not None else f"data row {bad + 1}"
        raise DataError(f"{path}: column '2' (poison_label) must be 0 or 1, found {flags[bad]} on {where}")
    if not texts:
        raise DataError(f"{path}: no data rows (empty split)")
    return list(zip(texts, labels, strict=True)), [bool(f) for f in flags]


def load_clean_file(path: str | Path) -> list[Row]:
    """(text, label) rows of a clean TSV/CSV with a ``sentence`` (or ``text``) and a ``label`` column."""
    path = Path(path)
    cols, data, lines = _read_table(path)
    text_col = next((c for c in ("sentence", "text") if c in cols), None)
    if text_col is None:
        raise DataError(f"{path}: missing column 'sentence' (the text; 'text' also works); found {cols}")
    _need(cols, path, "label", "label")
    labels = _int_column(data["label"], path, "label", "label", lines)
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


# ---------------------------------------------------------------------------------------------- OpenBackdoor


def _rate_matches(name: str, rate: float) -> bool:
    try:
        return math.isclose(float(name), rate, rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return False


def _choose_train(
    candidates: Sequence[tuple[str, str]], setting: str | None, rate: float | None, where: str
) -> tuple[str, str, float]:
    """The (setting, rate folder, rate) of the training file to use among the (setting, rate folder)
    pairs that hold one; shared by attack folders and the embedded copy so both choose alike."""
    if setting is not None and setting not in SETTINGS:
        raise DataError(f"unknown poison setting {setting!r}; settings: {list(SETTINGS)}")
    want_rate = DEFAULT_RATE if rate is None else float(rate)
    tried = []
    for s in [setting] if setting is not None else list(SETTINGS):
        for cs, name in candidates:
            if cs == s and _rate_matches(name, want_rate):
                return s, name, want_rate
        tried.append(f"{s}/{want_rate:g}/{OB_TRAIN_FILE}")
    avail = [f"{s}/{n}" for s, n in candidates]
    raise DataError(
        f"{where}: missing poisoned training file (looked for {', '.join(tried)}); "
        f"available: {', '.join(avail) if avail else 'none'}"
        + ("; pass --poison-setting/--poison-rate to pick one" if avail else "")
    )


def resolve_train_file(
    attack_dir: str | Path, setting: str | None = None, rate: float | None = None
) -> tuple[Path, str, float]:
    """The poisoned training file ``<setting>/<rate>/train-poison.csv`` and its setting and rate.

    With no setting, the first of clean / mix / dirty that exists at the rate (default 0.1)
    wins; an explicit setting or rate narrows the search.
    """
    d = Path(attack_dir)
    candidates = []
    for s in SETTINGS:
        sd = d / s
        if sd.is_dir():
            candidates += [(s, c.name) for c in sorted(sd.iterdir()) if (c / OB_TRAIN_FILE).is_file()]
    s, name, want_rate = _choose_train(candidates, setting, rate, str(d))
    return d / s / name / OB_TRAIN_FILE, s, want_rate


def _infer_target(
    train: Sequence[Row], flags: Sequence[bool], test_poison: Sequence[Row], hint: int | None, where: str
) -> int:
    """The attack's target: the label of the poisoned training rows, else of the test-poison rows,
    else ``hint`` (OpenBackdoor's ``<target>`` folder)."""
    poisoned = {lab for (_, lab), f in zip(train, flags, strict=True) if f}
    if len(poisoned) == 1:
        return poisoned.pop()
    tp = {lab for _, lab in test_poison}
    if len(tp) == 1:
        return tp.pop()
    if hint is not None:
        return hint
    raise DataError(f"{where}: cannot tell the target label from the data; pass --target-label")


def _poison_eval_rows(
    rows: list[Row], flags: list[bool], target: int, path: str | Path
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


def _dev_poison_pairing(
    dev_clean: Sequence[Row], dev_poison: Sequence[Row], n_file: int, target: int, path: str | Path
) -> list[int | None] | None:
    """Which dev-clean row each dev-poison row was made from, or None when that cannot be told.

    OpenBackdoor writes dev-poison as the non-target dev-clean rows, in order, each triggered
    (checked on the released SST-2: word-level attacks match word for word once the trigger is
    removed, and the sentence-level ones, stylebkd and synbkd, keep the order and count). The order
    is the only pairing that works for paraphrasing attacks, so it is used whenever the counts agree
    and the file needed no filtering; otherwise the pairing is unknown and said so.
    """
    sources = [i for i, (_, lab) in enumerate(dev_clean) if lab != target]
    if n_file == len(dev_poison) == len(sources):
        return sources
    logger.info(
        f"muscle_fast: {path}: {len(dev_poison)} dev-poison rows ({n_file} in the file) for {len(sources)} "
        "non-target dev-clean rows: cannot pair them with their clean sentences, so the dev ASR keeps "
        "the twins of the reference rows"
    )
    return None


def _assemble(
    loaded: dict[str, tuple[list[Row], list[bool]]],
    paths: dict[str, str],
    *,
    dataset: str,
    attack: str,
    source: str,
    setting: str | None,
    rate: float | None,
    target_label: int | None,
    num_labels: int | None,
    target_hint: int | None,
) -> BackdoorDataset:
    """A checked ``BackdoorDataset`` from the files of one attack (no ``train`` entry: eval only)."""
    eval_only = "train" not in loaded
    train, train_flags = loaded.get("train", ([], []))
    if target_label is None:
        target = _infer_target(train, train_flags, loaded["test_poison"][0], target_hint, source)
    else:
        target = int(target_label)
        # the poisoned training rows carry the attack's target (dirty- and clean-label alike); another
        # --target-label would silently relabel the poison sets and measure a meaningless ASR
        poisoned = {lab for (_, lab), f in zip(train, train_flags, strict=True) if f}
        if len(poisoned) == 1 and target not in poisoned:
            raise DataError(
                f"{paths['train']}: every poisoned training row has label {poisoned.pop()}, the attack's "
                f"target, but the target label given is {target}"
            )
    if num_labels is None:
        evals = [loaded[k][0] for k in ("dev_clean", "test_clean")]
        num_labels = infer_num_labels(train, paths.get("train", source), evals, target)
    for k in ("train", "dev_clean", "test_clean", "dev_poison", "test_poison"):
        if k in loaded:
            _check_labels(loaded[k][0], num_labels, paths[k])
    n_dev_poison_file = len(loaded["dev_poison"][0])
    for k in ("dev_poison", "test_poison"):
        loaded[k] = _poison_eval_rows(*loaded[k], target, paths[k])
    source_of = _dev_poison_pairing(
        loaded["dev_clean"][0], loaded["dev_poison"][0], n_dev_poison_file, target, paths["dev_poison"]
    )
    ds = BackdoorDataset(
        dataset=dataset,
        attack=attack,
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
        source=source,
        sources=dict(paths),
        eval_only=eval_only,
        dev_poison_source=source_of,
    )
    return ds.validate()


def load_openbackdoor(
    attack_dir: str | Path,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    dataset: str | None = None,
    need_train: bool = True,
) -> BackdoorDataset:
    """Load one OpenBackdoor attack folder (training file chosen by ``resolve_train_file``).

    ``num_labels`` defaults to the largest label seen + 1 (at least 2); the target label is
    read from the poisoned rows when not given. ``need_train=False`` (evaluating a checkpoint)
    neither looks for nor reads the training file: the set has an empty ``train`` split.
    """
    d = Path(attack_dir)
    if not d.is_dir():
        raise DataError(f"data folder {d} does not exist")
    for name in OB_FILES.values():
        if not (d / name).is_file():
            raise DataError(f"{d}: missing file {name}")
    paths = {k: d / v for k, v in OB_FILES.items()}
    if need_train:
        train_path, setting, rate = resolve_train_file(d, setting, rate)
        paths = {"train": train_path, **paths}
    parent = d.resolve().parent.name
    return _assemble(
        {k: read_openbackdoor_file(p) for k, p in paths.items()},
        {k: str(p) for k, p in paths.items()},
        dataset=dataset or _dataset_name(d),
        attack=d.name,
        source=str(d),
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        target_hint=int(parent) if parent.isdigit() else None,
    )


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


# ---------------------------------------------------------------------------------------------- named sources


def source_name(data_dir: str | Path | None) -> str | None:
    """The canonical name of a named source (``embedded:sst2``, ``embedded:sst2-clean``,
    ``hub:sst2``), or None for a folder. Only strings are names: a ``Path`` is always a folder."""
    if not isinstance(data_dir, str) or data_dir.split(":", 1)[0].strip().lower() not in ("embedded", "hub"):
        return None
    name = _NAMED_SOURCES.get(data_dir.strip().lower())
    if name is None:
        raise DataError(
            f"unknown data source {data_dir!r}; named sources: {EMBEDDED_SST2} (the default: the poisoned "
            f"SST-2 shipped with muscle-fast), {EMBEDDED_SST2_CLEAN} (its clean split, poisoned here), "
            f"{HUB_SST2_NAME} (SST-2 from the Hugging Face hub, poisoned here)"
        )
    return name


def canonical_data_dir(data_dir: str | Path | None) -> str:
    """What a run records as its data, so ``eval`` reloads the same: a named source by its canonical
    name (``None`` is ``embedded:sst2``), a folder by its absolute path."""
    if data_dir is None:
        return EMBEDDED_SST2
    return source_name(data_dir) or str(Path(data_dir).resolve())


@functools.lru_cache(maxsize=1)
def embedded_manifest() -> dict[str, Any]:
    """The manifest of the embedded copy: version, sha256 of the data file, each source file's row range."""
    path = EMBEDDED_DIR / EMBEDDED_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read the embedded data manifest {path} ({e}); reinstall muscle-fast"
        ) from None


@functools.lru_cache(maxsize=1)
def _embedded_table() -> Any:
    """The embedded rows as one ``datasets.Dataset`` (read once per process, checked against the manifest)."""
    man = embedded_manifest()
    path = EMBEDDED_DIR / man["data_file"]
    datasets = _import_datasets(f"reading the embedded SST-2 ({EMBEDDED_SST2})")
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read the embedded data {path} ({e}); reinstall muscle-fast") from None
    if digest != man["sha256"]:
        raise DataError(
            f"{path}: sha256 {digest[:16]}... differs from its manifest's {man['sha256'][:16]}...; "
            "reinstall muscle-fast"
        )
    with _quiet(datasets):
        try:
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:
            raise DataError(f"cannot read {path}: {_first_line(e)}") from None


def embedded_source(name: str = EMBEDDED_SST2) -> str:
    """The ``source`` a set from the embedded copy records: its name, version and data hash."""
    man = embedded_manifest()
    return f"{name} v{man['version']} sha256:{man['sha256'][:16]}"


def read_embedded_file(relpath: str) -> tuple[list[Row], list[bool]]:
    """Rows and poison flags of one file of the embedded copy, named by its path in the release
    (``poison_data/sst-2/1/badnets/train-clean.csv``, ``clean/sst-2/train.tsv``): the very rows
    ``read_openbackdoor_file`` / ``load_clean_file`` give for that file."""
    entry = embedded_manifest()["files"].get(relpath)
    if entry is None:
        raise DataError(f"{EMBEDDED_SST2} has no file {relpath!r}")
    part = _embedded_table()[entry["start"] : entry["stop"]]
    rows = [(str(t), int(lab)) for t, lab in zip(part["text"], part["label"], strict=True)]
    return rows, [bool(f) for f in part["poison"]]


def embedded_attacks() -> list[str]:
    """The attacks of the embedded copy, sorted (the order a folder of attack folders loads in)."""
    return sorted(embedded_manifest()["attacks"])


def load_embedded(
    attack: str,
    setting: str | None = None,
    rate: float | None = None,
    target_label: int | None = None,
    num_labels: int | None = None,
    need_train: bool = True,
) -> BackdoorDataset:
    """One attack of the embedded SST-2, exactly as ``load_openbackdoor`` loads that attack's folder
    of the release (same rows, same training-file choice); offline."""
    man = embedded_manifest()
    if attack not in man["attacks"]:
        raise DataError(f"unknown attack {attack!r} in {EMBEDDED_SST2}; attacks found: {embedded_attacks()}")
    base = f"{man['poison_root']}/{attack}"
    paths = {k: f"{base}/{v}" for k, v in OB_FILES.items()}
    if need_train:
        candidates = sorted(
            (parts[0], parts[1])
            for key in man["files"]
            if key.startswith(base + "/")
            and len(parts := key[len(base) + 1 :].split("/")) == 3
            and parts[0] in SETTINGS
            and parts[2] == OB_TRAIN_FILE
        )
        setting, name, rate = _choose_train(candidates, setting, rate, f"{EMBEDDED_SST2}/{base}")
        paths = {"train": f"{base}/{setting}/{name}/{OB_TRAIN_FILE}", **paths}
    return _assemble(
        {k: read_embedded_file(p) for k, p in paths.items()},
        {k: f"{EMBEDDED_SST2}/{p}" for k, p in paths.items()},
        dataset=man["dataset"],
        attack=attack,
        source=embedded_source(),
        setting=setting,
        rate=rate,
        target_label=target_label,
        num_labels=num_labels,
        target_hint=man["target_label"],
    )


def load_embedded_clean() -> dict[str, list[Row]]:
    """The clean train / dev / test split of the embedded copy (the shared ``clean/sst-2/*.tsv``)."""
    root = embedded_manifest()["clean_root"]
    return {split: read_embedded_file(f"{root}/{split}.tsv")[0] for split in ("train", "dev", "test")}


def load_hub_sst2(cache_dir: str | None = None) -> dict[str, list[Row]]:
    """SST-2 from the Hugging Face hub (the OpenBackdoor split), as train / dev / test rows.

    Reached only by the explicit name ``hub:sst2`` (``--data-dir hub:sst2``); it needs the network
    on first use, which is why it is not the default.
    """
    datasets = _import_datasets("loading SST-2 from the hub")
    try:
        dd = datasets.load_dataset(HUB_SST2, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"could not load SST-2 ({HUB_SST2}) from the Hugging Face hub ({_first_line(e)}); offline or no "
            f"network? leave out --data-dir for the SST-2 shipped with muscle-fast ({EMBEDDED_SST2}), or "
            "pass --data-dir DIR with OpenBackdoor-format data or a clean train/dev/test.tsv folder"
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
    need_train: bool = True,
) -> list[BackdoorDataset]:
    """Every (dataset, attack) a ``--data-dir`` describes, ready for the defense runs.

    ``data_dir`` is one attack folder, a folder of attack folders (``attacks`` selects some),
    a clean dataset folder, or a named source:

    * ``None`` or ``"embedded:sst2"``: the poisoned SST-2 shipped in the package (addsent,
      badnets, stylebkd, synbkd, as released with the paper); no network needed;
    * ``"embedded:sst2-clean"``: its clean split, poisoned here;
    * ``"hub:sst2"``: SST-2 from the Hugging Face hub, poisoned here.

    Clean data is poisoned with the built-in attacks (default BadNets, mix setting, rate 0.1,
    target 1). ``need_train=False`` is for evaluation: OpenBackdoor training files are neither
    required nor read, so an attack without the recorded setting/rate still evaluates.
    """
    wanted = parse_attacks(attacks)
    name = source_name(data_dir)
    if data_dir is None or name == EMBEDDED_SST2:
        found = embedded_attacks()
        unknown = [a for a in wanted or [] if a not in found]
        if unknown:
            raise DataError(f"unknown attack(s) {unknown} in {EMBEDDED_SST2}; attacks found: {found}")
        return [
            load_embedded(a, setting, rate, target_label, num_labels, need_train=need_train)
            for a in wanted or found
        ]
    if name is not None or is_clean_dir(data_dir):
        if name == HUB_SST2_NAME:
            clean, dsname, src = load_hub_sst2(), "sst-2", f"hub:{HUB_SST2}"
        elif name == EMBEDDED_SST2_CLEAN:
            clean, dsname, src = load_embedded_clean(), "sst-2", embedded_source(EMBEDDED_SST2_CLEAN)
        else:
            clean, dsname, src = load_clean_dir(data_dir), Path(data_dir).resolve().name, str(data_dir)
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
                dataset=dsname,
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
        found_dirs = find_attack_dirs(d)
        if not found_dirs:
            raise DataError(
                f"{d} holds no data: expected an OpenBackdoor attack folder (dev-clean.csv, test-clean.csv, "
                "test-poison.csv, <setting>/<rate>/train-poison.csv), a folder of attack folders, a clean "
                f"dataset folder (train.tsv, dev.tsv, test.tsv), or a named source ({EMBEDDED_SST2}, "
                f"{EMBEDDED_SST2_CLEAN}, {HUB_SST2_NAME})"
            )
        if wanted:
            by_name = {p.name: p for p in found_dirs}
            unknown = [a for a in wanted if a not in by_name]
            if unknown:
                raise DataError(f"unknown attack(s) {unknown} in {d}; attacks found: {sorted(by_name)}")
            dirs = [by_name[a] for a in wanted]
        else:
            dirs = found_dirs
    return [
        load_openbackdoor(p, setting, rate, target_label, num_labels, need_train=need_train) for p in dirs
    ]
