"""``muscle-fast demo``: its spec is a subsample of the defend protocol on the embedded data, and its
verdict reads the records it wrote (the full run is tests/test_fresh_clone.py)."""

from __future__ import annotations

import pytest

from muscle_fast.demo import DEMO, DEMO_PRESET, demo_spec, verdict
from muscle_fast.experiment import builtin_presets, load_preset


def test_demo_spec_is_a_defend_run_on_the_embedded_data(tmp_path) -> None:
    spec = demo_spec(tmp_path / "demo", device="cpu", progress=False)
    assert spec.data_dir is None and spec.model is None  # the shipped SST-2 and MiniLM: no download
    assert spec.methods == ("vanilla", "muscle") and spec.attacks == DEMO.attack
    assert spec.max_train_rows == DEMO.max_train_rows and spec.preset == DEMO_PRESET
    assert DEMO_PRESET in builtin_presets()
    preset = load_preset(DEMO_PRESET)
    assert set(preset["methods"]) >= set(DEMO.methods)


def _rec(method: str, cacc: float, asr: float, attack: str = "badnets") -> dict:
    return {"attack": attack, "method": method, "cacc": cacc, "asr": asr}


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        (0.123, "MuScleLoRA 80.1 % CACC, 12.3 % ASR (85.2 ASR points lower)"),
        (0.99, "MuScleLoRA 80.1 % CACC, 99.0 % ASR (1.5 ASR points higher)"),
    ],
)
def test_verdict_compares_muscle_with_vanilla(ours: float, expected: str) -> None:
    text = verdict([_rec("vanilla", 0.8253, 0.975), _rec("muscle", 0.8012, ours)])
    assert text.startswith("badnets: vanilla fine-tuning 82.5 % CACC, 97.5 % ASR; ")
    assert text.endswith(expected)


def test_verdict_skips_attacks_without_both_methods() -> None:
    assert verdict([_rec("vanilla", 0.8, 0.9), _rec("muscle", 0.8, 0.1, attack="addsent")]) == ""


def test_demo_is_a_cli_command(capsys) -> None:
    from muscle_fast.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "runs/demo" in capsys.readouterr().out
