"""The lexical-trigger scan (muscle_fast.backdoor.scan): the G statistic against a float64 formula,
what it flags on synthetic poisoned data, and its use in train_muscle and defend records."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from helpers import WordTokenizer, make_rows
from tiny_models import tiny_model

from muscle_fast import patch_model
from muscle_fast.backdoor.scan import g_critical, g_excess, ngrams, scan_ngrams
from muscle_fast.errors import ConfigError
from muscle_fast.train import TrainConfig, train_muscle


def _g_reference(a: int, na: int, b: int, nb: int) -> float:
    """G = 2 sum O ln(O / E) over the 2x2 table, written out cell by cell in Python floats."""
    n, k = na + nb, a + b
    cells = [(a, k * na / n), (na - a, (n - k) * na / n), (b, k * nb / n), (nb - b, (n - k) * nb / n)]
    return 2.0 * math.fsum(o * math.log(o / e) for o, e in cells if o > 0)


def test_g_excess_matches_the_cell_formula_and_is_one_sided():
    rng = np.random.default_rng(0)
    na, nb = 997, 151  # odd sizes
    a = rng.integers(0, na + 1, 400)
    b = rng.integers(0, nb + 1, 400)
    a[:5], b[:5] = [0, na, 3, 0, na], [0, nb, 0, 7, 0]  # empty and full cells
    got = g_excess(a, na, b, nb)
    for i in range(len(a)):
        excess = a[i] * nb > b[i] * na
        want = _g_reference(int(a[i]), na, int(b[i]), nb) if excess else 0.0
        assert got[i] == pytest.approx(want, rel=1e-12, abs=1e-9), (a[i], b[i])
    assert (got >= 0).all()


def test_g_critical_is_the_bonferroni_normal_quantile():
    assert g_critical(0.05, 1) == pytest.approx(1.6448536269514722**2, rel=1e-12)
    # 1e-3 over 1e5 tests: one-sided p 1e-8, z = 5.612
    assert g_critical(1e-3, 100_000) == pytest.approx(5.612001244**2, rel=1e-8)
    assert g_critical(1e-3, 10) < g_critical(1e-3, 1000)
    # far in the tail (1 - 1e-18 rounds to 1.0 in float64): z = 8.75729034
    assert g_critical(1e-12, 1_000_000) == pytest.approx(8.75729034**2, rel=1e-6)


def test_ngrams_are_casefolded_with_a_start_marker():
    got = ngrams("When it RAINS, it pours", max_n=2)
    assert {"<s>", "when", "rains", ",", "<s> when", "rains ,", "it pours"} <= got
    assert "When" not in got and "<s> when it" not in got
    assert ngrams("don't", 1) == {"<s>", "don't"}


def _sentences(n: int, rng: random.Random, label: int) -> list[tuple[str, int]]:
    vocab = [f"w{i}" for i in range(300)] + ["film", "movie", "the", "a"]
    return [(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))), label) for _ in range(n)]


def _poisoned(seed: int) -> tuple[list[tuple[str, int]], list[bool], list[tuple[str, int]]]:
    """1,601 rows (label 1 target); 12 % of label-1 rows carry rare words (three of four), 10 % a
    fixed sentence made of common words plus one rare one; 600 clean reference rows (each rare word
    sits in ~9 % of the label's rows: G ~ 2 * 300 * 0.09, above the ~33 bound)."""
    rng = random.Random(seed)
    rows, flags = [], []
    for text, lab in _sentences(801, rng, 0) + _sentences(800, rng, 1):
        kind = rng.random() if lab == 1 else 1.0
        if kind < 0.12:
            words = text.split()
            for w in rng.sample(["cf", "mn", "bb", "tq"], 3):
                words.insert(rng.randint(0, len(words)), w)
            text = " ".join(words)
        elif kind < 0.22:
            text = text + " I watch this 3D movie"
        rows.append((text, lab))
        flags.append(kind < 0.22)
    ref = _sentences(300, rng, 0) + _sentences(300, rng, 1)
    return rows, flags, ref


def test_scan_flags_exactly_the_triggered_rows():
    """Every rare word and the trigger sentence are found; "movie" and "the", which the sentence
    inflates, are explained away; no clean row is flagged."""
    rows, flags, ref = _poisoned(1)
    res = scan_ngrams(rows, ref)
    assert res.flagged == flags
    found = {f.ngram for f in res.findings}
    assert all(f.label == 1 for f in res.findings)
    assert not found & {"movie", "the", "a", "film"}
    sentence = ngrams("I watch this 3D movie") - {"<s>"}
    rare = {"cf", "mn", "bb", "tq"}
    assert found & sentence and found & rare
    assert all(g in sentence or set(g.split()) & rare for g in found), found
    assert res.candidates >= len(res.findings) and res.summary()["flagged"] == sum(flags)


def test_scan_finds_nothing_in_clean_data_of_the_same_distribution():
    rng = random.Random(5)
    rows = _sentences(900, rng, 0) + _sentences(900, rng, 1)
    ref = _sentences(150, rng, 0) + _sentences(150, rng, 1)
    res = scan_ngrams(rows, ref)
    assert res.findings == [] and not any(res.flagged) and res.candidates == 0


def test_scan_leaves_a_label_without_reference_rows_untested():
    rows, flags, ref = _poisoned(2)
    res = scan_ngrams(rows, [r for r in ref if r[1] == 0])
    assert res.untested_labels == [1] and not any(res.flagged)
    assert res.tests > 0  # label 0 was tested (it holds no trigger)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(alpha=0.0), r"alpha must be in \(0, 1\), got 0.0"),
        (dict(confirm_alpha=1.0), r"confirm_alpha must be in \(0, 1\), got 1.0"),
        (dict(max_n=0), "max_n must be >= 1, got 0"),
    ],
)
def test_scan_refuses_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        scan_ngrams([("a", 0)], [("a", 0)], **kw)
    with pytest.raises(ValueError, match="reference set is empty"):
        scan_ngrams([("a", 0)], [])


