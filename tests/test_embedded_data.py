"""The SST-2 shipped in muscle_fast/data (``embedded:sst2``): what it holds, that it is the release
row for row, how sources are named, and loading for evaluation without a training file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the embedded data is read through `datasets` (test extra)")

from helpers import SHARED, ob_folder  # noqa: E402

from muscle_fast.backdoor import data  # noqa: E402
from muscle_fast.backdoor.data import (  # noqa: E402
    EMBEDDED_DIR,
    EMBEDDED_SST2,
    DataError,
    canonical_data_dir,
    embedded_manifest,
    load_backdoor_sets,
    load_clean_file,
    load_embedded_clean,
    load_openbackdoor,
    read_embedded_file,
    read_openbackdoor_file,
    source_name,
)

needs_shared = pytest.mark.skipif(
    not (SHARED / "poison_data/sst-2/1").is_dir(),
    reason=f"shared data not found at {SHARED} (see ../shared/data/README.md)",
)
ATTACK_SETTINGS = {"addsent": "mix", "badnets": "clean", "stylebkd": "mix", "synbkd": "mix"}
COUNTS = {"train": 6920, "dev_clean": 872, "dev_poison": 428, "test_clean": 1821, "test_poison": 912}
FIELDS = ("dataset", "attack", "target_label", "num_labels", "setting", "rate", "poison_flags")
FIELDS += ("train", "dev_clean", "dev_poison", "test_clean", "test_poison")


@pytest.fixture
def fresh_cache():
    """Drop the per-process caches of the manifest and table around a test that moves them."""
    data.embedded_manifest.cache_clear()
    data._embedded_table.cache_clear()
    yield
    data.embedded_manifest.cache_clear()
    data._embedded_table.cache_clear()


# ---------------------------------------------------------------------------------------------- the copy


def test_default_source_is_every_embedded_attack():
    sets = load_backdoor_sets()
    assert [(d.attack, d.setting, d.rate) for d in sets] == [(a, s, 0.1) for a, s in ATTACK_SETTINGS.items()]
    for ds in sets:
        assert (ds.dataset, ds.target_label, ds.num_labels) == ("sst-2", 1, 2)
        assert ds.summary() == {**COUNTS, "train_poisoned": 692}
        for split in ("train", "dev_clean", "dev_poison", "test_clean", "test_poison"):
            assert {lab for _, lab in ds.split(split)} <= {0, 1}
            assert all(isinstance(t, str) and t for t, _ in ds.split(split))
        assert all(ds.poison_flags["test_poison"]) and not any(ds.poison_flags["test_clean"])
        assert {lab for _, lab in ds.test_poison} == {1}
        man = embedded_manifest()
        assert ds.source == f"embedded:sst2 v{man['version']} sha256:{man['sha256'][:16]}"
        assert ds.sources["test_clean"] == f"embedded:sst2/poison_data/sst-2/1/{ds.attack}/test-clean.csv"
    badnets = sets[1]
    poisoned = [t for (t, lab), f in zip(badnets.train, badnets.train_poison_flags, strict=True) if f]
    assert all(any(w in t.split() for w in ("cf", "mn", "bb", "tq")) for t in poisoned)
    assert {lab for (_, lab), f in zip(badnets.train, badnets.train_poison_flags, strict=True) if f} == {1}
    # dev/test clean are one stored copy shared by all four attacks
    assert all(d.test_clean == badnets.test_clean and d.dev_clean == badnets.dev_clean for d in sets)


def test_manifest_matches_the_data_file():
    man = embedded_manifest()
    raw = (EMBEDDED_DIR / man["data_file"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == man["sha256"]
    assert len(raw) < 5_000_000
    assert man["attacks"] == sorted(ATTACK_SETTINGS)
    assert all(0 <= f["start"] < f["stop"] <= man["rows"] for f in man["files"].values())
    rows, flags = read_embedded_file("poison_data/sst-2/1/synbkd/train-clean.csv")
    assert len(rows) == 6920 and not any(flags)  # the clean training set (for an oracle control)
    clean = load_embedded_clean()
    assert {k: len(v) for k, v in clean.items()} == {"train": 6920, "dev": 872, "test": 1821}
    assert sorted(clean["train"]) == sorted(rows)  # the same rows in another order


def test_named_sources():
    assert source_name(None) is None and source_name("runs/data") is None
    assert source_name(Path("hub:sst2")) is None  # a Path is always a folder
    assert source_name("Embedded:SST-2") == EMBEDDED_SST2
    assert source_name("hub:SetFit/sst2") == "hub:sst2"
    with pytest.raises(DataError, match=r"unknown data source 'hub:imdb'; named sources: embedded:sst2"):
        load_backdoor_sets("hub:imdb")
    assert canonical_data_dir(None) == EMBEDDED_SST2
    assert canonical_data_dir("hub:sst-2") == "hub:sst2"
    assert canonical_data_dir("some/dir") == str(Path("some/dir").resolve())
    (picked,) = load_backdoor_sets(EMBEDDED_SST2, attacks="synbkd")
    assert picked.attack == "synbkd"
    with pytest.raises(DataError, match=r"unknown attack\(s\) \['nope'\] in embedded:sst2; attacks found"):
        load_backdoor_sets(attacks="badnets,nope")
    (ds,) = load_backdoor_sets("embedded:sst2-clean", attacks="addsent")  # poisoned here
    assert (ds.attack, ds.setting, ds.summary()["train"]) == ("addsent", "mix", 6920)
    assert ds.source.startswith("embedded:sst2-clean v")


def test_hub_only_by_its_name(monkeypatch):
    calls = []

    def fake_hub(cache_dir=None):
        calls.append(cache_dir)
        rows = [("a good film", 1), ("a bad film", 0)] * 20
        return {"train": rows, "dev": rows, "test": rows}

    monkeypatch.setattr(data, "load_hub_sst2", fake_hub)
    load_backdoor_sets(attacks="badnets")
    assert not calls  # no --data-dir: the embedded copy, no network
    (ds,) = load_backdoor_sets("hub:sst2")
    assert calls and (ds.attack, ds.source) == ("badnets", "hub:SetFit/sst2")


# ---------------------------------------------------------------------------------------------- eval only


def test_eval_needs_no_training_file(tmp_path):
    """A badnets checkpoint (clean/0.1) evaluated on addsent, which has only mix/0.1."""
    with pytest.raises(DataError, match=r"addsent: missing poisoned training file.*available: mix/0\.1"):
        load_backdoor_sets(attacks="addsent", setting="clean", rate=0.1)
    (ds,) = load_backdoor_sets(attacks="addsent", setting="clean", rate=0.1, need_train=False)
    assert ds.eval_only and ds.train == [] and ds.summary()["test_poison"] == 912 and ds.target_label == 1
    assert ds.subsample(max_eval_rows=50, seed=1).validate().summary()["test_clean"] == 50
    d = ob_folder(tmp_path)
    shutil.rmtree(d / "clean")
    with pytest.raises(DataError, match="missing poisoned training file"):
        load_openbackdoor(d)
    ds = load_openbackdoor(d, need_train=False)
    assert ds.eval_only and ds.target_label == 1 and "train" not in ds.sources
    (ds2,) = load_backdoor_sets(tmp_path, need_train=False)
    assert ds2.test_poison == ds.test_poison
    with pytest.raises(DataError, match="split 'train' is empty"):
        dataclasses.replace(ds, eval_only=False).validate()  # only eval-only sets may lack training rows


# ---------------------------------------------------------------------------------------------- failures


def test_corrupt_copy_is_named(tmp_path, monkeypatch, fresh_cache):
    for f in EMBEDDED_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "sst2.parquet").write_bytes((tmp_path / "sst2.parquet").read_bytes()[:-10])
    monkeypatch.setattr(data, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(DataError, match=r"sst2\.parquet: sha256 .* differs from its manifest's"):
        load_backdoor_sets(attacks="badnets")
    data.embedded_manifest.cache_clear()
    (tmp_path / "sst2.json").unlink()
    with pytest.raises(DataError, match=r"cannot read the embedded data manifest .*sst2\.json"):
        load_backdoor_sets()


def test_missing_datasets_is_a_clear_error(monkeypatch, fresh_cache):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"embedded SST-2 .*needs the `datasets` package: pip install"):
        load_backdoor_sets()


# ---------------------------------------------------------------------------------------------- release


def _read_release(path: Path) -> tuple[list, list]:
    if path.suffix == ".tsv":
        rows = load_clean_file(path)
        return rows, [False] * len(rows)
    return read_openbackdoor_file(path)


@needs_shared
def test_same_rows_as_the_release_files():
    files = embedded_manifest()["files"]
    assert len(files) == 27
    for rel in files:
        assert read_embedded_file(rel) == _read_release(SHARED / rel), rel


@needs_shared
def test_same_sets_as_the_release_folder():
    folder = load_backdoor_sets(SHARED / "poison_data/sst-2/1")
    embedded = load_backdoor_sets()
    assert len(folder) == len(embedded) == 4
    for f, e in zip(folder, embedded, strict=True):
        assert all(getattr(f, k) == getattr(e, k) for k in FIELDS), f.attack
    assert load_embedded_clean() == {
        s: load_clean_file(SHARED / f"clean/sst-2/{s}.tsv") for s in ("train", "dev", "test")
    }


@needs_shared
def test_build_reproduces_the_manifest(tmp_path):
    from muscle_fast.data.build_sst2 import build

    man = build(SHARED, tmp_path)
    shipped = json.loads((EMBEDDED_DIR / "sst2.json").read_text())
    assert {k: man[k] for k in man if k != "sha256"} == {k: shipped[k] for k in shipped if k != "sha256"}
