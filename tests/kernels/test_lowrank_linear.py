"""The fused frozen GEMM with its low-rank term (csrc_triton/lowrank_linear.py) against float64.

out = P @ Q + rnd(U @ V + bias): each element is checked against the float64 value of the same rounded
inputs, within the bound the two roundings and the fp32 sums allow, so a 16-bit accumulator, a lost
partial tile or a wrong operand fails. Runs through Triton's CPU interpreter when there is no GPU.
"""

from __future__ import annotations

import pytest
import torch

from csrc_triton import _common, lowrank_linear

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}
MANTISSA = {F32: 24, F16: 11, BF16: 8}

# (M, K, N, R, dtype, Q layout, bias): odd M, K and N multiples of 8 (TMA: 16-byte rows) that leave
# partial tiles of the interpreter's 32-wide blocks, R padded to 16 or 64 in the kernel. Q layout "w": a
# view W.t() of an (N, K) weight (the forward); "k": (K, N) rows (the input gradient); "s": a (K, N)
# slice of a wider, 16-byte aligned buffer.
CASES = [
    (1, 40, 56, 1, F32, "w", True),
    (37, 40, 56, 3, BF16, "w", True),
    (70, 64, 48, 1, BF16, "k", False),
    (5, 24, 72, 16, F16, "w", False),
    (33, 96, 40, 64, BF16, "s", True),
    (65, 72, 8, 36, F32, "k", True),
    (67, 8, 104, 16, F16, "s", False),
]


def _case_id(c: tuple) -> str:
    M, K, N, R, dt, q, bias = c
    return f"M{M}-K{K}-N{N}-R{R}-{NAME[dt]}-{q}{'-bias' if bias else ''}"


def _operands(M: int, K: int, N: int, R: int, dt: torch.dtype, q: str, bias: bool, device: str):
    P = torch.randn(M, K, device=device).to(dt)
    if q == "w":
        Q = torch.randn(N, K, device=device).to(dt).t()
    elif q == "k":
        Q = torch.randn(K, N, device=device).to(dt)
    else:
        Q = torch.randn(K + 2, N + 8, device=device).to(dt)[1:-1, 8:]
    U = (torch.randn(M, R, device=device) * 3).to(dt)
    V = torch.randn(R, N, device=device).to(dt)
    b = torch.randn(N, device=device).to(dt) if bias else None
    return P, Q, U, V, b


def _unit(dt: torch.dtype) -> float:
    """Relative error of one rounding to ``dt``: half an ulp with round-to-nearest (GPU), a whole ulp
    where the interpreter truncates fp32 to 16 bits."""
    if dt == F32:
        return 2.0**-24
    return 2.0 ** -(MANTISSA[dt] - (1 if _common.INTERPRET else 0))


def _check(out: torch.Tensor, P, Q, U, V, b) -> None:
    d = torch.float64
    lr = U.to(d) @ V.to(d) + (0 if b is None else b.to(d))
    want = P.to(d) @ Q.to(d) + lr
    # two roundings to the output dtype (the low-rank term, then the sum) plus fp32 sums of K + R terms
    mass = P.to(d).abs() @ Q.to(d).abs() + U.to(d).abs() @ V.to(d).abs() + (0 if b is None else b.to(d).abs())
    u = _unit(out.dtype)
    bound = u * (lr.abs() + want.abs()) * (1 + u) + (P.shape[1] + U.shape[1] + 2) * 2.0**-24 * mass
    err = (out.to(d) - want).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"element {divmod(worst, out.shape[1])}: |out - ref| {float(err.flatten()[worst]):.3g} > "
        f"bound {float(bound.flatten()[worst]):.3g}"
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_linear_lowrank_against_float64(case, device):
    M, K, N, R, dt, q, bias = case
    torch.manual_seed(M * 1000 + K + N + R)
    P, Q, U, V, b = _operands(M, K, N, R, dt, q, bias, device)
    out = lowrank_linear.linear_lowrank(P, Q, U, V, b)
    assert out.shape == (M, N) and out.dtype == dt and out.is_contiguous()
    _check(out, P, Q, U, V, b)


def test_rows_with_a_stride_and_empty_shapes(device):
    """P may be a row slice of a wider buffer (16-byte aligned rows); M = 0 gives an empty output, K = 0
    the rounded low-rank term alone."""
    torch.manual_seed(3)
    wide = torch.randn(40, 64, device=device).to(BF16)
    P = wide[:, 8:48]  # 40 x 40, row stride 64: 128 bytes, start 16 bytes in
    _, Q, U, V, b = _operands(40, 40, 24, 5, BF16, "w", True, device)
    _check(lowrank_linear.linear_lowrank(P, Q, U, V, b), P, Q, U, V, b)
    assert lowrank_linear.linear_lowrank(P[:0], Q, U[:0], V, b).shape == (0, 24)
    out = lowrank_linear.linear_lowrank(P[:, :0], Q[:0], U, V, b)
    lr = U.double() @ V.double() + b.double()
    want = (U.float() @ V.float() + b.float()).to(BF16)
    assert out.shape == (40, 24)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert float((out.double() - lr).abs().max()) <= 2 * _unit(BF16) * float(lr.abs().max())


