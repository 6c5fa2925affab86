"""Low-rank Triton kernels (csrc_triton/lowrank.py) against float64 torch references.

Runs through Triton's CPU interpreter when there is no GPU (tests/conftest.py sets TRITON_INTERPRET).
Every reference is computed from the very same (already rounded) inputs cast to float64, so the only
differences are the kernels' own roundings; errors are measured as max|out - ref| / max|ref|.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_rel_close as _assert_close

from csrc_triton import _common, configs, lowrank

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}

# Tolerances, relative to max|ref|.
# Outputs kept in fp32 (S, dS, dB, dA): products of the (exact) inputs are exact in fp32 and the sum is
# fp32 (~1e-7 relative). For 16-bit inputs the fp32 intermediate (S or dS) enters a tensor-core dot as a
# hi + lo pair of bf16: 2**-17 relative per product with round-to-nearest on the GPU, up to 2**-14 under
# the interpreter, which truncates fp32 -> bf16. 5e-5 still fails if S / dS were rounded to fp16 or bf16
# once (relative 2**-11 / 2**-8 per product).
TOL_F32_OUT = {F32: 1e-5, F16: 5e-5, BF16: 5e-5}
# Outputs rounded once to their 16-bit dtype (expand, fused, dx): unit roundoff 2**-11 (fp16) and 2**-8
# (bf16) with round-to-nearest on the GPU; the interpreter truncates (2**-10, 2**-7), hence 1.5e-3 and
# 1e-2. A second rounding (e.g. of the low-rank term before the add) or an fp16/bf16 accumulator fails.
TOL_OUT = {F32: 1e-5, F16: 1.5e-3, BF16: 1e-2}

# (M, K, N, R, dtype, layout): odd sizes crossing several 32-wide interpreter tiles, R padded to 16 or 64
# inside the kernels. layout applies to the big operands (x, y, dY, dX): "c" contiguous, "t" a transposed
# view (column-major), "s" a slice of a larger tensor (row stride != number of columns, offset start).
CASES = [
    (1, 67, 131, 1, F32, "c"),
    (17, 67, 131, 3, BF16, "t"),
    (17, 131, 67, 8, F16, "s"),
    (67, 17, 131, 16, F32, "t"),
    (131, 67, 17, 36, BF16, "s"),
    (67, 67, 67, 36, F16, "t"),
    (33, 40, 48, 64, F16, "c"),
    (1000, 67, 131, 16, BF16, "s"),
]


def _case_id(c: tuple) -> str:
    M, K, N, R, dt, layout = c
    return f"M{M}-K{K}-N{N}-R{R}-{DT_NAME[dt]}-{layout}"


case_params = pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in CASES])


def _rand(rows: int, cols: int, dtype: torch.dtype, device: str, layout: str = "c") -> torch.Tensor:
    if layout == "t":
        return torch.randn(cols, rows, device=device).to(dtype).t()
    if layout == "s":
        return torch.randn(rows + 3, cols + 5, device=device).to(dtype)[1 : rows + 1, 2 : cols + 2]
    return torch.randn(rows, cols, device=device).to(dtype)


def _scale(R: int, device: str) -> torch.Tensor:
    return (torch.rand(R, device=device) * 3 + 0.5).float()


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _keep(M: int, K: int, p: float, seed: int, device: str) -> torch.Tensor:
    """Float64 dropout multiplier (mask / (1 - p)) taken from the kernels' own mask."""
    return lowrank.dropout_mask(M, K, p, seed, device).to(torch.float64) / (1.0 - p)


# ---------------------------------------------------------------------------------------------------
# One test per launcher over the covering set of cases
# ---------------------------------------------------------------------------------------------------


@case_params
def test_shrink(case: tuple, device: str) -> None:
    M, K, N, R, dt, layout = case
    x = _rand(M, K, dt, device, layout)
    A = _rand(R, K, dt, device, layout)
    scale = _scale(R, device)
    S = lowrank.lowrank_shrink(x, A, scale)
    assert S.dtype == F32
    _assert_close(S, (_d(x) @ _d(A).T) * _d(scale), TOL_F32_OUT[dt])


@case_params
def test_expand(case: tuple, device: str) -> None:
    M, K, N, R, dt, layout = case
    y = _rand(M, N, dt, device, layout)
    S = _rand(M, R, F32, device)
    B = _rand(N, R, dt, device, layout)
    ref = _d(y) + _d(S) @ _d(B).T
    out = lowrank.lowrank_expand_(y, S, B)
    assert out is y and y.dtype == dt
    _assert_close(y, ref, TOL_OUT[dt])


