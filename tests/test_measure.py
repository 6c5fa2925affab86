"""The measured choice between a reduction's Triton kernel and its cuBLAS twin (``backend="auto"``)."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from helpers import assert_rel_close
from torch import nn

from muscle_fast import MuScleLinear
from muscle_fast.ops import lowrank, measure

CUDA = torch.cuda.is_available()


class FakeTimer:
    """Reports fixed figures per candidate position and counts its calls."""

    def __init__(self, figures: list[float]) -> None:
        self.figures = figures
        self.calls = 0

    def __call__(self, fns, reps):
        self.calls += 1
        return list(self.figures[: len(fns)])


def _op(timer, ran: list[str] | None = None, key=lambda x, **kw: (x.shape[0],)) -> measure.Measured:
    def cand(name):
        def run(x, **kw):
            if ran is not None:
                ran.append(name)
            return name

        return run

    return measure.Measured(
        "test.op", {"triton": cand("triton"), "cublas": cand("cublas")}, key, "triton", timer=timer
    )


@pytest.fixture(autouse=True)
def _no_pick_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MUSCLE_FAST_PICK from outside (conftest forgets the choices after each test)."""
    monkeypatch.delenv(measure.ENV, raising=False)


def test_the_faster_candidate_runs_and_is_measured_once_per_key():
    timer = FakeTimer([2.0, 1.0])  # default (triton) first, then cublas
    op = _op(timer)
    x = torch.zeros(3)
    assert op(x) == "cublas" and op(x) == "cublas"
    assert timer.calls == 1
    assert op(torch.zeros(5)) == "cublas" and timer.calls == 2  # a new key measures again
    (row,) = [r for r in measure.choices(op)["test.op"] if r["key"] == ["3"]]
    assert row["chosen"] == "cublas" and row["ms"] == {"triton": 2.0, "cublas": 1.0}
    assert measure.choices(op)["test.op"][0]["key"] == ["3"]
    op.forget()
    op(x)
    assert timer.calls == 3


def test_a_tie_keeps_the_default_and_a_slower_twin_loses():
    assert _op(FakeTimer([1.0, 1.0]))(torch.zeros(2)) == "triton"
    assert _op(FakeTimer([1.0, 3.0]))(torch.zeros(2)) == "triton"


def test_no_key_runs_the_default_unmeasured():
    timer = FakeTimer([5.0, 1.0])
    op = _op(timer, key=lambda x, **kw: None)
    assert op(torch.zeros(2)) == "triton" and timer.calls == 0


def test_off_cuda_without_a_timer_the_default_runs_unmeasured():
    ran: list[str] = []
    op = _op(None, ran)
    assert op(torch.zeros(2)) == "triton" and ran == ["triton"]
    assert measure.choices(op)["test.op"][0]["ms"] is None


@pytest.mark.parametrize("mode, want", [("default", "triton"), ("cublas", "cublas"), ("triton", "triton")])
def test_the_env_var_pins_the_choice(monkeypatch, mode, want):
    timer = FakeTimer([2.0, 1.0])
    op = _op(timer)
    monkeypatch.setenv(measure.ENV, mode)
    assert op(torch.zeros(2)) == want and timer.calls == 0
    monkeypatch.setenv(measure.ENV, "measure")  # read when a key is first seen: kept until forgotten
    assert op(torch.zeros(2)) == want and timer.calls == 0
    measure.forget_all()
    assert op(torch.zeros(2)) == "cublas" and timer.calls == 1


def test_a_bad_env_value_names_the_variable_and_the_choices(monkeypatch):
    op = _op(FakeTimer([1.0, 1.0]))
    monkeypatch.setenv(measure.ENV, "cuBLAS")
    want = r"MUSCLE_FAST_PICK must be one of \['measure', 'default', .*'cublas', .*'triton'\], got 'cuBLAS'"
    want += r" \(at test.op\)"
    with pytest.raises(ValueError, match=want):
        op(torch.zeros(2))


def test_the_default_must_be_a_candidate():
    with pytest.raises(ValueError, match="default 'x' is not one of"):
        measure.Measured("test.op", {"a": print}, lambda *a: (), "x")