@pytest.mark.parametrize("persistent", [0, 1], ids=["tile-per-program", "persistent"])
@pytest.mark.parametrize("q", ["w", "k"])
def test_both_launch_shapes(persistent, q, device, monkeypatch):
    """One tile per program and the persistent loop (3 programs here, on the GPU too, so that each
    takes several tiles), with tiles of three different sizes, launched by config (the autotuner's list
    holds both on the GPU)."""
    monkeypatch.setattr(lowrank_linear, "_programs", lambda device: 3)
    torch.manual_seed(7)
    P, Q, U, V, b = _operands(70, 72, 40, 5, BF16, q, True, device)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "PERSISTENT": persistent,
              "num_warps": 4, "num_stages": 1}  # fmt: skip
    _check(lowrank_linear.launch_linear_lowrank(P, Q, U, V, b, config=config), P, Q, U, V, b)


@pytest.mark.parametrize("layout", ["strided", "broadcast"])
def test_a_bias_with_any_stride(layout, device):
    """A bias viewed with a stride (every other element of a buffer) or broadcast (stride 0)."""
    torch.manual_seed(5)
    P, Q, U, V, _ = _operands(37, 40, 24, 3, BF16, "w", False, device)
    if layout == "strided":
        b = torch.randn(48, device=device).to(BF16)[::2]
    else:
        b = torch.randn(1, device=device).to(BF16).expand(24)
    _check(lowrank_linear.linear_lowrank(P, Q, U, V, b), P, Q, U, V, b)


def test_rank_zero_keeps_the_frozen_gemm_and_ranks_above_64_are_refused(device):
    torch.manual_seed(6)
    P, Q, U, V, b = _operands(37, 40, 24, 3, BF16, "w", True, device)
    _check(lowrank_linear.linear_lowrank(P, Q, U[:, :0], V[:0], b), P, Q, U[:, :0], V[:0], b)
    wide = torch.zeros(37, 65, device=device, dtype=BF16)
    with pytest.raises(ValueError, match="rank 65 > 64"):
        lowrank_linear.linear_lowrank(P, Q, wide, torch.zeros(65, 24, device=device, dtype=BF16), b)


def test_broadcast_and_overlapping_rows_are_not_tma_operands(device):
    """A zero row stride (an expanded gradient) or rows that overlap (``unfold``) are no matrix to TMA:
    refused, so the dispatcher leaves them to cuBLAS."""
    row = torch.randn(1, 40, device=device).to(BF16)
    assert not lowrank_linear.tma_compatible(row.expand(37, 40))
    flat = torch.randn(40 * 40, device=device).to(BF16)
    assert not lowrank_linear.tma_compatible(flat.unfold(0, 40, 8))  # rows 8 apart, 40 long
    assert not lowrank_linear.tma_compatible(flat.unfold(0, 40, 8).t())
    assert lowrank_linear.tma_compatible(flat.view(40, 40), flat.view(40, 40).t(), row)


def test_bad_operands_name_what_is_wrong(device):
    P, Q, U, V, b = _operands(9, 16, 24, 2, BF16, "w", True, device)
    with pytest.raises(TypeError, match="V must be"):
        lowrank_linear.linear_lowrank(P, Q, U, V.float(), b)
    with pytest.raises(ValueError, match=r"U has shape \(8, 2\), expected \(9, 2\)"):
        lowrank_linear.linear_lowrank(P, Q, U[:8], V, b)
    with pytest.raises(ValueError, match=r"V has shape \(2, 24\), expected \(3, 24\)"):
        lowrank_linear.linear_lowrank(P, Q, torch.zeros(9, 3, device=device, dtype=BF16), V, b)
    with pytest.raises(ValueError, match="bias has shape"):
        lowrank_linear.linear_lowrank(P, Q, U, V, b[:-1])
    with pytest.raises(ValueError, match="TMA"):  # 18-byte rows
        odd = torch.randn(9, 9, device=device).to(BF16)
        lowrank_linear.linear_lowrank(odd, torch.randn(9, 24, device=device).to(BF16), U, V, b)
    with pytest.raises(ValueError, match="TMA"):  # column-major P
        lowrank_linear.linear_lowrank(P.t().contiguous().t(), Q, U, V, b)
    assert lowrank_linear.tma_compatible(P, Q) and not lowrank_linear.tma_compatible(P[:, 1:])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="cuBLAS rounds to nearest; the interpreter truncates"
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_gemm_rounds_as_the_cublas_composition(bias):
    """Against ``torch.addmm(bias, U, V)`` then ``addmm_(P, Q)``: the same two roundings, so the outputs
    differ only where the fp32 summation order moves a value across a rounding boundary (rare)."""
    from muscle_fast.ops.lowrank import compose_linear

    torch.manual_seed(11)
    P, Q, U, V, b = _operands(1000, 512, 384, 16, BF16, "w", bias, "cuda")
    fused = lowrank_linear.linear_lowrank(P, Q, U, V, b)
    composed = compose_linear(P, Q.t(), b, U, V.t())
    differ = (fused != composed).float().mean().item()
    assert differ < 0.01, differ
    ulp = (composed.float().abs() * 2.0**-7).clamp_min(2.0**-126)
    assert bool(((fused.float() - composed.float()).abs() <= ulp).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU configs compile for CUDA only")
@pytest.mark.parametrize("q", ["w", "k"])
def test_every_gpu_config(q):
    """Each autotuned config, launched alone at a shape with more tiles than SMs (the persistent ones
    loop) and partial tiles on every side, in bf16 (what "auto" offers the fused GEMM for)."""
    from csrc_triton import configs

    torch.manual_seed(8)
    P, Q, U, V, b = _operands(4100, 264, 2056, 16, BF16, q, True, "cuda")
    for config in configs.CONFIGS["lowrank.linear"]["gpu"]:
        _check(lowrank_linear.launch_linear_lowrank(P, Q, U, V, b, config=config), P, Q, U, V, b)