@case_params
def test_backward_dS_dB(case: tuple, device: str) -> None:
    M, K, N, R, dt, layout = case
    dY = _rand(M, N, dt, device, layout)
    B = _rand(N, R, dt, device, layout)
    S = _rand(M, R, F32, device)
    scale = _scale(R, device)
    dS, dB = lowrank.lowrank_backward_dS_dB(dY, B, S, scale)
    assert dS.dtype == dB.dtype == F32 and dB.shape == (1, N, R)
    _assert_close(dS, (_d(dY) @ _d(B)) * _d(scale), TOL_F32_OUT[dt])
    _assert_close(dB[0], _d(dY).T @ _d(S), TOL_F32_OUT[dt])


@case_params
def test_grad_A(case: tuple, device: str) -> None:
    M, K, N, R, dt, layout = case
    dS = _rand(M, R, F32, device)
    x = _rand(M, K, dt, device, layout)
    dA = lowrank.lowrank_grad_A(dS, x)
    assert dA.dtype == F32 and dA.shape == (1, R, K)
    _assert_close(dA[0], _d(dS).T @ _d(x), TOL_F32_OUT[dt])


@case_params
def test_dx(case: tuple, device: str) -> None:
    M, K, N, R, dt, layout = case
    dX = _rand(M, K, dt, device, layout)
    dS = _rand(M, R, F32, device)
    A = _rand(R, K, dt, device, layout)
    ref = _d(dX) + _d(dS) @ _d(A)
    out = lowrank.lowrank_dx_(dX, dS, A)
    assert out is dX
    _assert_close(dX, ref, TOL_OUT[dt])


ROUNDED_CASES = [c for c in CASES if c[4] != F32]


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in ROUNDED_CASES])
@pytest.mark.parametrize("m1", [None, 5], ids=["nosplit", "split5"])
def test_backward_reductions_take_rounded_intermediates(case: tuple, m1: int | None, device: str) -> None:
    """S and dS already rounded to the 16-bit dtype (what backend "auto" saves and passes) are loaded as
    16-bit operands of one tensor-core dot each. Products of two 16-bit values are exact in fp32, so the
    references take the very same rounded S and dS at the fp32-output tolerance (row groups and the
    dropout mask included)."""
    M, K, N, R, dt, layout = case
    dY = _rand(M, N, dt, device, layout)
    B = _rand(N, R, dt, device, layout)
    S = _rand(M, R, F32, device).to(dt)
    scale = _scale(R, device)
    split = None if m1 is None else min(m1, M)
    parts = [slice(0, M)] if split is None else [slice(0, split), slice(split, M)]
    dS, dB = lowrank.lowrank_backward_dS_dB(dY, B, S, scale, row_split=split)
    assert dS.dtype == dB.dtype == F32 and dB.shape == (len(parts), N, R)
    _assert_close(dS, (_d(dY) @ _d(B)) * _d(scale), TOL_F32_OUT[dt])
    # Above lowrank._S16_MAX_BLOCK_R the dB dot takes the split path (an fp16 dY is split too).
    tol_db = TOL_F32_OUT[F32] if lowrank._block_r(R) <= lowrank._S16_MAX_BLOCK_R else TOL_F32_OUT[dt]
    for g, rows in enumerate(parts):
        if rows.stop > rows.start:
            _assert_close(dB[g], _d(dY)[rows].T @ _d(S)[rows], tol_db)

    x = _rand(M, K, dt, device, layout)
    dS16 = dS.to(dt)
    for p in (0.0, 0.3):
        dA = lowrank.lowrank_grad_A(dS16, x, row_split=split, dropout_p=p, seed=11)
        assert dA.dtype == F32 and dA.shape == (len(parts), R, K)
        xd = _d(x) * _keep(M, K, p, 11, device) if p else _d(x)
        for g, rows in enumerate(parts):
            if rows.stop > rows.start:
                _assert_close(dA[g], _d(dS16)[rows].T @ xd[rows], TOL_F32_OUT[F32])


def test_rounded_intermediate_of_another_dtype_is_refused(device: str) -> None:
    dY, B = _rand(9, 7, BF16, device), _rand(7, 2, BF16, device)
    with pytest.raises(TypeError, match=r"S must be float32 or torch.bfloat16.*got torch.float16"):
        lowrank.lowrank_backward_dS_dB(dY, B, _rand(9, 2, F16, device), _scale(2, device))
    with pytest.raises(TypeError, match=r"dS must be float32 or torch.bfloat16.*got torch.float16"):
        lowrank.lowrank_grad_A(_rand(9, 2, F16, device), dY)


