"""MuScleLinear against the float64 reference of SPEC §2, on every backend and dtype."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_rel_close
from reference import lowrank_ref
from torch import nn
from transformers.pytorch_utils import Conv1D

from muscle_fast import MuScleLinear, layers
from muscle_fast.ops import lowrank
from muscle_fast.ops.lowrank import MuScleLinearFunction, get_ops

# "accumulate": what backend "auto" runs on CUDA (lowrank.accumulate_ops: the low-rank M x N terms by
# cuBLAS, the base GEMM accumulating into them; each reduction measured between its Triton kernel and
# its cuBLAS twin, which is the Triton kernel off CUDA); "accumulate-cublas": the same with every
# reduction pinned to its cuBLAS twin (MUSCLE_FAST_PICK=cublas); "accumulate-fused": the frozen GEMMs
# with their low-rank terms pinned to the fused Triton GEMM where it takes the operands (bf16, 16-byte
# rows; MUSCLE_FAST_PICK=fused). Forced on the CPU under the interpreter.
BACKENDS = ["torch", "triton", "accumulate", "accumulate-cublas", "accumulate-fused"]
PICKS = {"accumulate-cublas": "cublas", "accumulate-fused": "fused"}


def _backend(name: str) -> str:
    """The MuScleLinear backend argument of a test backend name."""
    if not name.startswith("accumulate"):
        return name
    return "auto" if torch.cuda.is_available() else "triton"


def _ops(name: str, device: str) -> lowrank.LowRankOps:
    ops = get_ops(_backend(name), torch.device(device))
    return lowrank.accumulate_ops() if name.startswith("accumulate") else ops


@pytest.fixture(autouse=True)
def _accumulate_on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Off CUDA, make a "triton" layer of an "accumulate" test run accumulate_ops; pin the reductions of
    an "accumulate-cublas" test to their cuBLAS twins (as ``MUSCLE_FAST_PICK`` does for users) and check
    afterwards that they ran: every choice made is the twin, and fp32/bf16 made some."""
    spec = getattr(request.node, "callspec", None)
    name = spec.params.get("backend") if spec is not None else None
    if not isinstance(name, str) or not name.startswith("accumulate"):
        yield
        return
    if name in PICKS:
        monkeypatch.setenv("MUSCLE_FAST_PICK", PICKS[name])
    if not torch.cuda.is_available():

        def get(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> lowrank.LowRankOps:
            ops = get_ops(backend, device, dtype)
            return lowrank.accumulate_ops() if ops.kernels else ops

        monkeypatch.setattr(layers, "get_ops", get)
    yield
    choices = lowrank.measured_choices()
    if name == "accumulate-cublas":
        chosen = [r["chosen"] for op, rows in choices.items() if op.startswith("lowrank") for r in rows]
        assert set(chosen) <= {"cublas"}, chosen
        if spec.params.get("dtype", torch.float32) in (torch.float32, torch.bfloat16):
            assert chosen, "no reduction ran its cuBLAS twin"
    if name == "accumulate-fused":
        gemms = [r["chosen"] for op in ("lowrank.linear", "lowrank.linear_dx") for r in choices[op]]
        assert set(gemms) <= {"fused"}, gemms


# Relative to the output's max magnitude: fp32 rounding of K-term sums; bf16 has an 8-bit mantissa.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    bound: torch.Tensor | None = None,
) -> None:
    """Max error within TOL of the largest |expected|, or of the largest ``bound`` when given.

    ``bound`` is the same computation on absolute values (sum of |terms|): rounding errors scale
    with it, not with the result, which cancellation can make arbitrarily small (K=1, N=17).
    """
    assert_rel_close(actual, expected, TOL[dtype], what, bound)


def _make(
    kind: str,
    k: int,
    n: int,
    scales,
    r: int,
    device: str,
    dtype: torch.dtype,
    backend: str,
    dropout: float = 0.0,
) -> MuScleLinear:
    base = nn.Linear(k, n) if kind == "linear" else Conv1D(n, k)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.1)
        nn.init.normal_(base.bias, std=0.1)
    m = MuScleLinear(
        base.to(device=device, dtype=dtype),
        scales,
        r,
        alpha=6.0,
        dropout=dropout,
        init_B="kaiming",
        backend=_backend(backend),
    )
    return m