def test_keys_leave_dropout_fp16_to_the_kernels_and_tell_groups_apart():
    x = torch.zeros(300, 48, dtype=torch.bfloat16)
    A = torch.zeros(16, 48)
    s = torch.ones(16)
    assert lowrank._shrink_key(x, A, s, dropout_p=0.1) is None
    assert lowrank._shrink_key(x.half(), A, s) is None
    assert lowrank._shrink_key(x, A, s)[3:] == (512, 48, 16)  # rows bucketed like the autotuner's key
    assert lowrank._shrink_key(x[:257], A, s) == lowrank._shrink_key(x, A, s)
    dY, B, S = torch.zeros(300, 40, dtype=torch.bfloat16), torch.zeros(40, 16), torch.zeros(300, 16)
    S16 = S.bfloat16()
    assert lowrank._dS_dB_key(dY, B, S16, s) != lowrank._dS_dB_key(dY, B, S16, s, row_split=100)
    assert lowrank._dS_dB_key(dY, B, S, s) is None  # an fp32 S the twin would round: the kernel's hi + lo
    assert lowrank._grad_A_key(S16, x, dropout_p=0.5) is None
    assert lowrank._grad_A_key(S, x) is None
    assert lowrank._grad_A_key(S16, x) != lowrank._grad_A_key(S16, x, row_split=7)


def _fp32_precision_state() -> tuple:
    m = torch.backends.cuda.matmul
    return (getattr(m, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None))


@contextlib.contextmanager
def _tf32(api: str = "legacy"):
    """TF32 allowed through one of torch's APIs inside the block, the settings restored after."""
    before = _fp32_precision_state()
    try:
        if api == "legacy":
            torch.set_float32_matmul_precision("high")
        elif api == "per-backend":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.backends.fp32_precision = "tf32"
        yield
    finally:
        if before[0] is None:
            torch.set_float32_matmul_precision("highest")
        else:
            torch.backends.fp32_precision = before[1]
            torch.backends.cuda.matmul.fp32_precision = before[0]


@pytest.mark.parametrize("api", ["legacy", "per-backend", "global"])
def test_fp32_twins_only_without_tf32(api):
    """With TF32 allowed (HF's tf32=True), cuBLAS's fp32 GEMMs round their inputs to 10 bits and the
    kernels do not: fp32 is then left to the kernels. Through either of torch's APIs (after the newer
    one is used, the legacy getter raises)."""
    if api != "legacy" and _fp32_precision_state()[0] is None:
        pytest.skip("this torch has no fp32_precision setting")
    x, A, s = torch.zeros(8, 4), torch.zeros(2, 4), torch.ones(2)
    assert lowrank._shrink_key(x, A, s) is not None
    with _tf32(api):
        assert lowrank._shrink_key(x, A, s) is None
        assert lowrank._grad_A_key(torch.zeros(8, 2), x) is None
    assert lowrank._shrink_key(x, A, s) is not None