def test_mixed_dtypes(device: str) -> None:
    """Adapters in fp32 while the activations are bf16 (cast in-kernel, fp32 IEEE dot)."""
    M, K, N, R = 17, 67, 131, 3
    x = _rand(M, K, BF16, device, "t")
    A = _rand(R, K, F32, device)
    B = _rand(N, R, F32, device)
    scale = _scale(R, device)
    S = lowrank.lowrank_shrink(x, A, scale)
    _assert_close(S, (_d(x) @ _d(A).T) * _d(scale), TOL_F32_OUT[F32])
    y = _rand(M, N, BF16, device, "s")
    ref = _d(y) + _d(S) @ _d(B).T
    lowrank.lowrank_expand_(y, S, B)
    _assert_close(y, ref, TOL_OUT[BF16])


# ---------------------------------------------------------------------------------------------------
# Row groups (single-pass gradient alignment)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m1", [0, 13, 45, 67], ids=lambda m: f"split{m}")
def test_row_split(m1: int, dt: torch.dtype, device: str) -> None:
    """m1 = 0 / M: one group empty; 13: mid-block; 45: group 1 starts mid-block and spans a boundary."""
    M, K, N, R = 67, 40, 75, 5
    dY = _rand(M, N, dt, device, "t")
    B = _rand(N, R, dt, device)
    S = _rand(M, R, F32, device)
    x = _rand(M, K, dt, device, "s")
    scale = _scale(R, device)
    tol = TOL_F32_OUT[dt]

    dS, dB = lowrank.lowrank_backward_dS_dB(dY, B, S, scale, row_split=m1)
    assert dB.shape == (2, N, R)
    _assert_close(dS, (_d(dY) @ _d(B)) * _d(scale), tol)
    parts = [slice(0, m1), slice(m1, M)]
    for g, rows in enumerate(parts):
        ref = _d(dY)[rows].T @ _d(S)[rows]
        if ref.abs().max() > 0:
            _assert_close(dB[g], ref, tol)
        else:
            assert not dB[g].any()
    _, dB1 = lowrank.lowrank_backward_dS_dB(dY, B, S, scale)
    _assert_close(dB.sum(0), _d(dB1[0]), tol)

    dA = lowrank.lowrank_grad_A(dS, x, row_split=m1, dropout_p=0.25, seed=3)
    assert dA.shape == (2, R, K)
    xd = _d(x) * _keep(M, K, 0.25, 3, device)
    for g, rows in enumerate(parts):
        ref = _d(dS)[rows].T @ xd[rows]
        if ref.abs().max() > 0:
            _assert_close(dA[g], ref, tol)
        else:
            assert not dA[g].any()
    dA1 = lowrank.lowrank_grad_A(dS, x, dropout_p=0.25, seed=3)
    _assert_close(dA.sum(0), _d(dA1[0]), tol)