def _dense_weight(m: MuScleLinear) -> torch.Tensor:
    return m.base.weight.t() if m.kind == "conv1d" else m.base.weight


CASES = [  # (kind, leading shape, K, N, scales, r)
    ("linear", (17,), 67, 131, (1.0,), 1),
    ("linear", (2, 9), 33, 20, (1.0, 4.0, 8.0), 3),
    ("conv1d", (3, 5), 48, 144, (1.0, 2.0, 3.0, 4.0), 1),
    ("linear", (1,), 1, 17, (1.0,), 8),
    ("linear", (0,), 16, 8, (1.0, 2.0), 2),
    ("linear", (3, 43), 40, 24, (1.0, 2.0), 3),  # 129 rows of 16 bytes in bf16: the fused GEMM's
]


def _id(c) -> str:
    kind, lead, k, n, scales, r = c
    return f"{kind}-M{'x'.join(map(str, lead))}-K{k}-N{n}-n{len(scales)}-r{r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward_matches_reference(case, dtype, backend, device):
    kind, lead, k, n, scales, r = case
    m = _make(kind, k, n, scales, r, device, dtype, backend)
    x = torch.randn(*lead, k, device=device, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    W, b = _dense_weight(m), m.base.bias
    xr = x.detach().double().requires_grad_(True)
    Ar = m.lora_A.detach().double().requires_grad_(True)
    Br = m.lora_B.detach().double().requires_grad_(True)
    ref = lowrank_ref(xr, W, b, Ar, Br, m.scale_vector, m.scaling)
    # the same on absolute values: per-element sums of |terms|, the scale of any rounding error
    xa, Aa, Ba = (t.detach().double().abs().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    ba = None if b is None else b.detach().abs()
    bound = lowrank_ref(xa, W.detach().abs(), ba, Aa, Ba, m.scale_vector.abs(), abs(m.scaling))
    _close(y, ref, dtype, "forward", bound)
    gy = torch.randn_like(ref).to(dtype)  # the reference sees the same rounded upstream gradient
    y.backward(gy)
    ref.backward(gy.double())
    bound.backward(gy.double().abs())
    if x.numel():
        _close(x.grad, xr.grad, dtype, "dX", xa.grad)
        _close(m.lora_A.grad, Ar.grad, dtype, "dA", Aa.grad)
        _close(m.lora_B.grad, Br.grad, dtype, "dB", Ba.grad)
    else:
        assert x.grad.shape == x.shape and float(m.lora_A.grad.abs().sum()) == 0.0
    assert m.base.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device):
    m = _make("linear", 24, 40, (1.0, 3.0), 2, device, torch.float32, backend)
    x = torch.randn(24, 11, device=device).t()  # (11, 24), strided
    y = m(x)
    ref = lowrank_ref(x, m.base.weight, m.base.bias, m.lora_A, m.lora_B, m.scale_vector, m.scaling)
    _close(y, ref, torch.float32, "forward")


def test_autocast_bf16_cpu():
    m = _make("linear", 32, 24, (1.0, 2.0), 1, "cpu", torch.float32, "torch")
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = lowrank_ref(x, m.base.weight, m.base.bias, m.lora_A, m.lora_B, m.scale_vector, m.scaling)
    _close(y, ref, torch.bfloat16, "autocast forward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_reused_in_backward(p, backend, device):
    m = _make("linear", 37, 19, (1.0, 2.0), 2, device, torch.float32, backend, dropout=p)
    ops = _ops(backend, device)
    x = torch.randn(29, 37, device=device, requires_grad=True)
    seed = 1234
    scale = m.scaling * m.scale_vector
    y = MuScleLinearFunction.apply(x, m.lora_A, m.lora_B, scale, m.base, m.kind, ops, p, seed, None, m)
    mask = ops.dropout_mask(29, 37, p, seed, x.device)
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 0.08, f"keep rate {keep:.3f} for p={p}"
    xr = x.detach().double().requires_grad_(True)
    Ar = m.lora_A.detach().double().requires_grad_(True)
    Br = m.lora_B.detach().double().requires_grad_(True)
    ref = lowrank_ref(xr, m.base.weight, m.base.bias, Ar, Br, m.scale_vector, m.scaling, mask=mask, p=p)
    _close(y, ref, torch.float32, "forward with dropout")
    gy = torch.randn_like(ref)
    y.backward(gy.float())
    ref.backward(gy)
    _close(x.grad, xr.grad, torch.float32, "dX with dropout")
    _close(m.lora_A.grad, Ar.grad, torch.float32, "dA with dropout")
    _close(m.lora_B.grad, Br.grad, torch.float32, "dB with dropout")
    other = ops.dropout_mask(29, 37, p, seed + 1, x.device)
    assert not torch.equal(mask, other)


def test_dropout_only_in_training():
    m = _make("linear", 16, 8, (1.0,), 2, "cpu", torch.float32, "torch", dropout=0.5)
    x = torch.randn(4, 16)
    m.eval()
    ref = lowrank_ref(x, m.base.weight, m.base.bias, m.lora_A, m.lora_B, m.scale_vector, m.scaling)
    _close(m(x), ref, torch.float32, "eval forward ignores dropout")
    m.train()
    assert not torch.allclose(m(x), ref.float())


def test_plain_lora_is_scales_one():
    m = _make("linear", 16, 8, (1.0,), 4, "cpu", torch.float32, "torch")
    assert m.lora_A.shape == (4, 16) and m.lora_B.shape == (8, 4)
    assert m.scaling == pytest.approx(6.0 / 4)
    torch.testing.assert_close(m.scale_vector, torch.ones(4))
    ms = _make("linear", 16, 8, (1.0, 4.0, 8.0), 2, "cpu", torch.float32, "torch")
    assert ms.lora_A.shape == (6, 16)
    torch.testing.assert_close(ms.scale_vector, torch.tensor([1.0, 1, 4, 4, 8, 8]))
    dw = ms.delta_weight().double()
    ref = ms.scaling * ms.lora_B.double() @ torch.diag(ms.scale_vector.double()) @ ms.lora_A.double()
    torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-6)


def test_init_lora_b_zero_mslr_kaiming():
    lora = MuScleLinear(nn.Linear(16, 8), (1.0,), 4, 32.0)
    assert float(lora.lora_B.detach().abs().sum()) == 0.0 and float(lora.lora_A.detach().abs().sum()) > 0
    mslr = MuScleLinear(nn.Linear(16, 8), (1.0, 2.0), 1, 6.0, init_B="kaiming")
    assert float(mslr.lora_B.detach().abs().sum()) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(scales=()), "must not be empty"),
        (dict(scales=(1.0, -2.0)), r"finite and > 0, got \[-2.0\]"),
        (dict(scales=(0.0,)), "finite and > 0"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(init_B="ones"), "init_B must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
    ids=[
        "r0",
        "empty-scales",
        "negative-scale",
        "zero-scale",
        "alpha0",
        "dropout1",
        "dropout-neg",
        "init",
        "backend",
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuScleLinear(nn.Linear(4, 4), **kwargs)


def test_unsupported_base_names_type():
    with pytest.raises(TypeError, match=r"MuScleLinear\(emb\).*torch.nn.modules.sparse.Embedding"):
        MuScleLinear(nn.Embedding(10, 4), name="emb")


def test_wrong_input_width():
    m = MuScleLinear(nn.Linear(8, 4), name="layer.q")
    with pytest.raises(ValueError, match=r"MuScleLinear\(layer.q\): input last dim 5 != in_features 8"):
        m(torch.randn(2, 5))


def test_unfrozen_base_is_an_error():
    m = MuScleLinear(nn.Linear(8, 4), name="q")
    m.base.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="base layer must stay frozen"):
        m(torch.randn(2, 8))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    from csrc_triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    m = MuScleLinear(nn.Linear(8, 4), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        m(torch.randn(2, 8))


def test_env_overrides_backend(monkeypatch):
    m = MuScleLinear(nn.Linear(8, 4), backend="torch")
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="MUSCLE_FAST_BACKEND must be one of"):
        m(torch.randn(2, 8))
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "triton")
    from csrc_triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # env picked triton over the module's torch
        m(torch.randn(2, 8))