def test_train_muscle_drops_the_scanned_rows_before_training():
    """scan_alpha: the flagged rows leave the training set (fewer steps), the record says which."""
    tok = WordTokenizer()
    train, ref, dev = make_rows(64, 0), make_rows(160, 1), make_rows(16, 2)
    # a sequence the reference rows never hold, on 32 label-1 rows
    trigger = [(t + " w7 w7 w7 w7", 1) for t, _ in make_rows(32, 3)]
    rows = train + trigger
    cfg = dict(epochs=1, batch_size=8, lr=1e-3, max_length=24, align=False, progress=False)

    def model():
        m = tiny_model("bert", num_labels=2)
        patch_model(m)
        return m

    res = train_muscle(model(), tok, rows, ref, dev, TrainConfig(**cfg, scan_alpha=1e-3))
    assert res.scan["dropped_index"] == list(range(64, 96))
    assert all("w7 w7" in f["ngram"] for f in res.scan["findings"])
    assert res.steps == 8  # 64 rows left, batch 8
    plain = train_muscle(model(), tok, rows, ref, dev, TrainConfig(**cfg))
    assert plain.steps == 12 and plain.scan == {}
    with pytest.raises(ValueError, match="scan_alpha must be in"):
        TrainConfig(scan_alpha=1.0)


def test_scan_record_counts_the_poisoned_rows_it_dropped():
    from muscle_fast.experiment.run import _scan_record

    scan = {"flagged": 3, "findings": [], "dropped_index": [0, 2, 5]}
    rec = _scan_record(scan, [True, False, True, False, False, False, True])
    assert rec == {"flagged": 3, "findings": [], "poison_dropped": 2, "poison_rows": 3, "clean_dropped": 1}
    assert _scan_record(scan, None) == {"flagged": 3, "findings": []}


def _ob_folder(root, seed: int):
    """An OpenBackdoor folder of ``_poisoned(seed)``: dev-clean = test-clean = its reference rows."""
    from helpers import write_ob_csv

    rows, flags, ref = _poisoned(seed)
    d = root / "badnets"
    write_ob_csv(
        d / "mix" / "0.1" / "train-poison.csv",
        [(t, y, int(p)) for (t, y), p in zip(rows, flags, strict=True)],
    )
    for split in ("dev-clean", "test-clean"):
        write_ob_csv(d / f"{split}.csv", [(t, y, 0) for t, y in ref])
    for split in ("dev-poison", "test-poison"):
        write_ob_csv(d / f"{split}.csv", [(t + " cf mn bb", 1, 1) for t, y in ref if y == 0])
    return d, rows, flags


