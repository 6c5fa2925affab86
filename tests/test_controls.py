"""The controls built into ``defend`` (``oracle``, ``ref-only``), ``--seeds`` with mean ± sd reports,
and the dev ASR without the reference rows' triggered twins.

Runs on a tiny random BERT and a 40-row OpenBackdoor folder written here (seconds).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("matplotlib", reason="defend plots results.png with matplotlib (test extra)")

from helpers import use_tiny_models, write_ob_csv  # noqa: E402

from muscle_fast.errors import ConfigError, ResultsError  # noqa: E402

WORDS = [f"w{i}" for i in range(30)]
TRIGGER = "cf"
N_TRAIN, N_POISONED = 40, 6


@pytest.fixture
def tiny(monkeypatch):
    """BaseModels hands out a tiny random BERT and a hash tokenizer; one thread (shared CI cores)."""
    use_tiny_models(monkeypatch.setattr)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))), i % 2) for i in range(n)]


def _insert(text: str, rng: random.Random) -> str:
    words = text.split()
    words.insert(rng.randint(0, len(words)), TRIGGER)
    return " ".join(words)


def ob_data(root: Path) -> Path:
    """An OpenBackdoor badnets folder, target 1: 40 training rows of which 6 poisoned, 16 dev-clean
    rows and dev-poison = the 8 non-target ones triggered, in order (as the released files are)."""
    rng = random.Random(0)
    d = root / "badnets"
    train = [(t, lab, 0) for t, lab in _sentences(N_TRAIN, 1)]
    for i in [i for i, (_, lab, _) in enumerate(train) if lab == 0][:N_POISONED]:
        train[i] = (_insert(train[i][0], rng), 1, 1)
    dev, test = _sentences(16, 2), _sentences(12, 3)
    write_ob_csv(d / "mix" / "0.1" / "train-poison.csv", train)
    write_ob_csv(d / "train-clean.csv", [(t, lab, 0) for t, lab in _sentences(N_TRAIN, 1)])
    write_ob_csv(d / "dev-clean.csv", [(t, lab, 0) for t, lab in dev])
    write_ob_csv(d / "test-clean.csv", [(t, lab, 0) for t, lab in test])
    write_ob_csv(d / "dev-poison.csv", [(_insert(t, rng), 1, 1) for t, lab in dev if lab == 0])
    write_ob_csv(d / "test-poison.csv", [(_insert(t, rng), 1, 1) for t, lab in test if lab == 0])
    return d


def two_attacks(root: Path) -> Path:
    """ob_data's badnets folder and an ``addsent`` copy: the same clean rows (dev-clean too), another
    trigger in its poisoned files."""
    import shutil

    bad = ob_data(root)
    add = root / "addsent"
    shutil.copytree(bad, add)
    for name in ("dev-poison.csv", "test-poison.csv", "mix/0.1/train-poison.csv"):
        f = add / name
        f.write_text(f.read_text().replace(f" {TRIGGER} ", " w1 w2 "))
    return root


def two_attacks_spec(tmp_path: Path, ref_samples: int) -> dict[str, Any]:
    """RunSpec fields (all but ``out`` and ``methods``) for the tiny model on :func:`two_attacks`."""
    data = two_attacks(tmp_path / "data")
    return dict(
        model="tiny", data_dir=str(data), epochs=2, batch_size=4, max_length=8, ref_samples=ref_samples,
        device="cpu", progress=False, seed=5,
    )  # fmt: skip


def spy_trainings(monkeypatch) -> list[tuple[int, int]]:
    """(epochs, number of eval sets) of every ``train_muscle`` call from now on, in call order."""
    from muscle_fast import train

    calls: list[tuple[int, int]] = []
    real = train.train_muscle

    def spy(*a, **kw):
        calls.append((a[5].epochs, len(kw.get("eval_sets") or {})))
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_muscle", spy)
    return calls


FLAGS = "--epochs 1 --batch-size 4 --max-length 8 --ref-samples 4 --device cpu --no-progress"
METHODS4 = ("vanilla", "muscle", "oracle", "ref-only")


def test_controls_and_seeds_smoke(tmp_path, tiny, monkeypatch, capsys):
    """oracle trains on exactly the unpoisoned rows, ref-only on exactly muscle's reference rows with
    at least its steps; two seeds give seeded records, checkpoints, mean ± sd and error bars; a
    rerun skips everything; report merges the seeds split into two files."""
    from muscle_fast import train
    from muscle_fast.cli import main
    from muscle_fast.experiment import RunSpec, run_defend

    data = ob_data(tmp_path / "data")
    calls: list[dict[str, Any]] = []
    real = train.train_muscle

    def spy(model, tok, train_rows, ref_rows, dev_rows, config=None, eval_sets=None, **kw):
        calls.append(
            {"train": list(train_rows), "ref": list(ref_rows), "seed": config.seed, "align": config.align}
        )
        return real(model, tok, train_rows, ref_rows, dev_rows, config, eval_sets, **kw)

    monkeypatch.setattr(train, "train_muscle", spy)
    out = tmp_path / "out"
    argv = ["defend", "--data-dir", str(data), "--model", "tiny", "--out", str(out)]
    argv += ["--methods", ",".join(METHODS4), "--seeds", "1,2", *FLAGS.split()]
    assert main(argv) == 0
    assert "±" in capsys.readouterr().out  # the printed table is the mean ± sd one

    records = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(
        (m, s) for m in METHODS4 for s in (1, 2)
    )
    by = {(r["method"], r["seed"]): r for r in records}
    assert len(calls) == 8
    train_file = (data / "mix/0.1/train-poison.csv").read_text().splitlines()[1:]
    clean_rows = [ln for ln in train_file if ln.endswith(",0")]
    assert len(clean_rows) == N_TRAIN - N_POISONED
    for seed in (1, 2):
        c = {m: calls[i] for i, m in enumerate(METHODS4, start=len(METHODS4) * (seed - 1))}
        assert all(call["seed"] == seed for call in c.values())
        assert len(c["vanilla"]["train"]) == N_TRAIN
        assert len(c["oracle"]["train"]) == N_TRAIN - N_POISONED
        assert all(TRIGGER not in t.split() for t, _ in c["oracle"]["train"])
        assert by[("oracle", seed)]["config"]["train_rows"] == N_TRAIN - N_POISONED
        assert c["muscle"]["align"] and not c["ref-only"]["align"]
        assert c["ref-only"]["train"] == c["muscle"]["ref"] and len(c["muscle"]["ref"]) == 4
        assert by[("ref-only", seed)]["config"]["train_rows"] == 4
        assert by[("ref-only", seed)]["config"]["muscle_config"]["mslr_targets"] == []
        assert by[("ref-only", seed)]["steps"] >= by[("muscle", seed)]["steps"] == 10
        for m in METHODS4:
            rec = by[(m, seed)]
            assert rec["adapter"] == f"seed{seed}/badnets/{m}"
            assert json.loads((out / rec["adapter"] / "muscle_run.json").read_text())["seed"] == seed
            # no dev-poison row the dev ASR is taken on is the triggered twin of a reference row
            assert rec["config"]["dev_asr_rows"]["paired"] is True
    ref1 = {t for t, _ in calls[1]["ref"]}
    ref2 = {t for t, _ in calls[5]["ref"]}
    assert ref1 != ref2  # the reference rows follow the seed
    md = (out / "results.md").read_text()
    assert "±" in md and "Backdoor effect" in md and "Every run" in md
    for m in METHODS4:  # the mean ± sd row of each method over its 2 seeds (the dataset: the folder's name)
        assert any(ln.startswith(f"| data | badnets | {m} | 2 | ") and "±" in ln for ln in md.splitlines())
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a rerun finds every (attack, method, seed) finished with the same config
    spec = RunSpec(
        out=str(out), model="tiny", data_dir=str(data), methods=",".join(METHODS4), seeds="1,2", epochs=1,
        batch_size=4, max_length=8, ref_samples=4, device="cpu", progress=False,
    )  # fmt: skip
    res = run_defend(spec)
    assert res.trained == () and res.resumed == () and len(res.skipped) == 8
    assert len(calls) == 8

    # report: the two seeds split into two files merge into the same mean ± sd table
    parts = []
    for seed in (2, 1):
        parts.append(tmp_path / f"seed{seed}.json")
        parts[-1].write_text(json.dumps([r for r in records if r["seed"] == seed]))
    assert main(["report", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    merged_md = (tmp_path / "merged" / "results.md").read_text()
    summary = [ln for ln in md.splitlines() if "| badnets |" in ln and "±" in ln]
    assert summary and summary == [ln for ln in merged_md.splitlines() if "| badnets |" in ln and "±" in ln]
    assert (tmp_path / "merged" / "results.png").is_file()


def test_single_seed_layout_and_resume_unchanged(tmp_path, tiny):
    """Without --seeds the checkpoints stay at <attack>/<method>; the same seed given as --seeds
    counts as the same pairs (skipped), and records carry their seed."""
    from muscle_fast.experiment import RunSpec, run_defend

    data = ob_data(tmp_path / "data")
    kw = dict(
        out=str(tmp_path / "out"), model="tiny", data_dir=str(data), methods="lora,oracle", epochs=1,
        batch_size=8, max_length=8, ref_samples=4, device="cpu", progress=False,
    )  # fmt: skip
    res = run_defend(RunSpec(seed=3, **kw))
    assert [r["adapter"] for r in res.records] == ["badnets/lora", "badnets/oracle"]
    assert {r["seed"] for r in res.records} == {3}
    again = run_defend(RunSpec(seeds=(3,), **kw))
    assert again.trained == () and len(again.skipped) == 2


def test_ref_only_trains_once_for_every_attack(tmp_path, tiny, monkeypatch):
    """ref-only's training does not depend on the attack: defend trains it once per seed and scores
    it on each attack's dev-poison (every epoch) and test sets; each record equals the one a run of
    that attack alone writes, and a rerun skips them all."""
    from muscle_fast.experiment import RunSpec, run_defend

    calls = spy_trainings(monkeypatch)
    kw = two_attacks_spec(tmp_path, ref_samples=4)
    res = run_defend(RunSpec(out=str(tmp_path / "both"), methods="ref-only,lora", **kw))
    assert [n for _, n in calls] == [2, 1, 1]  # ref-only for both attacks (two dev ASR sets), then each lora
    assert not (tmp_path / "both" / ".train-state").exists()  # no state left of the served pair
    by = {(r["attack"], r["method"]): r for r in res.records}
    assert by[("badnets", "ref-only")]["trained_with"] == "addsent/ref-only"
    assert "trained_with" not in by[("addsent", "ref-only")]
    for attack in ("addsent", "badnets"):
        alone = run_defend(RunSpec(out=str(tmp_path / attack), methods="ref-only", attacks=attack, **kw))
        (want,) = alone.records
        got = {k: v for k, v in by[(attack, "ref-only")].items() if k not in ("trained_with", "wall_seconds")}
        assert got == {k: v for k, v in want.items() if k != "wall_seconds"}
        info = json.loads((tmp_path / "both" / got["adapter"] / "muscle_run.json").read_text())
        assert (info["attack"], info["asr"]) == (attack, want["asr"])
    # one training: the clean curves are the same, each dev ASR curve (checked above) its attack's
    b, a = by[("badnets", "ref-only")]["curves"], by[("addsent", "ref-only")]["curves"]
    assert b["dev_cacc"] == a["dev_cacc"] and len(b["dev_asr"]) == len(a["dev_asr"]) == len(a["epoch"]) > 1
    n = len(calls)
    again = run_defend(RunSpec(out=str(tmp_path / "both"), methods="ref-only,lora", **kw))
    assert len(again.skipped) == 4 and len(calls) == n


@pytest.mark.parametrize("method", ["lora+filter", "full+filter"])
def test_filter_teacher_trains_once_for_every_attack(tmp_path, tiny, monkeypatch, method):
    """A +filter teacher trains on the reference rows only: defend trains it once per seed for every
    attack, and each attack's record (the rows its teacher dropped or relabelled included) equals
    the one a run of that attack alone writes, apart from timings and the teacher's
    ``trained_with``."""
    from muscle_fast.experiment import RunSpec, run_defend

    calls = spy_trainings(monkeypatch)  # students and teachers
    kw = two_attacks_spec(tmp_path, ref_samples=8)
    res = run_defend(RunSpec(out=str(tmp_path / "both"), methods=method, **kw))
    teacher_epochs = res.records[0]["config"]["train"]["teacher_epochs"]
    # the first attack's student, its teacher (scored on the selection rows only), the second's student
    assert calls == [(2, 1), (teacher_epochs, 0), (2, 1)]  # the teacher: no dev ASR
    by = {r["attack"]: r for r in res.records}
    first, second = (r["attack"] for r in res.records)
    assert by[second]["teacher"]["trained_with"] == f"{first}/{method}"
    assert "trained_with" not in by[first]["teacher"]

    def timeless(rec):
        t = {k: v for k, v in rec["teacher"].items() if k != "trained_with"}
        return {**{k: v for k, v in rec.items() if k != "wall_seconds"}, "teacher": t}

    for attack in (first, second):
        alone = run_defend(RunSpec(out=str(tmp_path / attack), methods=method, attacks=attack, **kw))
        assert timeless(by[attack]) == timeless(alone.records[0])
    assert len(calls) == 3 + 4  # each alone: a student and its own teacher
    assert by[first]["teacher"]["best_dev_acc"] == by[second]["teacher"]["best_dev_acc"]


def test_run_pairs_refuses_a_plan_that_trains_another_model(tmp_path, tiny):
    """Only pairs with the same training_key share a training: a lora plan (trained on its own
    attack's rows) is refused by name before anything trains."""
    from muscle_fast.experiment import BaseModels, RunSpec, load_sets, plan_method, preset_for, run_pairs

    data = ob_data(tmp_path / "data")
    spec = RunSpec(
        model="tiny", data_dir=str(data), ref_samples=4, epochs=1, batch_size=4, max_length=8, seed=1
    )
    (ds,) = load_sets(str(data), seed=1)
    models, preset = BaseModels("tiny", 1), preset_for(spec)
    ref_only, lora = (plan_method(ds, m, models, preset, spec) for m in ("ref-only", "lora"))
    with pytest.raises(ValueError, match="badnets/lora does not train the same model as badnets/ref-only"):
        run_pairs(ds, "ref-only", models, preset, spec, tmp_path / "out", plan=ref_only, shared=[lora])


def test_dev_asr_leaves_out_the_reference_twins():
    """dev-poison row k is the k-th non-target dev-clean row triggered; the rows whose source is a
    reference row are not used for the dev ASR, through subsampling too."""
    from muscle_fast.backdoor.poison import make_poisoned
    from muscle_fast.experiment import reference_indices, selection_dev_poison

    rows = {k: _sentences(n, i) for i, (k, n) in enumerate((("train", 40), ("dev", 60), ("test", 20)))}
    full = make_poisoned(rows, "badnets", seed=5)
    for ds in (full, full.subsample(None, 25, seed=7)):
        src = ds.dev_poison_source
        assert src is not None and len(src) == len(ds.dev_poison)
        for (text, _), i in zip(ds.dev_poison, src, strict=True):
            if i is not None:
                clean = ds.dev_clean[i][0].split()
                assert [w for w in text.split() if w not in ("cf", "mn", "bb", "tq")] == clean
        ref_idx = reference_indices(len(ds.dev_clean), 10, seed=1)
        kept, dropped = selection_dev_poison(ds, ref_idx)
        twins = [i for i in src if i is not None and i in set(ref_idx)]
        assert dropped == len(twins) and len(kept) == len(ds.dev_poison) - dropped
        ref_texts = {ds.dev_clean[i][0] for i in ref_idx}
        for text, _ in kept:
            assert " ".join(w for w in text.split() if w not in ("cf", "mn", "bb", "tq")) not in ref_texts
    full.dev_poison_source = None  # no pairing known: every row stays
    assert selection_dev_poison(full, [0, 1])[1] == 0


def test_embedded_release_pairs_dev_poison_by_order():
    """The released SST-2 (embedded copy): every attack's dev-poison pairs with the non-target
    dev-clean rows in order; for badnets the pairs match word for word without the triggers."""
    from muscle_fast.experiment import load_sets

    try:
        sets = load_sets(None, "badnets,synbkd", max_eval_rows=120, seed=3)
    except Exception as e:  # noqa: BLE001 - the embedded copy is optional in a source checkout
        pytest.skip(f"embedded SST-2 not available: {e}")
    for ds in sets:
        assert ds.dev_poison_source is not None
        paired = [
            (t, i) for (t, _), i in zip(ds.dev_poison, ds.dev_poison_source, strict=True) if i is not None
        ]
        assert paired
        if ds.attack == "badnets":
            for text, i in paired:
                words = [w for w in text.split() if w not in ("cf", "mn", "bb", "tq")]
                assert words == ds.dev_clean[i][0].split()


def test_seeds_spec_and_hparams_inheritance():
    """--seeds parses and excludes --seed; oracle starts from vanilla's preset section and ref-only
    from lora's, each overridable by its own."""
    from types import SimpleNamespace

    from tiny_models import tiny_config

    from muscle_fast.experiment import RunSpec, effective_hparams, seed_specs

    assert RunSpec(seeds="42, 43,44").seeds == (42, 43, 44)
    assert RunSpec(seeds=[7]).seeds == (7,)
    for bad in ("1,1", "1,x", "", [True]):
        with pytest.raises(ConfigError):
            RunSpec(seeds=bad)
    with pytest.raises(ConfigError, match="--seed and --seeds"):
        RunSpec(seed=1, seeds="2,3")
    assert [s.seed for s in seed_specs(RunSpec(seeds="5,6"), {})] == [5, 6]
    assert [s.seed for s in seed_specs(RunSpec(), {"seed": 9})] == [9]

    model = SimpleNamespace(config=tiny_config("bert"))
    preset = {"lr": 1e-3, "methods": {"vanilla": {"lr": 2e-5}, "lora": {"lr": 5e-4, "batch_size": 8}}}
    assert effective_hparams(model, "oracle", preset, RunSpec())["lr"] == 2e-5
    assert effective_hparams(model, "ref-only", preset, RunSpec())["batch_size"] == 8
    preset["methods"]["oracle"] = {"lr": 3e-5}
    assert effective_hparams(model, "oracle", preset, RunSpec())["lr"] == 3e-5


def test_report_merges_seeds_and_refuses_a_repeated_seed(tmp_path, capsys):
    from muscle_fast.report import merge_records, overview_table, results_markdown, results_table

    def rec(method: str, seed: int, asr: float, attack: str = "badnets") -> dict[str, Any]:
        curves = {"epoch": [1], "dev_cacc": [0.5], "dev_asr": [0.5], "train_loss": [1.0]}
        return dict(
            dataset="sst-2", attack=attack, method=method, seed=seed, cacc=0.9, asr=asr, dev_cacc=0.9,
            dev_asr=0.1, best_epoch=1, epochs=1, wall_seconds=1.0, curves=curves,
        )  # fmt: skip

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([rec("lora", 1, 0.5), rec("oracle", 1, 0.1)]))
    b.write_text(json.dumps([rec("lora", 2, 0.7), rec("oracle", 2, 0.1)]))
    merged = merge_records([a, b])
    assert [(r["method"], r["seed"]) for r in merged] == [
        ("lora", 1),
        ("lora", 2),
        ("oracle", 1),
        ("oracle", 2),
    ]
    table = results_table(merged)
    assert "| sst-2 | badnets | lora | 2 | 90.00 ± 0.00 | 60.00 ± 14.14 |" in table
    md = results_markdown(merged, "m")
    assert "| sst-2 | badnets | lora | 2 | 50.00 ± 14.14 |" in md  # ASR - oracle ASR, paired by seed
    b.write_text(json.dumps([rec("lora", 1, 0.7)]))
    with pytest.raises(ResultsError, match=r"badnets/lora \(seed 1\) is in both"):
        merge_records([a, b])
    # two attacks, two seeds: the mean over the attacks with its sd over seeds
    recs = [rec(m, s, asr, att) for m in ("lora",) for s, asr in ((1, 0.2), (2, 0.4)) for att in ("x", "y")]
    assert "| sst-2 | mean of 2 attacks | lora | 2 | 90.00 ± 0.00 | 30.00 ± 14.14 |" in results_table(recs)
    # the overview: methods by attacks; a method missing an attack has a blank cell and no mean
    recs.append(rec("oracle", 1, 0.1, "x"))
    assert overview_table(recs).splitlines() == [
        "| sst-2: method | x | y | mean of 2 attacks |",
        "| --- | --- | --- | --- |",
        "| lora" + " | 90.0 ± 0.0 / 30.0 ± 14.1 (2)" * 3 + " |",
        "| oracle | 90.0 / 10.0 (1) |  |  |",
    ]
    assert "## Overview" in results_markdown(recs, "m") and overview_table(merged) == ""  # one attack
    from muscle_fast.cli import main

    (tmp_path / "c.json").write_text(json.dumps(recs))
    assert main(["report", "--out", str(tmp_path / "merged"), str(tmp_path / "c.json")]) == 0
    assert overview_table(recs) in capsys.readouterr().out