@pytest.mark.parametrize("m1", [None, 0, 200, 517], ids=lambda m: f"split{m}")
def test_unsplit_outputs_are_not_zero_filled_and_every_element_is_stored(
    m1: int | None, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With enough row blocks no config splits a reduction, so S, dS and dA come from ``torch.empty``:
    filled with NaN here, any element a kernel failed to store (an empty row group included) would
    show. M = 517 rows (17 blocks of 32 under the interpreter, 2+ waves of an H100 at 64-row blocks);
    K = 260 gives grad A 9 column strips, enough under the interpreter (a GPU would need ~34k)."""
    if configs.mode() == "gpu":
        pytest.skip("the autotune space holds 128-row tiles, which split at any testable M")
    M, K, N, R = 517, 260, 75, 5
    if device == "cuda":  # the one untuned config: 64-row blocks
        M = 64 * 2 * _common.sm_count(0) + 5
    m1 = M if m1 == 517 else m1
    real_empty = torch.empty
    made: list[torch.Tensor] = []

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
            made.append(out)
        return out

    x, A, scale = _rand(M, K, F32, device), _rand(R, K, F32, device), _scale(R, device)
    dY, B = _rand(M, N, F32, device, "t"), _rand(N, R, F32, device)
    lowrank._NEEDS_ZERO.clear()
    monkeypatch.setattr(lowrank.torch, "empty", nan_empty)
    S = lowrank.lowrank_shrink(x, A, scale)
    dS, dB = lowrank.lowrank_backward_dS_dB(dY, B, S, scale, row_split=m1)
    dA = lowrank.lowrank_grad_A(dS, x, row_split=m1)
    monkeypatch.undo()
    unsplit = {id(S), id(dS)} | ({id(dA)} if device == "cpu" else set())
    assert {id(t) for t in made} >= unsplit, "the test must reach the unsplit path"
    _assert_close(S, (_d(x) @ _d(A).T) * _d(scale), TOL_F32_OUT[F32])
    _assert_close(dS, (_d(dY) @ _d(B)) * _d(scale), TOL_F32_OUT[F32])
    parts = [slice(0, M)] if m1 is None else [slice(0, m1), slice(m1, M)]
    for g, rows in enumerate(parts):
        ref = _d(dS)[rows].T @ _d(x)[rows]
        if rows.stop > rows.start:
            _assert_close(dA[g], ref, TOL_F32_OUT[F32])
        else:
            assert not dA[g].any() and not dA[g].isnan().any()


def test_row_split_out_of_range(device: str) -> None:
    dY, B, S = _rand(5, 7, F32, device), _rand(7, 2, F32, device), _rand(5, 2, F32, device)
    with pytest.raises(ValueError):
        lowrank.lowrank_backward_dS_dB(dY, B, S, _scale(2, device), row_split=6)
    with pytest.raises(ValueError):
        lowrank.lowrank_grad_A(S, dY, row_split=-1)


# ---------------------------------------------------------------------------------------------------
# Empty batches
# ---------------------------------------------------------------------------------------------------


def test_empty_rows(device: str) -> None:
    K, N, R = 67, 131, 3
    x = torch.empty(0, K, device=device, dtype=BF16)
    A, B = _rand(R, K, BF16, device), _rand(N, R, BF16, device)
    scale = _scale(R, device)
    S = lowrank.lowrank_shrink(x, A, scale, dropout_p=0.5)
    assert S.shape == (0, R) and S.dtype == F32
    y = torch.empty(0, N, device=device, dtype=BF16)
    assert lowrank.lowrank_expand_(y, S, B).shape == (0, N)
    dS, dB = lowrank.lowrank_backward_dS_dB(y, B, S, scale, row_split=0)
    assert dS.shape == (0, R) and dB.shape == (2, N, R) and not dB.any()
    dA = lowrank.lowrank_grad_A(dS, x)
    assert dA.shape == (1, R, K) and not dA.any()
    assert lowrank.lowrank_dx_(torch.empty(0, K, device=device), dS, A, dropout_p=0.1).shape == (0, K)
    assert lowrank.dropout_mask(0, K, 0.5, 1, device).shape == (0, K)


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5], ids=lambda p: f"p{p}")
def test_dropout_keep_rate(p: float, device: str) -> None:
    M, K = 301, 401
    mask = lowrank.dropout_mask(M, K, p, 1234, device)
    assert mask.dtype == torch.bool and mask.shape == (M, K)
    n = M * K
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    # no visible structure: per-row and per-column keep rates stay within 6 sigma of 1 - p as well
    row_rate, col_rate = mask.float().mean(1), mask.float().mean(0)
    assert (row_rate - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / K)
    assert (col_rate - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / M)


def test_dropout_seeds(device: str) -> None:
    a = lowrank.dropout_mask(67, 131, 0.3, 7, device)
    assert torch.equal(a, lowrank.dropout_mask(67, 131, 0.3, 7, device))
    assert not torch.equal(a, lowrank.dropout_mask(67, 131, 0.3, 8, device))
    assert not torch.equal(a[0], a[1])
    assert lowrank.dropout_mask(17, 33, 0.0, 7, device).all()
    assert not lowrank.dropout_mask(17, 33, 1.0, 7, device).any()


@pytest.mark.parametrize("dt", [F32, F16, BF16], ids=lambda d: DT_NAME[d])
def test_dropout_kernels_match_reference(dt: torch.dtype, device: str) -> None:
    M, K, R, p, seed = 67, 131, 3, 0.3, 2024
    x = _rand(M, K, dt, device, "t")
    A = _rand(R, K, dt, device)
    scale = _scale(R, device)
    keep = _keep(M, K, p, seed, device)
    xd = _d(x) * keep

    S = lowrank.lowrank_shrink(x, A, scale, dropout_p=p, seed=seed)
    _assert_close(S, (xd @ _d(A).T) * _d(scale), TOL_F32_OUT[dt])
    # the mask follows the logical index, not the memory layout
    S_c = lowrank.lowrank_shrink(x.contiguous(), A, scale, dropout_p=p, seed=seed)
    _assert_close(S_c, _d(S), 1e-6)
    # another seed gives another result
    S_other = lowrank.lowrank_shrink(x, A, scale, dropout_p=p, seed=seed + 1)
    assert not torch.allclose(S_other, S)

    dS = _rand(M, R, F32, device)
    dA = lowrank.lowrank_grad_A(dS, x, dropout_p=p, seed=seed)
    _assert_close(dA[0], _d(dS).T @ xd, TOL_F32_OUT[dt])

    dX = _rand(M, K, dt, device, "s")
    ref = _d(dX) + (_d(dS) @ _d(A)) * keep
    lowrank.lowrank_dx_(dX, dS, A, dropout_p=p, seed=seed)
    _assert_close(dX, ref, TOL_OUT[dt])


def test_dropout_p_validation(device: str) -> None:
    x, A = _rand(4, 8, F32, device), _rand(2, 8, F32, device)
    with pytest.raises(ValueError):
        lowrank.lowrank_shrink(x, A, _scale(2, device), dropout_p=1.5)


# ---------------------------------------------------------------------------------------------------
# Device checks
# ---------------------------------------------------------------------------------------------------


def test_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INTERPRET", False)
    x, A = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lowrank.lowrank_shrink(x, A, torch.ones(2))
    with pytest.raises(RuntimeError, match="CUDA"):
        lowrank.lowrank_expand_(torch.randn(4, 3), torch.randn(4, 2), torch.randn(3, 2))


def test_config_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter: its one small config; GPU: the autotune list, or one safe config when it is off."""
    from csrc_triton import configs

    assert configs.mode() == ("interpret" if _common.INTERPRET else "gpu" if _common.AUTOTUNE else "untuned")
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    assert configs.configs("lowrank.bwd_ds_db") is configs.CONFIGS["lowrank.bwd_ds_db"]["gpu"]
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    for name, table in configs.CONFIGS.items():
        assert set(table) == {"gpu", "untuned", "interpret"}, name
        for mode, cfgs in table.items():
            assert cfgs, (name, mode)
            for c in cfgs:
                assert {"num_warps", "num_stages"} <= set(c) and configs.meta(c), (name, c)
        if not name.startswith("lowrank.") or name == "lowrank.linear":  # the GEMM: test_compile_sm90
            continue
        (cfg,) = configs.configs(name)
        # fits shared memory at fp32 and R <= 64: stages * (tile + 64-wide operand) * 4 bytes
        tile = math.prod(v for k, v in configs.meta(cfg).items() if k.startswith("BLOCK_"))
        assert cfg["num_stages"] * (tile + 64 * 64) * 4 <= 160 * 1024, name
    assert len(configs.triton_configs("nf4.dequant")) == 1
    with pytest.raises(KeyError, match="known"):
        configs.configs("nope")


def test_launch_config_selectors() -> None:
    """Heuristic tables pick the last candidate whose selectors match (rows: a lower bound)."""
    from csrc_triton import configs

    small = configs.launch_config("gaussian_filter", rows=100, tc=1)
    large = configs.launch_config("gaussian_filter", rows=1 << 20, tc=1)
    assert (small["BLOCK"], small["BLOCK_D"]) == (32, 64) and (large["BLOCK"], large["BLOCK_D"]) == (64, 64)
    assert configs.launch_config("gaussian_filter", rows=1 << 20, tc=0)["BLOCK_D"] == 32
    with pytest.raises(KeyError, match="no gaussian_filter config"):
        configs.launch_config("gaussian_filter", rows=10, tc=7)


def test_row_split_takes_integer_scalars(device: str) -> None:
    """numpy and tensor integer scalars are row splits like an int (the launch path needs an int)."""
    np = pytest.importorskip("numpy")
    dY, B, S = _rand(9, 7, F32, device), _rand(7, 2, F32, device), _rand(9, 2, F32, device)
    x, scale = _rand(9, 5, F32, device), _scale(2, device)
    _, want = lowrank.lowrank_backward_dS_dB(dY, B, S, scale, row_split=4)
    want_a = lowrank.lowrank_grad_A(S, x, row_split=4)
    for m1 in (np.int64(4), torch.tensor(4)):
        _, dB = lowrank.lowrank_backward_dS_dB(dY, B, S, scale, row_split=m1)
        torch.testing.assert_close(dB, want, rtol=0, atol=0)
        torch.testing.assert_close(lowrank.lowrank_grad_A(S, x, row_split=m1), want_a, rtol=0, atol=0)
