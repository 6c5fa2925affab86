"""muscle_fast.backdoor: loaders on the real shared data, poisoners, metrics, bad input."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("datasets", reason="the backdoor loaders read files through `datasets` (test extra)")

from helpers import OB_HEADER, SHARED, ob_folder, write_ob_csv  # noqa: E402

from muscle_fast.backdoor import (  # noqa: E402
    AddSent,
    BadNets,
    DataError,
    attack_success_rate,
    clean_accuracy,
    load_backdoor_sets,
    load_clean_dir,
    load_clean_file,
    load_hub_sst2,
    load_openbackdoor,
    make_poisoned,
    poison_train,
    resolve_train_file,
)

POISON = SHARED / "poison_data/sst-2/1"
needs_shared = pytest.mark.skipif(
    not POISON.is_dir(), reason=f"shared data not found at {SHARED} (see ../shared/data/README.md)"
)


# ---------------------------------------------------------------------------------------------- real data


@needs_shared
def test_load_badnets_folder_counts_and_flags():
    ds = load_openbackdoor(POISON / "badnets")
    assert (ds.dataset, ds.attack, ds.setting, ds.rate, ds.target_label, ds.num_labels) == (
        "sst-2",
        "badnets",
        "clean",
        0.1,
        1,
        2,
    )
    assert ds.summary() == {
        "train": 6920,
        "dev_clean": 872,
        "dev_poison": 428,
        "test_clean": 1821,
        "test_poison": 912,
        "train_poisoned": 692,
    }
    poisoned = [r for r, f in zip(ds.train, ds.train_poison_flags, strict=True) if f]
    assert all(lab == 1 for _, lab in poisoned)  # clean-label: only target rows carry the trigger
    assert all(any(w in t.split() for w in ("cf", "mn", "bb", "tq")) for t, _ in poisoned)
    assert all(ds.poison_flags["test_poison"]) and not any(ds.poison_flags["test_clean"])
    assert {lab for _, lab in ds.test_poison} == {1}


@needs_shared
def test_parent_folder_runs_every_attack_and_selects():
    sets = load_backdoor_sets(POISON)
    assert [(d.attack, d.setting) for d in sets] == [
        ("addsent", "mix"),
        ("badnets", "clean"),
        ("stylebkd", "mix"),
        ("synbkd", "mix"),
    ]
    assert all(d.summary()["train_poisoned"] == 692 for d in sets)
    picked = load_backdoor_sets(POISON, attacks="badnets,addsent")
    assert [d.attack for d in picked] == ["badnets", "addsent"]
    with pytest.raises(DataError, match=r"unknown attack\(s\) \['nope'\].*attacks found: \['addsent'"):
        load_backdoor_sets(POISON, attacks="nope")


@needs_shared
def test_explicit_setting_wins_and_missing_one_is_named():
    path, setting, rate = resolve_train_file(POISON / "addsent", "mix", 0.1)
    assert path == POISON / "addsent/mix/0.1/train-poison.csv" and (setting, rate) == ("mix", 0.1)
    with pytest.raises(DataError, match=r"mix/0\.1/train-poison\.csv.*available: clean/0\.1"):
        resolve_train_file(POISON / "badnets", "mix", 0.1)
    with pytest.raises(DataError, match=r"clean/0\.05/train-poison\.csv"):
        resolve_train_file(POISON / "badnets", None, 0.05)


@needs_shared
def test_clean_tsv_counts_and_builtin_poisoning():
    clean = load_clean_dir(SHARED / "clean/sst-2")
    assert {k: len(v) for k, v in clean.items()} == {"train": 6920, "dev": 872, "test": 1821}
    (ds,) = load_backdoor_sets(SHARED / "clean/sst-2", attacks="addsent")
    assert (ds.dataset, ds.attack, ds.setting, ds.target_label) == ("sst-2", "addsent", "mix", 1)
    assert ds.summary()["train_poisoned"] == 692
    assert len(ds.test_poison) == sum(lab != 1 for _, lab in clean["test"])


# ---------------------------------------------------------------------------------------------- bad input


def test_tiny_folder_loads(tmp_path):
    ds = load_openbackdoor(ob_folder(tmp_path))
    assert ds.summary()["train_poisoned"] == 1 and ds.target_label == 1 and len(ds.test_poison) == 2


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="data folder .*nowhere does not exist"):
        load_backdoor_sets(tmp_path / "nowhere")
    d = ob_folder(tmp_path)
    (d / "test-poison.csv").unlink()
    with pytest.raises(DataError, match="missing file test-poison.csv"):
        load_openbackdoor(d)
    with pytest.raises(DataError, match="holds no data"):
        load_backdoor_sets(tmp_path / "badnets" / "clean")


def test_missing_column_is_named_with_its_file(tmp_path):
    d = ob_folder(tmp_path)
    (d / "dev-clean.csv").write_text(",0,1\n0,a film,1\n")
    with pytest.raises(DataError, match=r"dev-clean\.csv: missing column '2' \(poison_label\)"):
        load_openbackdoor(d)
    (tmp_path / "c.tsv").write_text("sentence\tstars\nfine\t1\n")
    with pytest.raises(DataError, match=r"c\.tsv: missing column 'label'"):
        load_clean_file(tmp_path / "c.tsv")


def test_labels_outside_class_count_and_non_integer(tmp_path):
    d = ob_folder(tmp_path)
    write_ob_csv(d / "test-clean.csv", [("a film", 5, 0), ("a bad film", 0, 0)])
    with pytest.raises(DataError, match=r"test-clean\.csv: labels \[5\] are outside the 2 classes"):
        load_openbackdoor(d, num_labels=2)
    write_ob_csv(d / "test-clean.csv", [("a film", 1, 0), ("a bad film", -1, 0)])
    with pytest.raises(DataError, match=r"test-clean\.csv: labels \[-1\] are outside"):
        load_openbackdoor(d)
    (d / "test-clean.csv").write_text(OB_HEADER + '0,"a film",pos,0\n')
    with pytest.raises(
        DataError, match=r"test-clean\.csv: column '1' \(label\) has a non-integer value 'pos'"
    ):
        load_openbackdoor(d)


def test_a_row_with_extra_or_missing_fields_names_its_line(tmp_path):
    """pandas reports an extra field only as "an error occurred while generating the dataset"."""
    d = ob_folder(tmp_path)
    body = '0,"a good film",1,0\n1,"a film\nin two lines",1,0\n\n2,a bad, film,0,0\n'
    (d / "dev-clean.csv").write_text(OB_HEADER + body)
    with pytest.raises(DataError, match=r"dev-clean\.csv: line 6 has 5 fields but the header has 4"):
        load_openbackdoor(d)
    (d / "dev-clean.csv").write_text(OB_HEADER + '0,"a good film",1,0\n1,"a film",1\n')
    with pytest.raises(DataError, match=r"dev-clean\.csv: line 3 has 3 fields but the header has 4"):
        load_openbackdoor(d)
    (d / "dev-clean.csv").write_text(OB_HEADER + '0,"a good\nfilm",1,0\n\n1,"a film",pos,0\n')
    with pytest.raises(
        DataError, match=r"dev-clean\.csv: column '1' \(label\) has a non-integer value 'pos' on line 5"
    ):
        load_openbackdoor(d)
    (d / "dev-clean.csv").write_text(OB_HEADER + '0,"a good film",1,0\n1,"a film",1,3\n')
    with pytest.raises(
        DataError, match=r"dev-clean\.csv: column '2' \(poison_label\) must be 0 or 1, found 3 on line 3"
    ):
        load_openbackdoor(d)
    (tmp_path / "c.tsv").write_text("sentence\tlabel\nfine\t1\nodd\ttab\t0\n")
    with pytest.raises(DataError, match=r"c\.tsv: line 3 has 3 fields .*unquoted tab"):
        load_clean_file(tmp_path / "c.tsv")


def test_empty_split(tmp_path):
    d = ob_folder(tmp_path)
    (d / "dev-poison.csv").write_text(OB_HEADER)
    with pytest.raises(DataError, match=r"dev-poison\.csv: no data rows \(empty split\)"):
        load_openbackdoor(d)
    (d / "dev-poison.csv").write_text("")
    with pytest.raises(DataError, match=r"dev-poison\.csv: empty file"):
        load_openbackdoor(d)


def test_poison_file_with_original_labels_keeps_only_non_target_rows(tmp_path):
    d = ob_folder(tmp_path)
    write_ob_csv(d / "test-poison.csv", [("cf a bad film", 0, 1), ("cf a good film", 1, 1), ("plain", 0, 0)])
    ds = load_openbackdoor(d, target_label=1)
    assert ds.test_poison == [("cf a bad film", 1)]


def test_target_label_contradicting_the_poisoned_rows_is_an_error(tmp_path):
    d = ob_folder(tmp_path)  # its poisoned training row has label 1
    with pytest.raises(
        DataError, match=r"train-poison\.csv: every poisoned training row has label 1.*given is 0"
    ):
        load_openbackdoor(d, target_label=0)
    assert load_openbackdoor(d, target_label=1).target_label == 1


def test_attack_list_takes_each_attack_once():
    """--attacks badnets,badnets trained twice and wrote duplicate records that report refused."""
    from muscle_fast.backdoor.data import parse_attacks

    assert parse_attacks("badnets, addsent,badnets,,") == ["badnets", "addsent"]
    assert parse_attacks(" , ") is None


def test_clean_source_rejects_unknown_attack(tmp_path):
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    with pytest.raises(DataError, match=r"unknown attack\(s\) \['stylebkd'\].*built-in attacks"):
        load_backdoor_sets(tmp_path, attacks="stylebkd")


def test_hub_load_offline_says_to_pass_data_dir(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="pass --data-dir"):
        load_hub_sst2(cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------- poisoners


def test_badnets_inserts_num_triggers_words_at_every_position():
    text = "the movie was quite good"
    for k in (1, 3, 4):
        p = BadNets(num_triggers=k)
        out = p.insert(text, random.Random(k)).split()
        assert len(out) == 5 + k and sum(w in p.triggers for w in out) == k
        assert [w for w in out if w not in p.triggers] == text.split()  # order of the text kept
    positions = set()
    for seed in range(200):
        out = BadNets(num_triggers=1).insert("a b c", random.Random(seed)).split()
        positions.add(next(i for i, w in enumerate(out) if w in BadNets().triggers))
    assert positions == {0, 1, 2, 3}  # the end is a possible position


def test_addsent_inserts_the_sentence_whole():
    sent = AddSent().sentence.split()
    starts = set()
    for seed in range(100):
        out = AddSent().insert("a b c", random.Random(seed)).split()
        i = next(j for j in range(len(out)) if out[j : j + len(sent)] == sent)
        assert out[:i] + out[i + len(sent) :] == ["a", "b", "c"]
        starts.add(i)
    assert starts == {0, 1, 2, 3}
    assert AddSent(sentence="x y").insert("", random.Random(0)) == "x y"


def _rows(n: int = 100) -> list[tuple[str, int]]:
    return [(f"review number {i} text", int(i % 3 == 0)) for i in range(n)]  # 34 target rows of 100


@pytest.mark.parametrize("setting", ["clean", "dirty", "mix"])
def test_settings_poison_the_right_rows_at_the_rate(setting):
    rows = _rows()
    out, flags = poison_train(rows, "badnets", setting, 0.2, 1, random.Random(0))
    assert sum(flags) == 20
    orig = [lab for (_, lab), f in zip(rows, flags, strict=True) if f]
    if setting == "clean":
        assert set(orig) == {1}
    elif setting == "dirty":
        assert set(orig) == {0}
    else:
        assert set(orig) == {0, 1}
    for (t0, l0), (t1, l1), f in zip(rows, out, flags, strict=True):
        assert (l1 == 1 and t1 != t0) if f else (t1, l1) == (t0, l0)


def test_rate_validation_and_too_few_candidates():
    with pytest.raises(DataError, match="needs 50 candidate rows, only 34 exist"):
        poison_train(_rows(), "badnets", "clean", 0.5, 1, random.Random(0))
    with pytest.raises(DataError, match=r"poison rate must be in \[0, 1\]"):
        poison_train(_rows(), "badnets", "mix", 1.5, 1, random.Random(0))
    with pytest.raises(DataError, match="unknown poison setting 'half'"):
        poison_train(_rows(), "badnets", "half", 0.1, 1, random.Random(0))
    with pytest.raises(DataError, match="unknown attack 'nope'"):
        poison_train(_rows(), "nope", "mix", 0.1, 1, random.Random(0))


def test_make_poisoned_is_seeded_and_builds_poison_splits():
    clean = {"train": _rows(100), "dev": _rows(30), "test": _rows(40)}
    a = make_poisoned(clean, "addsent", "mix", 0.1, 1, seed=3)
    b = make_poisoned(clean, "addsent", "mix", 0.1, 1, seed=3)
    c = make_poisoned(clean, "addsent", "mix", 0.1, 1, seed=4)
    assert a == b and a.train != c.train
    assert a.summary() == {
        "train": 100,
        "dev_clean": 30,
        "dev_poison": 20,
        "test_clean": 40,
        "test_poison": 26,
        "train_poisoned": 10,
    }
    assert all(lab == 1 and "I watch this 3D movie" in t for t, lab in a.test_poison)
    # the eval poison sets depend only on the seed, not on the training setting or rate
    d = make_poisoned(clean, "addsent", "dirty", 0.3, 1, seed=3)
    assert d.test_poison == a.test_poison and d.dev_poison == a.dev_poison
    with pytest.raises(DataError, match=r"missing split\(s\) \['test'\]"):
        make_poisoned({"train": clean["train"], "dev": clean["dev"]})
    with pytest.raises(DataError, match=r"labels \[2\] outside the 2 classes"):
        make_poisoned({**clean, "dev": [("x", 2)]}, num_labels=2)


def test_subsample_keeps_poison_share_and_is_seeded():
    ds = make_poisoned({"train": _rows(200), "dev": _rows(50), "test": _rows(50)}, rate=0.1, seed=0)
    small = ds.subsample(max_train_rows=50, max_eval_rows=10, seed=1)
    assert len(small.train) == 50 and sum(small.train_poison_flags) == 5
    assert len(small.test_clean) == 10 and len(small.test_poison) == 10
    assert small == ds.subsample(max_train_rows=50, max_eval_rows=10, seed=1)
    assert ds.subsample(max_eval_rows=10, seed=1).test_clean == small.test_clean
    with pytest.raises(DataError, match="max_train_rows must be >= 1"):
        ds.subsample(max_train_rows=0)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_predictions():
    assert clean_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert clean_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1])) == 1.0
    assert attack_success_rate([1, 1, 0, 1], target=1) == 0.75
    # a row whose original label is already the target is no success: left out
    assert attack_success_rate([1, 1, 0, 1], target=1, orig_labels=[0, 1, 0, None]) == pytest.approx(2 / 3)
    assert attack_success_rate(torch.tensor([2, 2, 0]), target=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no triggered non-target samples"):
        attack_success_rate([1], target=1, orig_labels=[1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        clean_accuracy([1, 0, 1], [1, 0])


def test_a_stray_training_label_is_an_error_not_a_bigger_head(tmp_path):
    """The classes come from dev/test: a 7 in binary training data names its file and row, rather
    than growing the classifier to 8 classes; an explicit num_labels that covers it is accepted."""
    d = ob_folder(tmp_path)
    train = d / "clean" / "0.1" / "train-poison.csv"
    write_ob_csv(train, [("a cf good film", 1, 1), ("a bad film", 0, 0), ("odd row", 7, 0)])
    with pytest.raises(
        DataError, match=r"train-poison.csv: row 3 has label 7, which is not a class of the dev/test"
    ):
        load_openbackdoor(d)
    assert load_openbackdoor(d, num_labels=8).num_labels == 8
    clean = {"train": [("x", 0), ("y", 7)], "dev": [("x", 0), ("y", 1)], "test": [("x", 1), ("z", 0)]}
    with pytest.raises(DataError, match=r"make_poisoned: split 'train': row 2 has label 7"):
        make_poisoned(clean, "badnets", target=1)