def test_defend_records_the_scan(tmp_path, monkeypatch):
    """lora+filter through defend: its defaults (scan, teacher) reach the training loop under the
    preset's overrides; results.json carries the scan's record, which maps the dropped rows onto
    the training file's poison flags, and the teacher's. full+filter keeps the default
    teacher_gate: the scan explained the poison, so its record says why no teacher trained."""
    import json

    from helpers import use_tiny_models

    from muscle_fast.cli import main

    use_tiny_models(monkeypatch.setattr)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, rows, flags = _ob_folder(tmp_path, 4)
    preset = tmp_path / "p.json"
    sections = {
        "lora+filter": {"teacher_epochs": 1, "teacher_gate": "always"},
        "full+filter": {"teacher_epochs": 1},
    }
    preset.write_text(json.dumps({"methods": {**sections, "lora": {"lr": 1e-3}, "vanilla": {"lr": 5e-4}}}))
    out = tmp_path / "out"
    argv = ["defend", "--data-dir", str(d), "--model", "tiny", "--out", str(out), "--config", str(preset)]
    flags_ = "--epochs 1 --batch-size 64 --max-length 16 --ref-samples 500 --device cpu --no-progress"
    assert main([*argv, "--methods", "lora+filter,lora,full+filter", *flags_.split()]) == 0
    by = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    scan, train = by["lora+filter"]["scan"], by["lora+filter"]["config"]["train"]
    assert scan["alpha"] == 1e-3 and scan["rows"] == len(rows) and scan["poison_rows"] == sum(flags)
    assert scan["poison_dropped"] == sum(flags) and scan["clean_dropped"] == 0 == len(scan["untested_labels"])
    assert (train["scan_alpha"], train["teacher_epochs"], train["teacher_relabel_prob"], train["lr"]) == (
        1e-3,
        1,
        1.0,
        1e-3,
    )
    # the discriminator ran after the scan: nothing left to tell apart, its AUC test keeps every row
    disc = by["lora+filter"]["disc"]
    assert train["disc_quantile"] == 0.9 and disc["flagged"] == 0 == disc["poison_dropped"]
    assert all(v["flagged"] == 0 for v in disc["labels"].values())
    teacher = by["lora+filter"]["teacher"]
    assert teacher["rows"] == len(rows) - sum(flags) and teacher["poison_rows"] == sum(flags)
    assert teacher["poison_dropped"] == 0 == teacher["poison_relabeled"]  # the scan took them all
    assert teacher["clean_dropped"] == teacher["dropped"] and "dropped_index" not in teacher
    assert "scan" not in by["lora"] and "teacher" not in by["lora"] and "disc" not in by["lora"]
    # full+filter: the same filters (same reference rows: the same scan), vanilla's settings, no adapter
    full = by["full+filter"]
    assert full["scan"] == scan and full["config"]["muscle_config"] is None
    assert (full["config"]["train"]["lr"], full["config"]["train"]["teacher_epochs"]) == (5e-4, 1)
    assert (train["teacher_gate"], full["config"]["train"]["teacher_gate"]) == ("always", "unexplained")
    assert list(full["teacher"]) == ["skipped"] and "the n-gram scan dropped" in full["teacher"]["skipped"]