def test_twins_run_outside_autocast():
    """A backward under autocast (a 4-bit layer in fp32 under bf16 autocast): the twin must not cast
    its fp32 products to bf16, as the kernel does not."""
    x = torch.randn(64, 300)
    A = torch.randn(16, 300)
    twin = lowrank.accumulate_ops().shrink.candidates["cublas"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        S = twin(x, A, torch.ones(16))
    assert S.dtype == torch.float32
    assert_rel_close(S, x.double() @ A.double().t(), 1e-5, "S under autocast")


def test_fp32_cublas_output_only_where_cublas_has_it():
    assert not lowrank._fp32_out(torch.device("cpu"))
    assert lowrank._MM_OUT_DTYPE == (
        tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_layer_measures_its_reductions_and_matches_the_reference(dtype, device, monkeypatch):
    """accumulate_ops with a timer that makes the cuBLAS twins win (a real CUDA measurement on a GPU):
    every reduction is measured once per shape, then the twin runs, and the layer's output and
    gradients are the float64 formula's, including the single-pass alignment's row groups."""
    from reference import lowrank_ref

    ops = lowrank.accumulate_ops()
    steps = (ops.shrink, ops.backward_dS_dB, ops.grad_A)
    timers = [FakeTimer([3.0, 1.0]) for _ in steps]
    for step, timer in zip(steps, timers, strict=True):
        monkeypatch.setattr(step, "timer", None if CUDA else timer)
        step.forget()
    triton_calls: list[str] = []
    for step in steps:

        def counted(*a, _k=step.candidates["triton"], _n=step.op, **kw):
            triton_calls.append(_n)
            return _k(*a, **kw)

        monkeypatch.setitem(step.candidates, "triton", counted)
    base = nn.Linear(37, 21).to(device=device, dtype=dtype)
    m = MuScleLinear(base, (1.0, 2.0), 2, 6.0, init_B="kaiming")
    m.train()
    x = torch.randn(19, 37, device=device, dtype=dtype, requires_grad=True)
    sunk: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _ in range(2):
        x.grad = None
        m.zero_grad()
        with lowrank.split_rows(12, lambda mod, dA, dB: sunk.append((dA, dB))):
            y = lowrank.MuScleLinearFunction.apply(
                x, m.lora_A, m.lora_B, m.scaling * m.scale_vector, m.base, m.kind, ops, 0.0, 0,
                lowrank.current_split(), m,
            )  # fmt: skip
        gy = torch.randn_like(y)
        y.backward(gy)
    if not CUDA:
        assert [t.calls for t in timers] == [1, 1, 1]  # measured once, on the first step
        # the agreement check (on random inputs) and the warm-up ran each kernel once; then only the twins
        assert sorted(triton_calls) == sorted(2 * [s.op for s in steps])
    chosen = lowrank.measured_choices()
    assert {row["chosen"] for rows in chosen.values() for row in rows} <= {"triton", "cublas"}
    assert all(len(chosen[s.op]) >= 1 for s in steps)
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    ref = lowrank_ref(xr, base.weight, base.bias, Ar, Br, m.scale_vector, m.scaling)
    tol = 2e-5 if dtype == torch.float32 else 2.5e-2
    assert_rel_close(y, ref, tol, "forward")
    (ref[:12] * gy[:12].double()).sum().backward()  # the training rows' gradient goes to .grad
    assert_rel_close(m.lora_A.grad, Ar.grad, tol, "dA")
    assert_rel_close(m.lora_B.grad, Br.grad, tol, "dB")
    Ar.grad = Br.grad = None
    xr2, Ar2, Br2 = (t.detach().double().requires_grad_(True) for t in (x, m.lora_A, m.lora_B))
    ref2 = lowrank_ref(xr2, base.weight, base.bias, Ar2, Br2, m.scale_vector, m.scaling)
    (ref2[12:] * gy[12:].double()).sum().backward()  # and the reference rows' to the sink
    dA_ref, dB_ref = sunk[-1]
    assert_rel_close(dA_ref, Ar2.grad, tol, "reference dA")
    assert_rel_close(dB_ref, Br2.grad, tol, "reference dB")


@pytest.mark.skipif(not CUDA, reason="torch.mm's out_dtype runs on CUDA only")
def test_torch_path_keeps_bf16_products_in_fp32_on_cuda():
    """The torch path's S on bf16 CUDA operands comes straight from cuBLAS's fp32 accumulator: within
    fp32 summation error of the float64 product, not a bf16 rounding (2**-9) of it."""
    x = torch.randn(257, 300, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 300, device="cuda", dtype=torch.bfloat16)
    S = lowrank.lowrank_shrink(x, A, torch.ones(16, device="cuda"))
    assert S.dtype == torch.float32
    assert_rel_close(S, x.double() @ A.double().t(), 1e-4, "S")  # a bf16 rounding: ~2e-3


@pytest.mark.skipif(not CUDA, reason="measures CUDA event times")
def test_cuda_times_returns_one_median_per_candidate():
    a = torch.randn(2048, 2048, device="cuda")
    small, big = (lambda: a[:64] @ a[:, :64]), (lambda: a @ a)
    got = measure.cuda_times([big, small], 5)
    assert len(got) == 2 and got[1] < got[0]


def _linear4bit(
    i: int,
    o: int,
    nested: bool,
    device: str,
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    quant_type: str = "nf4",
):
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(i, o)
    q = bnb.nn.Linear4bit(i, o, compute_dtype=dtype, quant_type=quant_type, compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(
        lin.weight.data.to(dtype), requires_grad=False, quant_type=quant_type, compress_statistics=nested,
        blocksize=blocksize, module=q,
    )  # fmt: skip
    return q.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0.0 and 0.0 differ)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.skipif(CUDA, reason="a fake timer: on CUDA the pinned test below compares the bits")
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_auto_4bit_dequantization_measures_bitsandbytes_against_ours(nested, monkeypatch):
    """A 4-bit layer comes with bitsandbytes, so "auto" measures its dequantization against ours (a fake
    timer makes it win here) and runs it from then on, into the same buffer. A compute dtype other than
    the state's (which bitsandbytes cannot write) runs our kernel unmeasured."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(201, 23, nested, "cpu")  # 4,623 values: odd, a partial last block
    qs = q.weight.quant_state
    timer = FakeTimer([2.0, 1.0])
    monkeypatch.setattr(mnf4._dequantize_into, "timer", timer)
    ours = mnf4.dequantize_weight(q, qs.dtype, kernels=True, measured=False).clone()
    mnf4.dequantize_weight(q, qs.dtype, kernels=True, measured=True).fill_(float("nan"))  # chooses
    picked = mnf4.dequantize_weight(q, qs.dtype, kernels=True, measured=True)  # the chosen one alone
    assert torch.equal(_bits(picked), _bits(ours))
    (row,) = measure.choices(mnf4._dequantize_into)["nf4.dequantize_weight"]
    assert row["chosen"] == "bitsandbytes" and timer.calls == 1
    mnf4.dequantize_weight(q, torch.bfloat16, kernels=True, measured=True)
    assert len(measure.choices(mnf4._dequantize_into)["nf4.dequantize_weight"]) == 1  # no second key
    assert timer.calls == 1


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_bitsandbytes_dequantization_writes_our_bits(nested, dtype, blocksize, device, monkeypatch):
    """The bitsandbytes candidate, pinned, writes the very bits our kernel writes (nf4: no negative zero),
    for every output dtype, both absmax forms, an odd size with a partial last block."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(201, 23, nested, device, dtype, blocksize)
    qs = q.weight.quant_state
    ours = mnf4.dequantize_weight(q, dtype, kernels=True, measured=False).clone()
    monkeypatch.setenv(measure.ENV, "bitsandbytes")
    buf = mnf4.dequantize_weight(q, dtype, kernels=True, measured=True)
    buf.fill_(float("nan"))
    got = mnf4.dequantize_weight(q, dtype, kernels=True, measured=True)
    assert measure.choices(mnf4._dequantize_into)["nf4.dequantize_weight"][0]["chosen"] == "bitsandbytes"
    assert qs.dtype == dtype and torch.equal(_bits(got), _bits(ours))


def test_bitsandbytes_dequantization_only_where_it_reads_the_state_as_we_do():
    """No bitsandbytes candidate for fp4 (it writes -0.0 where we write 0.0), a non-fp32 absmax or a
    custom code table (its kernel reads raw fp32 pointers and the built-in table), or another dtype."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(64, 16, False, "cpu")
    A, qs = q.weight.data, q.weight.quant_state
    key = mnf4._dequant_key
    assert key(A, q, qs, qs.dtype, None) is not None
    assert key(A, q, qs, torch.bfloat16, None) is None
    fp4 = _linear4bit(64, 16, False, "cpu", quant_type="fp4")
    assert key(fp4.weight.data, fp4, fp4.weight.quant_state, torch.float32, None) is None
    absmax = qs.absmax
    qs.absmax = absmax.bfloat16()
    assert key(A, q, qs, qs.dtype, None) is None
    qs.absmax = absmax
    code = qs.code
    qs.code = code.flip(0)
    assert key(A, q, qs, qs.dtype, None) is None
    qs.code = code
    assert key(A, q, qs, qs.dtype, None) is not None


@pytest.mark.parametrize("pick, want", [("bitsandbytes", "bitsandbytes"), ("cublas", "triton")])
def test_a_pinned_candidate_applies_where_an_op_offers_it(pick, want, device, monkeypatch):
    """MUSCLE_FAST_PICK=cublas pins the low-rank reductions and leaves the 4-bit dequantization at its
    default (it has no cuBLAS candidate), and the reverse for bitsandbytes."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(64, 16, False, device)
    monkeypatch.setenv(measure.ENV, pick)
    mnf4.dequantize_weight(q, q.weight.quant_state.dtype, kernels=True, measured=True)
    assert measure.choices(mnf4._dequantize_into)["nf4.dequantize_weight"][0]["chosen"] == want
    ops = lowrank.accumulate_ops()
    x = torch.randn(5, 64, device=device)
    ops.shrink(x, torch.randn(4, 64, device=device), torch.ones(4, device=device))
    (row,) = measure.choices(ops.shrink)["lowrank.shrink"]
    assert row["chosen"] == ("cublas" if pick == "cublas" else "triton")


def test_a_failing_twin_is_left_out_and_a_failing_default_raises(caplog):
    """A twin the setup cannot run (cuBLAS's fp32-output bf16 GEMM on a pre-Ampere GPU, ROCm) is left
    out with a warning; the default's own error is the op's error."""

    def broken(x):
        raise RuntimeError("not supported here")

    timer = FakeTimer([1.0])
    cands = {"triton": lambda x: "triton", "cublas": broken}
    op = measure.Measured("test.op", cands, lambda x: (1,), "triton", timer=timer)
    with caplog.at_level("WARNING", logger="muscle_fast.ops.measure"):
        assert op(torch.zeros(1)) == "triton" and op(torch.zeros(1)) == "triton"
    assert "candidate 'cublas' failed" in caplog.text and "not supported here" in caplog.text
    assert timer.calls == 0 and op.chosen == {(1,): "triton"}  # nothing left to measure against
    cands = {"triton": broken, "cublas": lambda x: 0}
    bad = measure.Measured("test.op", cands, lambda x: (1,), "triton", timer=timer)
    with pytest.raises(RuntimeError, match="not supported here"):
        bad(torch.zeros(1))


def test_a_candidate_that_computes_something_else_is_left_out(caplog):
    """A candidate faster than the default but off by more than rounding (a kernel miscompiled on some
    GPU or Triton, here one that loses its last row tile) is never chosen; one within rounding is."""
    x = torch.randn(64, 32)
    good = lambda x: x * 3  # noqa: E731
    near = lambda x: (x.bfloat16() * 3).float()  # noqa: E731 - off by bf16 rounding
    lost = lambda x: torch.cat([x[:-8] * 3, torch.zeros_like(x[-8:])])  # noqa: E731
    key = lambda x: (1,)  # noqa: E731
    timer = FakeTimer([2.0, 1.0])
    op = measure.Measured("test.op", {"triton": good, "cublas": lost}, key, "triton", timer=timer)
    with caplog.at_level("WARNING", logger="muscle_fast.ops.measure"):
        torch.testing.assert_close(op(x), x * 3)
    assert "candidate 'cublas' disagrees with 'triton'" in caplog.text
    assert "largest difference" in caplog.text and "x largest |value|" in caplog.text
    assert op.chosen == {(1,): "triton"} and timer.calls == 0
    for cast in (torch.float32, torch.bfloat16):
        pair = {"triton": lambda x, c=cast: good(x).to(c), "cublas": lambda x, c=cast: near(x).to(c)}
        op = measure.Measured("test.op", pair, key, "triton", timer=timer)
        op(x)
        assert op.chosen == {(1,): "cublas"}, cast
    assert timer.calls == 2


def test_a_broken_default_loses_to_the_reference(caplog):
    """The reference (the library's implementation: cuBLAS for the reductions) is what candidates are
    checked against, the default included: a Triton kernel that loses a tile is not kept, even where
    it is faster, and the reference runs."""
    x = torch.randn(64, 32)
    lost = lambda x: torch.cat([x[:-8] * 3, torch.zeros_like(x[-8:])])  # noqa: E731
    timer = FakeTimer([1.0, 2.0])
    cands = {"triton": lost, "cublas": lambda x: x * 3}
    op = measure.Measured("test.op", cands, lambda x: (1,), "triton", reference="cublas", timer=timer)
    with caplog.at_level("WARNING", logger="muscle_fast.ops.measure"):
        torch.testing.assert_close(op(x), x * 3)
    assert "candidate 'triton' disagrees with 'cublas'" in caplog.text
    assert op.chosen == {(1,): "cublas"} and timer.calls == 0
    with pytest.raises(ValueError, match="reference 'x' is not one of"):
        measure.Measured("test.op", cands, lambda x: (1,), "triton", reference="x")


def test_candidates_are_compared_on_probe_inputs(caplog):
    """LoRA's B starts at zero, so on the first step a candidate that ignores it computes the right
    (zero) low-rank term: the comparison runs on random inputs of the same layout (``random_args``)
    and catches it; the timing and the result use the real inputs."""
    x, B = torch.randn(16, 8), torch.zeros(8, 4)
    good = lambda x, B: x @ B  # noqa: E731
    ignores_b = lambda x, B: torch.zeros(x.shape[0], B.shape[1])  # noqa: E731
    key = lambda x, B: (1,)  # noqa: E731
    blind = measure.Measured("test.op", {"triton": good, "cublas": ignores_b}, key, "triton",
                             timer=FakeTimer([2.0, 1.0]))  # fmt: skip
    assert blind(x, B).abs().sum() == 0 and blind.chosen == {(1,): "cublas"}  # zeros hide the bug
    probed = measure.Measured("test.op", {"triton": good, "cublas": ignores_b}, key, "triton",
                              timer=FakeTimer([2.0, 1.0]), probe=measure.random_args)  # fmt: skip
    with caplog.at_level("WARNING", logger="muscle_fast.ops.measure"):
        probed(x, B)
    assert probed.chosen == {(1,): "triton"} and "'cublas' disagrees" in caplog.text


def test_random_args_keep_the_layout():
    t = torch.randn(6, 4).t()  # (4, 6), column-major
    b = torch.zeros(1, 5).expand(3, 5)  # stride 0
    (rt, rb, n, i), kw = measure.random_args((t, b, 7, torch.arange(3)), {"bias": torch.zeros(2).half()})
    assert rt.shape == t.shape and rt.stride() == t.stride() and rt.dtype == t.dtype
    assert rb.shape == b.shape and rb.stride() == b.stride() and float(rb.abs().sum()) > 0
    assert n == 7 and torch.equal(i, torch.arange(3))  # integers and non-float tensors as they were
    assert kw["bias"].dtype == torch.float16 and float(kw["bias"].abs().sum()) > 0
    assert measure.random_args((torch.zeros(0, 3),), {})[0][0].shape == (0, 3)


@pytest.mark.parametrize("chunk", [None, 6], ids=["whole", "in-chunks"])
def test_disagreement_compares_what_can_be_compared(chunk, monkeypatch):
    if chunk:  # big outputs are compared a chunk at a time: the same verdicts
        monkeypatch.setattr(measure, "_AGREE_CHUNK", chunk)
    a = torch.randn(5, 7)
    assert measure.disagreement(a, a.clone()) is None
    assert measure.disagreement((a, a.sum(0)), (a.clone(), a.sum(0))) is None
    assert "output 1" in measure.disagreement((a, a), (a, -a))
    assert "2 outputs, not 1" in measure.disagreement((a, a), (a,))
    assert "shape (7, 5)" in measure.disagreement(a.t(), a)
    assert "torch.float64" in measure.disagreement(a.double(), a)
    nan_out = a.clone()
    nan_out[1, 2] = float("nan")
    assert "largest difference nan" in measure.disagreement(nan_out, a)
    tile = a.clone()
    tile[4, 6] += 0.1 * float(a.abs().max())  # one element off by 10 % of the largest value
    assert "largest difference" in measure.disagreement(tile, a)
    assert "largest difference" in measure.disagreement(torch.ones(3), torch.zeros(3))
    inf_ref = a.clone()
    inf_ref[0, 0] = float("inf")
    assert measure.disagreement(inf_ref.clone(), inf_ref) is None  # the same non-finite pattern
    assert measure.disagreement(a, inf_ref) == "non-finite elements elsewhere"
    assert measure.disagreement(-inf_ref, inf_ref) == "non-finite elements elsewhere"  # -inf for inf
    garbage = torch.full_like(inf_ref, 7.0)
    garbage[0, 0] = float("inf")
    assert "largest difference" in measure.disagreement(garbage, inf_ref)  # the finite ones compared
    early = a.clone()
    early[0, 1] += 1.0  # the only error, in the first chunk when comparing in chunks
    assert "largest difference" in measure.disagreement(early, a)
    lost = a.bfloat16()
    lost[-1] = 0  # bf16: a lost row
    assert "largest difference" in measure.disagreement(lost, a.bfloat16())
    assert measure.disagreement((a * (1 + 2.0**-8)).bfloat16(), a.bfloat16()) is None  # rounding
    for nothing in (None, "triton", 3):  # in-place ops return None; fakes return names
        assert measure.disagreement(nothing, a) is None and measure.disagreement(a, nothing) is None
    assert measure.disagreement(torch.zeros(0), torch.zeros(0)) is None
    assert measure.disagreement(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) is None


class _FakeEvent:
    """A CUDA event on a fake device clock: ``record`` stamps the clock, which the candidates advance."""

    clock = 0.0
    pending = True  # the sleep kernel still runs when the first round's start event is queried

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = _FakeEvent.clock

    def query(self) -> bool:
        return not _FakeEvent.pending

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.t - self.t


@pytest.mark.parametrize("pending", [True, False], ids=["queued-behind-the-sleep", "sleep-too-short"])
def test_cuda_times_logic_with_a_fake_device(monkeypatch, pending):
    """cuda_times without a GPU: the device figure is the events' median, the host figure the calls'
    wall time, a candidate's result the larger; rounds alternate the order; a sleep that ended before
    the rounds were queued is retried ten times longer (at most three tries)."""
    sleeps: list[int] = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(_FakeEvent, "pending", pending)
    order: list[str] = []

    def cand(name: str, device_ms: float):
        def run():
            order.append(name)
            _FakeEvent.clock += device_ms

        return run

    def host_bound():  # little device work, 10 ms of host time: the host time is its figure
        order.append("c")
        time.sleep(0.01)
        _FakeEvent.clock += 0.001

    got = measure.cuda_times([cand("a", 2.0), cand("b", 0.5), host_bound], 4)
    assert got[0] == 2.0 and 0.5 <= got[1] < 2.0  # b's host time may exceed its fake device time
    assert got[2] >= 10.0
    tries = 1 if pending else 3
    assert sleeps == [measure._SLEEP_CYCLES * 10**i for i in range(tries)]
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"] * tries


def test_no_measuring_while_a_cuda_graph_is_captured(monkeypatch):
    """During capture nothing may sync: the default runs, unremembered, and the first call after the
    capture measures (a stand-in CUDA input: the device is all the op looks at)."""
    from types import SimpleNamespace

    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    timer = FakeTimer([2.0, 1.0])
    op = _op(timer, key=lambda x, **kw: ("k",))
    x = SimpleNamespace(device=torch.device("cuda", 0))
    assert op(x) == "triton" and timer.calls == 0 and op.chosen == {}
    capturing[0] = False
    assert op(x) == "cublas" and timer.calls == 1 and op.chosen == {("k",): "cublas"}


def test_run_records_carry_the_measured_choices():
    """defend's results.json records say which implementation "auto" measured faster (empty off CUDA,
    where nothing is measured: no key in the record)."""
    from muscle_fast.experiment.run import kernel_choices

    assert kernel_choices() == {}
    shrink = lowrank.accumulate_ops().shrink
    shrink._remember(("cuda:0", "torch.bfloat16", 8192), "cublas", {"triton": 0.05, "cublas": 0.03})
    assert kernel_choices() == {
        "lowrank.shrink": [
            {
                "key": ["cuda:0", "torch.bfloat16", "8192"],
                "chosen": "cublas",
                "ms": {"triton": 0.05, "cublas": 0.03},
            }
        ]
    }


def test_auto_offers_the_kernel_and_the_torch_function_for_each_reduction():
    """The two candidates are what their names say: the Triton launcher and the torch path's function
    (outside autocast), so a test that pins "cublas" runs cuBLAS."""
    ops, kernels = lowrank.accumulate_ops(), lowrank.triton_ops()
    twins = {
        "shrink": lowrank.lowrank_shrink,
        "backward_dS_dB": lowrank.lowrank_backward_dS_dB,
        "grad_A": lowrank.lowrank_grad_A,
    }
    for field, twin in twins.items():
        step = getattr(ops, field)
        assert step.candidates["triton"] is getattr(kernels, field)
        assert step.candidates["cublas"].__wrapped__ is twin
    assert ops.measured and ops.accumulate and not kernels.measured


def test_the_4bit_layer_measures_its_dequantization_in_auto(device, monkeypatch):
    """A 4-bit MuScleLinear under accumulate_ops (what "auto" runs on CUDA) dequantizes its weight through
    the measured op, in forward and backward (a fake timer makes bitsandbytes win here), and computes
    the bits the kernel-only path computes."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(64, 32, True, device)
    m = MuScleLinear(q, (1.0,), 4, 8.0, init_B="kaiming", backend="triton")
    timer = FakeTimer([2.0, 1.0])
    if not CUDA:  # on a GPU the real measurement decides
        monkeypatch.setattr(mnf4._dequantize_into, "timer", timer)
    _kernels_and_auto_agree(m, torch.randn(24, 64, device=device))  # > SMALL_M_MAX: dequantize + cuBLAS
    (row,) = measure.choices(mnf4._dequantize_into)["nf4.dequantize_weight"]
    if not CUDA:
        assert row["chosen"] == "bitsandbytes" and timer.calls == 1


def _kernels_and_auto_agree(m: MuScleLinear, x: torch.Tensor, before_auto=lambda: None) -> None:
    """The layer's output and input gradient under triton_ops and under accumulate_ops (what "auto" runs
    on CUDA) agree to fp32 rounding (the low-rank path differs: accumulate order, rounded S);
    ``before_auto`` runs between the two."""
    outs = []
    for ops in (lowrank.triton_ops(), lowrank.accumulate_ops()):
        if ops.measured:
            before_auto()
        xi = x.clone().requires_grad_(True)
        args = (m.lora_A, m.lora_B, m.scaling * m.scale_vector, m.base, m.kind, ops, 0.0, 0, None, m)
        y = lowrank.MuScleLinearFunction.apply(xi, *args)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("winner", ["dequant", "fused", "bitsandbytes"])
def test_decode_sized_4bit_forward_runs_the_fastest_4bit_matmul(winner, device, monkeypatch):
    """Up to SMALL_M_MAX rows, "auto" measures a 4-bit base's forward among dequantize + cuBLAS, our
    fused matmul_4bit and bitsandbytes' matmul_4bit (a fake timer picks ``winner`` here); each gives the
    kernel-only layer's output and gradients up to fp32 rounding. More rows take the usual path."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(64, 32, True, device)
    m = MuScleLinear(q, (1.0, 2.0), 2, 8.0, init_B="kaiming", backend="triton")
    figures = {"dequant": [1.0, 2.0, 3.0], "fused": [3.0, 1.0, 2.0], "bitsandbytes": [3.0, 2.0, 1.0]}[winner]
    timer = FakeTimer(figures)
    if CUDA:
        monkeypatch.setenv(measure.ENV, winner)  # on a GPU: pinned, the measurement is test_cuda_times'
    else:
        monkeypatch.setattr(mnf4.small_m_linear, "timer", timer)
    ran: list[str] = []
    for name, fn in list(mnf4.small_m_linear.candidates.items()):

        def counted(*a, _fn=fn, _name=name, **kw):
            ran.append(_name)
            return _fn(*a, **kw)

        monkeypatch.setitem(mnf4.small_m_linear.candidates, name, counted)
    for rows in (3, 40):

        def triton_never_measures():
            assert ran == []

        _kernels_and_auto_agree(m, torch.randn(rows, 64, device=device), triton_never_measures)
        if rows == 3:
            assert ran[-1] == winner  # the last run is the chosen one alone
            if not CUDA:  # the warm-up ran each candidate once
                assert timer.calls == 1 and sorted(ran[:3]) == ["bitsandbytes", "dequant", "fused"]
            del ran[:]
    assert ran == []  # 40 rows: not a decode-sized input
    (row,) = measure.choices(mnf4.small_m_linear)["nf4.small_m_linear"]
    assert row["chosen"] == winner


def test_bitsandbytes_small_m_matmul_only_in_fp32(monkeypatch):
    """bitsandbytes' small-M kernel rounds every product to a 16-bit compute dtype: in bf16 it is not
    offered (pinning it runs the default), in fp32 it is; fp32 with TF32 on is not measured at all."""
    from muscle_fast.ops import nf4 as mnf4

    q = _linear4bit(64, 16, True, "cpu", dtype=torch.bfloat16)
    x16, x32 = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(2, 64)
    assert mnf4._small_m_offered(x16, q, None) == ("dequant", "fused")
    q32 = _linear4bit(64, 16, True, "cpu")
    assert mnf4._small_m_offered(x32, q32, None) == ("dequant", "fused", "bitsandbytes")
    assert mnf4._small_m_key(x16, q, None) is not None
    assert mnf4._small_m_key(torch.zeros(17, 64, dtype=torch.bfloat16), q, None) is None  # not decode-sized
    with _tf32():  # cuBLAS would round the inputs, the fused kernel does not
        assert mnf4._small_m_key(x32, q32, None) is None
    assert mnf4._small_m_key(x32, q32, None) is not None
    monkeypatch.setenv(measure.ENV, "bitsandbytes")
    mnf4.small_m_linear(x16, q, None)  # pinned, but not offered in bf16: the default runs
    assert measure.choices(mnf4.small_m_linear)["nf4.small_m_linear"][0]["chosen"] == "dequant"