def test_meta_base_weight_is_an_error():
    """An offloaded (accelerate) or unmaterialized layer: the adapters would be created on meta and
    the forward would fail far from the cause."""
    with pytest.raises(ValueError, match=r"MuScleLinear\(q\): the base weight is on the meta device"):
        MuScleLinear(nn.Linear(8, 4, device="meta"), name="q")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_intermediates_beyond_fp16_range(backend):
    """S = x @ A^T * scale ~ 1.1e5 and dB summed over 4096 rows ~ 8e4 pass fp16's 65504 while y and
    dx fit: both backends keep them in fp32 (the torch path rounded S and dB to fp16: inf)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on the CPU needs the interpreter")
    torch.manual_seed(0)
    m = MuScleLinear(nn.Linear(64, 8).half(), scales=(1, 28), r=1, alpha=6, init_B="kaiming", backend=backend)
    with torch.no_grad():
        m.lora_A.fill_(1.0)
        m.lora_B.fill_(1e-3)
    x = torch.full((4096, 64), 12.0, dtype=torch.float16, requires_grad=True)
    y = m(x)
    y.float().sum().backward()
    # float64 reference of the same layer
    xd = x.detach().double()
    W, b = m.base.weight.double(), m.base.bias.double()
    S = (xd @ m.lora_A.double().t()) * m.scale_vector.double() * m.scaling
    want_y = xd @ W.t() + b + S @ m.lora_B.double().t()
    want_dB = torch.ones(4096, 8, dtype=torch.float64).t() @ S
    assert S.abs().max() > 65504 and want_dB.abs().max() > 65504
    torch.testing.assert_close(y.double(), want_y, rtol=2e-3, atol=0)
    torch.testing.assert_close(m.lora_B.grad.double(), want_dB, rtol=2e-3, atol=0)
    assert torch.isfinite(x.grad).all()


def test_auto_backend_takes_float64_to_the_torch_path():
    """On CUDA "auto" means the kernels, which take fp32/bf16/fp16 only: float64 goes to the exact
    torch path instead of failing (no GPU needed: the choice is made on the device type)."""
    cuda = torch.device("cuda", 0)
    assert lowrank.get_ops("auto", cuda, torch.float64) is lowrank.TORCH_OPS
    assert lowrank.get_ops("auto", cuda, torch.float32) is lowrank.accumulate_ops()
    assert lowrank.get_ops("triton", cuda, torch.float32) is lowrank.triton_ops()
    assert lowrank.get_ops("torch", cuda, torch.float32) is lowrank.TORCH_OPS
    assert lowrank.get_ops("auto", torch.device("cpu"), torch.float32) is lowrank.TORCH_OPS


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float64_torch_path_is_exact(dropout):
    """The torch path is the reference: in float64 every intermediate (S, dS, dA, dB, the scales)
    stays float64, so the layer equals the float64 formula to rounding (not fp32's ~1e-7)."""
    K, N, r, scales, alpha = 37, 23, 3, (1.0, 0.1, 7.0), 16.0
    base = nn.Linear(K, N).double()
    m = MuScleLinear(base, scales, r, alpha, dropout=dropout, init_B="kaiming", adapter_dtype=torch.float64)
    m.train()
    x = (torch.randn(11, K, dtype=torch.float64) * 100).requires_grad_(True)
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)  # the same seed draw: the reference regenerates the layer's dropout mask
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout else 0
    from muscle_fast.ops.lowrank import dropout_mask

    keep = dropout_mask(11, K, dropout, seed, "cpu").double() / (1 - dropout) if dropout else 1.0
    xr = x.detach().clone().requires_grad_(True)
    A = m.lora_A.detach().clone().requires_grad_(True)
    B = m.lora_B.detach().clone().requires_grad_(True)
    kvec = torch.tensor([k for k in scales for _ in range(r)], dtype=torch.float64)
    ref = xr @ base.weight.T + base.bias + (((xr * keep) @ A.T) * (alpha / r * kvec)) @ B.T
    gy = torch.randn_like(ref)
    y.backward(gy)
    ref.backward(gy)
    for got, want in ((y, ref), (x.grad, xr.grad), (m.lora_A.grad, A.grad), (m.lora_B.grad, B.grad)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize(
    "dtype, dropout, expands",
    [(torch.float32, 0.0, 0), (torch.bfloat16, 0.0, 0), (torch.bfloat16, 0.2, 1), (torch.float16, 0.0, 2)],
    ids=["fp32", "bf16", "bf16-dropout", "fp16"],
)
@pytest.mark.parametrize("pick", ["default", "cublas"])
def test_accumulate_ops_leave_the_low_rank_terms_to_cublas(
    dtype, dropout, expands, pick, device, monkeypatch
):
    """accumulate_ops run neither expand_ nor dx_ for fp32/bf16 (the base GEMM adds into the cuBLAS
    low-rank term), dx_ only under dropout (its mask lives in the kernel), both for fp16 (whose
    range cannot hold S), and give the float64 formula's result either way, with the reductions'
    Triton kernels or their cuBLAS twins (``pick``)."""
    monkeypatch.setenv("MUSCLE_FAST_PICK", pick)
    calls: list[str] = []

    def counted(name: str, fn):
        def run(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return run

    seen: dict[str, torch.Tensor] = {}

    def recorded(name: str, fn):
        def run(*args, **kwargs):
            seen[name] = args[2] if name == "S" else args[0]
            return fn(*args, **kwargs)

        return run

    base = lowrank.accumulate_ops()
    ops = base._replace(
        expand_=counted("expand_", base.expand_),
        dx_=counted("dx_", base.dx_),
        backward_dS_dB=recorded("S", base.backward_dS_dB),
        grad_A=recorded("dS", base.grad_A),
    )
    m = _make("linear", 37, 21, (1.0, 2.0), 2, device, dtype, "triton", dropout=dropout)
    x = torch.randn(19, 37, device=device, dtype=dtype, requires_grad=True)
    seed = 77
    y = MuScleLinearFunction.apply(
        x, m.lora_A, m.lora_B, m.scaling * m.scale_vector, m.base, m.kind, ops, dropout, seed, None, m
    )
    gy = torch.randn_like(y)
    y.backward(gy)
    assert len(calls) == expands, calls
    # S and dS are rounded once to the compute dtype where cuBLAS multiplies them (fp32 and bf16); the
    # backward's reductions take those rounded values: dB is the exact gradient of the forward that ran.
    rounded = dtype if dtype != torch.float16 else torch.float32
    assert seen["S"].dtype == seen["dS"].dtype == rounded
    dB = gy.double().reshape(-1, 21).T @ seen["S"].double()
    # exact products summed in fp32; fp16's dY takes the hi + lo split with S (2**-16 per product). The
    # cuBLAS twin's bf16 products come out in fp32 on CUDA only (torch.mm's out_dtype); on the CPU rounded.
    tol = 2**-8 if m.lora_B.dtype != torch.float32 else (1e-5 if dtype != torch.float16 else 5e-5)
    if pick == "cublas" and dtype == torch.bfloat16 and not x.is_cuda:
        tol = 2**-8
    assert_rel_close(m.lora_B.grad, dB, tol, "dB")
    mask = ops.dropout_mask(19, 37, dropout, seed, x.device) if dropout else None
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    ref = lowrank_ref(xr, m.base.weight, m.base.bias, Ar, Br, m.scale_vector, m.scaling, mask=mask, p=dropout)
    ref.backward(gy.double())
    _close(y, ref, dtype, "forward")
    _close(x.grad, xr.grad, dtype, "dX")
    _close(m.lora_A.grad, Ar.grad, dtype, "dA")
    _close(m.lora_B.grad, Br.grad, dtype, "dB")


@pytest.mark.parametrize("row_split", [-1, 6])
def test_row_split_outside_the_batch_names_the_module(row_split):
    """The kernels trust the row split (their launch checks are skipped): one outside the batch is an
    error naming the module and the shape, raised before any kernel runs."""
    from muscle_fast.ops.lowrank import split_rows

    m = _make("linear", 8, 4, (1.0,), 2, "cpu", torch.float32, "torch")
    m.name = "encoder.layer.0.query"
    x = torch.randn(5, 3, 8)
    with (
        split_rows(row_split, lambda *a: None),
        pytest.raises(ValueError, match=r"encoder.layer.0.query.*\(5, 3, 8\)"),
    ):
        m(x)


def test_triton_backend_refuses_float64_by_name(device):
    """The op table's launchers skip their dtype checks: backend "triton" on float64 is refused at
    dispatch with the dtype named, before any kernel runs."""
    m = MuScleLinear(nn.Linear(8, 4).double().to(device), (1.0,), 2, 4.0, backend="triton")
    with pytest.raises(TypeError, match=r"float32/float16/bfloat16 inputs, got torch.float64"):
        m(torch.randn(3, 8, dtype=torch.float64, device=device))


def test_accumulate_input_grad_under_autocast_keeps_the_compute_dtype():
    """A backward called inside autocast (a 4-bit layer computing in fp32 under bf16 autocast): the
    accumulate path's cuBLAS term must stay in dY's dtype, or addmm_ into it fails."""
    ops = lowrank.TORCH_OPS._replace(accumulate=True)
    dY, W, dS, A = torch.randn(6, 5), torch.randn(5, 7), torch.randn(6, 3), torch.randn(3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dX = lowrank.input_grad(ops, dY, W, dS, A, 0.0, 0)
    assert dX.dtype == torch.float32
    torch.testing.assert_close(dX, dY @ W + dS @ A)


@pytest.mark.parametrize("backend", ["accumulate-fused"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_fused_gemm_runs_where_its_operands_fit(kind, backend, device, monkeypatch):
    """In bf16 with 16-byte rows and 128 rows or more the pinned fused GEMM computes the forward and dX
    (W read as Linear's (N, K) rows or Conv1D's (K, N) rows), bias included, within an ulp or two of the
    cuBLAS composition (the same roundings, another summation order; the interpreter truncates where
    cuBLAS rounds). 18-byte rows (K = 9) and fewer rows leave both GEMMs to the composition."""
    m = _make(kind, 40, 24, (1.0, 2.0), 3, device, torch.bfloat16, backend)
    with torch.no_grad():
        m.base.bias.normal_(0.0, 4.0)  # a bias the size of the output: a lost or misread one shows
    x = torch.randn(2, 70, 40, device=device, dtype=torch.bfloat16)
    gy = torch.randn(2, 70, 24, device=device, dtype=torch.bfloat16)
    outs = []
    for pick in ("cublas", "fused"):
        monkeypatch.setenv("MUSCLE_FAST_PICK", pick)
        lowrank.measure.forget_all()
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(gy)
        outs.append((y, xi.grad))
        choices = lowrank.measured_choices()
        for op in ("lowrank.linear", "lowrank.linear_dx"):
            assert [r["chosen"] for r in choices[op]] == [pick], (op, choices[op])
    for (composed, fused), what in zip(zip(*outs, strict=True), ("forward", "dX"), strict=True):
        # two roundings (the low-rank term's, the sum's), each up to an ulp apart, of terms as large as
        # the largest output: within 2^-6 of it; a lost bias element or tile is off by ~1-10 (of ~15)
        off = float((fused.float() - composed.float()).abs().max())
        assert off <= 2.0**-6 * float(composed.float().abs().max()), (what, off)
    monkeypatch.setenv("MUSCLE_FAST_PICK", "fused")
    lowrank.measure.forget_all()
    m(x.clone().requires_grad_(True)).sum().backward()  # dY: one broadcast row (stride 0), not for TMA
    assert [r["chosen"] for r in lowrank.measured_choices()["lowrank.linear"]] == ["fused"]
    assert lowrank.measured_choices()["lowrank.linear_dx"] == []
    for k, rows in ((9, 140), (40, 127)):
        lowrank.measure.forget_all()
        other = _make(kind, k, 24, (1.0,), 2, device, torch.bfloat16, backend)
        xo = torch.randn(rows, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        other(xo).backward(torch.randn(rows, 24, device=device, dtype=torch.bfloat16))
        choices = lowrank.measured_choices()
        assert choices["lowrank.linear"] == choices["lowrank.linear_dx"] == [], (k, rows)


@pytest.mark.parametrize("backend", ["accumulate-fused"])
def test_without_tma_descriptors_the_composition_runs(backend, device, monkeypatch):
    """A Triton without host-side TMA descriptors (older than 3.4) cannot build the fused GEMM: even
    pinned, both GEMMs stay with the cuBLAS composition, and the layer is exact as before."""
    monkeypatch.setattr(lowrank, "_fused_gemm", lambda: None)
    m = _make("linear", 40, 24, (1.0,), 2, device, torch.bfloat16, backend)
    x = torch.randn(130, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.backward(torch.randn_like(y))
    choices = lowrank.measured_choices()
    assert choices["lowrank.linear"] == choices["lowrank.linear_dx"] == []
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
