"""Gaussian low-pass filter and frequency deviations (SPEC section 6) against the dense float64 G.

Tolerances (``_tolerance``). Both fast paths form the squared distance as ``|a|^2 + |b|^2 - 2 a.b``
in fp32: an error e ~ eps32 * (|a|^2 + |b|^2) that moves ``dist`` by min(e / dist, sqrt(e)) and a
log-weight by that over 2 delta. To first order ``(G f)_i`` then moves by at most
``range(f) * sum_j w_ij |d logw_ij|``: the tolerance is that estimate plus a 1e-5 floor for the
rest (fp32 exp and sums: measured <= 1.5e-6 on CPU; GPU ``exp`` is ex2.approx). The estimate
matters for close neighbours (d = 1: points ~1/n^2 apart; measured errors <= 0.25 x the estimate)
and is negligible for d >= 5. Per dtype: fp32 x is centred before the expansion, so |x - mean|
enters; bf16 x is compared with the dense filter of the *same* bf16 values (its products are
exact in fp32) but the Triton path does not centre 16-bit inputs (tensor-core dot), so |x|
enters. Any logic error (a missed rescale, a padded column leaking into the sums, a wrong delta,
squared distances) moves outputs by >= 1e-2.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from muscle_fast.analysis import frequency_deviations, gaussian_filter, gaussian_filter_dense_ref
from muscle_fast.ops import gaussian_filter as fourier

FLOOR = 1e-5
BACKENDS = ["torch", "triton"]
TINY, HUGE = 1e-7, 1e9


def _points(n: int, d: int, dtype: torch.dtype, device: str, offset: float = 0.5) -> torch.Tensor:
    return (torch.randn(n, d) + offset).to(device=device, dtype=dtype)


def _widths(d: int) -> list[float]:
    """Tiny (only the point itself counts), two moderate, huge (plain mean) widths."""
    typical = math.sqrt(2 * d)  # RMS distance of unit-variance points
    return [TINY, 0.05 * typical, 0.25 * typical, HUGE]


def _tolerance(x: torch.Tensor, f: torch.Tensor, deltas: list[float]) -> torch.Tensor:
    """Per-delta first-order error estimate of the fp32 Gram expansion, plus FLOOR (module docstring)."""
    x64, f64 = x.double().cpu(), f.double().cpu()
    dist = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist")
    if x.dtype == torch.float32:
        x64 = x64 - x64.mean(0)
    sq = x64.square().sum(1)
    e = torch.finfo(torch.float32).eps / 2 * (sq[:, None] + sq[None, :])
    ddist = torch.minimum(e / dist.clamp_min(1e-300), e.sqrt()).fill_diagonal_(0.0)
    spread = (f64.amax(0) - f64.amin(0)).amax().item() if f.numel() else 0.0
    tol = []
    for delta in deltas:
        w = torch.softmax(dist * (-0.5 / delta), dim=1)
        tol.append(FLOOR + spread * (w * ddist).sum(1).amax().item() / (2 * delta))
    return torch.tensor(tol, dtype=torch.float64)


def _check(
    out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, f: torch.Tensor, deltas: list[float]
) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - ref.cpu()).abs().amax(dim=(1, 2))
    tol = _tolerance(x, f, deltas)
    assert (err <= tol).all(), f"max abs error per delta {err.tolist()} > tolerance {tol.tolist()}"


# Every n in {1, 17, 67, 131} and d in {1, 5, 33, 300} appears; c in {2, 4}.
CASES = [(1, 5, 2), (17, 1, 4), (17, 33, 2), (67, 300, 4), (67, 1, 2), (131, 5, 4), (131, 300, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,d,c", CASES, ids=[f"n{n}-d{d}-c{c}" for n, d, c in CASES])
def test_matches_dense_reference(
    n: int, d: int, c: int, dtype: torch.dtype, backend: str, device: str
) -> None:
    x = _points(n, d, dtype, device)
    f = torch.randn(n, c, device=device)
    deltas = _widths(d)
    out = gaussian_filter(x, f, deltas, backend=backend)
    ref = gaussian_filter_dense_ref(x, f, deltas)
    _check(out, ref, x, f, deltas)
    # Tiny width: every other weight underflows (no NaN thanks to the running max): G f = f,
    # except where bf16 rounding made points coincide (the reference averages those).
    if torch.unique(x, dim=0).shape[0] == n:
        torch.testing.assert_close(out[0], f, rtol=0, atol=1e-6)
    # Huge width: all weights ~1, G f = column mean.
    torch.testing.assert_close(out[-1], f.mean(0).expand(n, c), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_tiles_cover_every_loop(backend: str, device: str) -> None:
    # n = 67 over 16-row blocks (partial last block), d = 300 over 16-wide chunks (partial tail).
    x = _points(67, 300, torch.float32, device)
    f = torch.randn(67, 3, device=device)
    deltas = _widths(300)
    if backend == "triton":
        from csrc_triton.gaussian_filter import gaussian_filter_triton

        out = gaussian_filter_triton(x, f, deltas, block=16, block_d=16)
    else:
        out = gaussian_filter(x, f, deltas, backend="torch", block_rows=16)
    _check(out, gaussian_filter_dense_ref(x, f, deltas), x, f, deltas)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_points_far_from_the_origin(backend: str, device: str) -> None:
    # |x|^2 ~ 33 * 1e4 against distances ~8: without centring the fp32 expansion loses every digit.
    x = _points(40, 33, torch.float32, device, offset=100.0)
    f = torch.randn(40, 2, device=device)
    deltas = _widths(33)
    out = gaussian_filter(x, f, deltas, backend=backend)
    _check(out, gaussian_filter_dense_ref(x, f, deltas), x, f, deltas)


@pytest.mark.filterwarnings(
    "ignore:overflow encountered in multiply:RuntimeWarning"
)  # -dist * 3e38: intended
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_widths_stay_finite(backend: str, device: str) -> None:
    # 1e-300 / 2 is far below fp32: the scale 1 / (2 delta) is clamped, the diagonal weight stays 1.
    x = 100.0 * _points(40, 7, torch.float32, device)
    f = torch.randn(40, 2, device=device)
    out = gaussian_filter(x, f, [1e-300, 1e-30, 1e30, 1e300], backend=backend)
    assert torch.isfinite(out).all()
    for k in (0, 1):
        torch.testing.assert_close(out[k], f, rtol=0, atol=0)
    for k in (2, 3):
        torch.testing.assert_close(out[k], f.mean(0).expand(40, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_duplicate_points_are_at_distance_zero(dtype: torch.dtype, backend: str, device: str) -> None:
    x = _points(50, 33, dtype, device, offset=2.0)
    x[[3, 20, 41]] = x[9].clone()  # four copies of one point
    x[30] = x[31].clone()
    f = torch.randn(50, 2, device=device)
    out = gaussian_filter(x, f, [TINY, 1.0], backend=backend)
    _check(out, gaussian_filter_dense_ref(x, f, [TINY, 1.0]), x, f, [TINY, 1.0])
    # Tiny width: exactly the copies share their weight, so they get the mean of their values.
    group = [3, 9, 20, 41]
    torch.testing.assert_close(out[0, group], f[group].mean(0).expand(4, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, [30, 31]], f[[30, 31]].mean(0).expand(2, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, :3], f[:3], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
def test_row_ids_match_exactly_the_identical_rows(dtype: torch.dtype, device: str) -> None:
    x = _points(30, 9, dtype, device)
    x[4] = x[17].clone()
    x[8, 3] = torch.nextafter(x[8, 3], torch.tensor(float("inf"), dtype=dtype, device=device))
    x[9] = x[8].clone()
    x[9, 3] = torch.nextafter(x[9, 3], torch.tensor(float("-inf"), dtype=dtype, device=device))  # 1 ulp apart
    ids = fourier._row_ids(x)
    same = ids[:, None] == ids[None, :]
    expect = (x[:, None, :] == x[None, :, :]).all(-1)
    assert torch.equal(same, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_points_identical_give_the_mean(backend: str, device: str) -> None:
    x = torch.randn(1, 40).expand(23, 40).contiguous().to(device)
    f = torch.randn(23, 4, device=device)
    out = gaussian_filter(x, f, [TINY, 1.0], backend=backend)
    torch.testing.assert_close(out, f.mean(0).expand(2, 23, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_deltas_and_columns_split_over_launches(backend: str, device: str) -> None:
    # 9 deltas (> 8 per launch) and 20 value columns (> 64 accumulator columns with 8 deltas).
    x = _points(37, 20, torch.float32, device)
    f = torch.randn(37, 20, device=device)
    deltas = [0.3 * 1.6**k for k in range(9)]
    out = gaussian_filter(x, f, deltas, backend=backend)
    _check(out, gaussian_filter_dense_ref(x, f, deltas), x, f, deltas)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_values_have_no_high_part(backend: str, device: str) -> None:
    x = _points(29, 12, torch.float32, device)
    f = torch.tensor([[0.25, -3.0, 7.0]], device=device).expand(29, 3)
    out = gaussian_filter(x, f, [0.1, 1.0, 10.0], backend=backend)
    torch.testing.assert_close(out, f.expand(3, 29, 3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_delta_forms(backend: str, device: str) -> None:
    base = _points(31, 48, torch.float32, device)
    x = base[:, ::2]  # non-contiguous rows
    f = torch.randn(31, 2, device=device, dtype=torch.float64)
    ref = gaussian_filter_dense_ref(x, f, [0.7])
    _check(gaussian_filter(x, f, 0.7, backend=backend), ref, x, f, [0.7])
    _check(gaussian_filter(x, f, torch.tensor([0.7]), backend=backend), ref, x, f, [0.7])
    _check(gaussian_filter(x.double(), f, (0.7,), backend=backend), ref, x, f, [0.7])


def test_expanded_rows_read_as_the_same_point(device: str) -> None:
    """x.expand (row stride 0): the kernel launched with row stride 1 read shifted windows past the
    buffer (0.96 off the dense reference; out of bounds on a GPU)."""
    from csrc_triton.gaussian_filter import gaussian_filter_triton

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel on the CPU needs the interpreter")
    x = torch.randn(1, 5, device=device).expand(40, 5)
    f = torch.randn(40, 3, device=device, dtype=torch.float64)
    got = gaussian_filter_triton(x, f, [1.0])
    want = gaussian_filter_triton(x.contiguous(), f, [1.0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got.double(), gaussian_filter_dense_ref(x, f, [1.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_points_gives_empty_result(backend: str, device: str) -> None:
    out = gaussian_filter(
        torch.empty(0, 5, device=device), torch.empty(0, 3, device=device), [1.0, 2.0], backend=backend
    )
    assert out.shape == (2, 0, 3) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_without_coordinates_are_all_equal(backend: str, device: str) -> None:
    f = torch.randn(5, 2, device=device)
    out = gaussian_filter(torch.empty(5, 0, device=device), f, [TINY, 1.0], backend=backend)
    torch.testing.assert_close(out, f.mean(0).expand(2, 5, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "x_shape,f_shape,deltas,match",
    [
        ((5,), (5, 2), [1.0], "x must be a 2-D"),
        ((5, 3), (5,), [1.0], "f must be a 2-D"),
        ((5, 3), (4, 2), [1.0], "same number of rows"),
        ((5, 3), (5, 2), [], "at least one width"),
        ((5, 3), (5, 2), [1.0, 0.0], r"deltas\[1\] = 0.0"),
        ((5, 3), (5, 2), [-2.5], r"deltas\[0\] = -2.5"),
        ((5, 3), (5, 2), [1.0, float("nan")], r"deltas\[1\] = nan"),
        ((5, 3), (5, 2), [float("inf")], r"deltas\[0\] = inf"),
    ],
    ids=[
        "x-1d",
        "f-1d",
        "row-mismatch",
        "no-deltas",
        "zero-delta",
        "negative-delta",
        "nan-delta",
        "inf-delta",
    ],
)
def test_validation_errors(x_shape, f_shape, deltas, match: str) -> None:
    x, f = torch.randn(x_shape), torch.randn(f_shape)
    with pytest.raises(ValueError, match=match):
        gaussian_filter(x, f, deltas)
    with pytest.raises(ValueError, match=match):
        gaussian_filter_dense_ref(x, f, deltas)


def test_integer_points_are_rejected() -> None:
    with pytest.raises(TypeError, match="floating point"):
        gaussian_filter(torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2), [1.0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch without the interpreter")
def test_cpu_dispatch_without_interpreter(monkeypatch) -> None:
    from csrc_triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    calls = []
    real = fourier.gaussian_filter_torch
    monkeypatch.setattr(fourier, "gaussian_filter_torch", lambda *a: calls.append(1) or real(*a))
    x, f = torch.randn(6, 3), torch.randn(6, 2)
    gaussian_filter(x, f, [1.0])
    assert calls == [1]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gaussian_filter(x, f, [1.0], backend="triton")


# --- frequency deviations -------------------------------------------------------------------------

LABELS = [0, 0, 1, 0, 2, 0, 1, 0]  # class frequencies pi = (5/8, 2/8, 1/8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deviations_hand_checked(backend: str, device: str) -> None:
    n, C = len(LABELS), 3
    labels = torch.tensor(LABELS, device=device)
    t = torch.nn.functional.one_hot(labels, C).float()
    pi = t.mean(0)
    p = pi.expand(n, C)  # predicts the class prior everywhere: constant, so G p = p
    x = _points(n, 6, torch.float32, device)
    dev = frequency_deviations(x, p, t, [TINY, HUGE], backend=backend)
    assert set(dev) == {
        "deltas",
        "e_low",
        "e_high",
        "low_energy_target",
        "high_energy_target",
        "low_energy_pred",
        "high_energy_pred",
    }
    assert all(v.shape == (2,) and v.dtype == torch.float64 for v in dev.values())
    pi2 = float(pi.square().sum())  # 30/64
    # Huge width: G t = pi everywhere, equal to the prediction: e_low = 0. High parts: 0 - (t - pi).
    # Tiny width: G t = t (only the point itself), so e_low = mean ||pi - t_i||; no high part at all.
    e_low_tiny = float((pi - t).norm(dim=1).mean())
    expect = {
        "e_low": [e_low_tiny, 0.0],
        "low_energy_target": [1.0, pi2],
        "high_energy_target": [0.0, 1.0 - pi2],
        "low_energy_pred": [1.0, 1.0],
        "high_energy_pred": [0.0, 0.0],
    }
    for key, vals in expect.items():
        torch.testing.assert_close(
            dev[key].cpu(), torch.tensor(vals, dtype=torch.float64), rtol=0, atol=1e-5, msg=key
        )
    assert math.isnan(dev["e_high"][0].item())  # 0 / 0: neither side has a high part
    assert abs(dev["e_high"][1].item() - 1.0) < 1e-5  # ||0 - h_t|| / ||h_t||
    # Integer labels are the same as their one-hot rows.
    dev2 = frequency_deviations(x, p, labels, [TINY, HUGE], backend=backend)
    for key in expect:
        torch.testing.assert_close(dev2[key], dev[key], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deviations_match_dense_filter(backend: str, device: str) -> None:
    n, C = 45, 4
    x = _points(n, 17, torch.float32, device)
    p = torch.softmax(torch.randn(n, C, device=device), dim=1)
    t = torch.nn.functional.one_hot(torch.randint(0, C, (n,), device=device), C).float()
    deltas = [0.3, 1.0, 4.0]
    dev = frequency_deviations(x, p, t, deltas, backend=backend)
    gp = gaussian_filter_dense_ref(x, p, deltas)
    gt = gaussian_filter_dense_ref(x, t, deltas)
    p64, t64 = p.double().cpu(), t.double().cpu()
    gp, gt = gp.cpu(), gt.cpu()
    e_low = (gp - gt).norm(dim=-1).mean(-1) / gt.norm(dim=-1).mean(-1)
    e_high = ((p64 - gp) - (t64 - gt)).norm(dim=-1).mean(-1) / (t64 - gt).norm(dim=-1).mean(-1)
    torch.testing.assert_close(dev["e_low"].cpu(), e_low, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dev["e_high"].cpu(), e_high, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dev["deltas"].cpu(), torch.tensor(deltas, dtype=torch.float64))


def test_deviations_validate_shapes() -> None:
    with pytest.raises(ValueError, match="probs and onehot"):
        frequency_deviations(torch.randn(4, 3), torch.rand(4, 2), torch.rand(4, 3), [1.0])
    with pytest.raises(ValueError, match=r"deltas\[0\]"):
        frequency_deviations(torch.randn(4, 3), torch.rand(4, 2), torch.tensor([0, 1, 1, 0]), [-1.0])