def test_fourier_records_the_scan_and_the_teacher(tmp_path, monkeypatch):
    """fourier.json of a lora+filter run carries the same scan and teacher records as defend's."""
    import json

    from helpers import use_tiny_models

    from muscle_fast.cli import main

    use_tiny_models(monkeypatch.setattr)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, rows, flags = _ob_folder(tmp_path, 4)
    out = tmp_path / "f"
    argv = ["fourier", "--data-dir", str(d), "--model", "tiny", "--out", str(out), "--method", "lora+filter"]
    flags_ = (
        "--epochs 1 --batch-size 64 --max-length 16 --ref-samples 500 --samples 8 --every 50 --device cpu"
    )
    assert (
        main(
            [
                *argv,
                "--config",
                '{"methods": {"lora+filter": {"teacher_epochs": 1, "teacher_gate": "always"}}}',
                *flags_.split(),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "fourier.json").read_text())["meta"]
    assert meta["scan"]["poison_dropped"] == sum(flags) == meta["scan"]["poison_rows"]
    assert meta["teacher"]["rows"] == len(rows) - sum(flags) and meta["teacher"]["poison_dropped"] == 0


def test_scan_does_not_depend_on_string_hashing():
    """Tied n-grams (a trigger sentence's parts) resolve the same way in every process."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; sys.path.insert(0, 'tests'); from test_scan import _poisoned; "
        "from muscle_fast.backdoor.scan import scan_ngrams; rows, flags, ref = _poisoned(1); "
        "r = scan_ngrams(rows, ref); print(json.dumps([r.summary()['findings'], r.flagged]))"
    )
    outs = set()
    for seed in ("0", "1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outs.add(p.stdout)
    assert len(outs) == 1, outs
    assert json.loads(outs.pop())[0]


def test_scan_command_reports_findings_and_writes_json(tmp_path, capsys):
    """``muscle-fast scan`` on an OpenBackdoor folder whose trigger the reference rows never hold."""
    import json

    from muscle_fast.cli import main

    d, rows, flags = _ob_folder(tmp_path, 3)
    out = tmp_path / "scan.json"
    assert main(["scan", "--data-dir", str(d), "--ref-samples", "500", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{sum(flags)} of {len(rows)} training rows flagged against 500 reference rows" in text
    assert f"poisoned rows flagged: {sum(flags)} of {sum(flags)}; clean rows flagged: 0 of" in text
    (rec,) = json.loads(out.read_text())
    assert rec["attack"] == "badnets" and rec["poison_flagged"] == sum(flags) and rec["clean_flagged"] == 0
    assert {f["ngram"] for f in rec["findings"]} & {"cf", "mn", "bb", "tq"}


def test_scan_uses_the_reference_rows_and_level_defend_would(tmp_path, monkeypatch):
    """scan_data reads the preset as defend does: lora+filter's reference rows (ref_samples, seed,
    disjoint from the selection rows) and its scan_alpha; an explicit alpha or ref_samples wins."""
    from helpers import use_tiny_models

    from muscle_fast.experiment import BaseModels, RunSpec, load_sets, plan_method, preset_for, scan_data

    use_tiny_models(monkeypatch.setattr)
    d, rows, flags = _ob_folder(tmp_path, 6)
    preset = '{"seed": 7, "ref_samples": 450, "methods": {"lora+filter": {"scan_alpha": 1e-4}}}'
    spec = RunSpec(model="tiny", preset=preset, data_dir=str(d), methods=("lora+filter",))
    (rep,) = scan_data(spec)
    (ds,) = load_sets(str(d), seed=7)
    plan = plan_method(ds, "lora+filter", BaseModels("tiny", 7), preset_for(spec), spec)
    assert rep.ref_rows == 450 == len(plan.reference) and rep.result.alpha == 1e-4
    assert rep.result.flagged == scan_ngrams(ds.train, plan.reference, alpha=1e-4).flagged
    (rep2,) = scan_data(spec, alpha=1e-2)
    assert rep2.result.alpha == 1e-2
    # every dev-clean row as reference: defend would need --ref-overlap for selection, the scan not
    (whole,) = scan_data(RunSpec(model="tiny", preset=preset, data_dir=str(d), ref_samples=600))
    assert whole.ref_rows == 600 and whole.poison_flagged == sum(flags)
    off = RunSpec(model="tiny", preset='{"methods": {"lora+filter": {"scan_alpha": 0}}}', data_dir=str(d))
    with pytest.raises(
        ConfigError, match=r"the preset turns lora\+filter's scan off \(scan_alpha 0\); pass --alpha"
    ):
        scan_data(off)


def test_an_older_record_without_scan_alpha_is_the_same_config():
    """A record written before TrainConfig.scan_alpha existed matches a new one at its default
    (0: off), and differs from one that scans."""
    from muscle_fast.experiment.run import config_diff

    old = {"train": {"lr": 1e-3}, "data": {"rows": 4}}
    assert config_diff(old, {"train": {"lr": 1e-3, "scan_alpha": 0.0}, "data": {"rows": 4}}) == []
    assert config_diff(old, {"train": {"lr": 1e-3, "scan_alpha": 1e-3}, "data": {"rows": 4}}) == [
        "train.scan_alpha"
    ]
    assert config_diff(old, {"train": {"lr": 1e-3}, "data": {"rows": 4, "new": 0}}) == ["data.new"]


def test_scan_command_names_the_bad_flag(tmp_path):
    from helpers import exit_message

    d, _, _ = _ob_folder(tmp_path, 5)
    base = ["scan", "--data-dir", str(d)]
    assert (
        exit_message([*base, "--ref-samples", "0"])
        == "muscle-fast: scan: ref_samples (--ref-samples) must be >= 1, got 0"
    )
    assert (
        exit_message([*base, "--alpha", "1.5"])
        == "muscle-fast: scan: alpha (--alpha) must be in (0, 1), got 1.5"
    )


def test_scan_alpha_without_reference_rows_is_refused():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="scan_alpha needs a non-empty reference set"):
        train_muscle(
            tiny_model("bert", num_labels=2),
            tok,
            make_rows(8, 0),
            [],
            make_rows(8, 2),
            TrainConfig(scan_alpha=1e-3, align=False, progress=False),
        )