def test_a_skipped_teacher_neither_claims_nor_names_the_shared_one():
    """With teacher_gate a pair may skip its teacher: it is then not the one that trained the
    shared teacher, and its record names no trainer; the pairs that train and reuse it still do."""
    from types import SimpleNamespace

    from muscle_fast.experiment.run import _note_shared_teacher
    from muscle_fast.train import TeacherCache

    cache = TeacherCache()
    skipped = SimpleNamespace(teacher={"skipped": "the scan found it"})
    _note_shared_teacher(cache, skipped, False, "badnets/lora+filter")
    assert cache.trained_by is None and skipped.teacher == {"skipped": "the scan found it"}
    cache.result = object()  # the next pair trains it
    trained = SimpleNamespace(teacher={"dropped": 3})
    _note_shared_teacher(cache, trained, False, "stylebkd/lora+filter")
    assert cache.trained_by == "stylebkd/lora+filter" and "trained_with" not in trained.teacher
    again = SimpleNamespace(teacher={"skipped": "the scan found it"})
    _note_shared_teacher(cache, again, True, "addsent/lora+filter")
    assert again.teacher == {"skipped": "the scan found it"}
    reused = SimpleNamespace(teacher={"dropped": 2})
    _note_shared_teacher(cache, reused, True, "synbkd/lora+filter")
    assert reused.teacher == {"dropped": 2, "trained_with": "stylebkd/lora+filter"}
