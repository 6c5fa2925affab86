"""NF4 dequantization bandwidth: muscle_fast's Triton kernel vs bitsandbytes' CUDA kernel.

Dequantization is memory-bound, so the figure of merit is GB/s of (bytes read + bytes written);
a same-run ``torch`` copy moving the same number of bytes is the practical ceiling.

    pytest benchmarks/bench_nf4.py --benchmark-columns=mean,min,rounds -s

CUDA only: skipped with a reason elsewhere (the interpreter says nothing about GPU speed).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bench_nf4 measures GPU memory bandwidth and needs CUDA"
)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BLOCKSIZE = 64
DTYPE = torch.bfloat16
INNER = 20  # launches per timed round, so that one synchronize is amortized


def _traffic(shape: tuple[int, int], nested: bool) -> int:
    """Bytes a dequantization must move: packed nibbles + absmax (+ nested stats) + output."""
    numel = shape[0] * shape[1]
    n_blocks = -(-numel // BLOCKSIZE)
    absmax = n_blocks * (1 if nested else 4) + (-(-n_blocks // 256) * 4 + 256 * 4 if nested else 0)
    return (numel + 1) // 2 + absmax + 16 * 4 + numel * DTYPE.itemsize


def _state(shape: tuple[int, int], nested: bool) -> tuple[torch.Tensor, object]:
    """A bitsandbytes-quantized weight when bitsandbytes is there, else an equivalent hand-built one."""
    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
    if F is not None:
        w = torch.randn(shape, device="cuda", dtype=DTYPE)
        return F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")
    from muscle_fast.ops.nf4 import get_4bit_code

    numel = shape[0] * shape[1]
    n_blocks = -(-numel // BLOCKSIZE)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, device="cuda")
    state2, offset = None, None
    if nested:
        absmax = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device="cuda")
        state2 = SimpleNamespace(
            absmax=torch.rand(-(-n_blocks // 256), device="cuda"),
            code=torch.linspace(-1, 1, 256, device="cuda"),
            blocksize=256,
            dtype=torch.float32,
            state2=None,
        )
        offset = torch.tensor(0.5, device="cuda")
    else:
        absmax = torch.rand(n_blocks, device="cuda")
    qs = SimpleNamespace(
        absmax=absmax,
        shape=torch.Size(shape),
        code=get_4bit_code("nf4", "cuda"),
        blocksize=BLOCKSIZE,
        quant_type="nf4",
        dtype=DTYPE,
        offset=offset,
        state2=state2,
    )
    return packed, qs


def _run(benchmark, fn: Callable[[], object], traffic: int, label: str, graph: bool = False) -> None:
    """Time INNER back-to-back calls per round. ``graph``: replay them from a CUDA graph instead,
    which removes the host (Python + launcher) time and leaves the kernels' device time."""
    fn()  # compile + autotune outside the timing
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            fn()
        torch.cuda.current_stream().wait_stream(side)
        try:
            with torch.cuda.graph(g):
                for _ in range(INNER):
                    fn()
        except RuntimeError as e:
            pytest.skip(f"{label}: not capturable in a CUDA graph: {e}")

    def rounds() -> None:
        if graph:
            g.replay()
        else:
            for _ in range(INNER):
                fn()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=30, warmup_rounds=3)
    if benchmark.stats is None:  # --benchmark-disable
        return
    per_call = benchmark.stats.stats.min / INNER
    gbs = traffic / per_call / 1e9
    benchmark.extra_info.update(
        {"us_per_call": per_call * 1e6, "GB/s": gbs, "bytes": traffic, "cuda_graph": graph}
    )
    print(f"\n{label}: {per_call * 1e6:8.1f} us  {gbs:7.1f} GB/s  ({traffic / 2**20:.1f} MiB moved)")


def _id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# Correctness at the benchmark shapes first: under run.sh's time limit they must not be what is cut.


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_dequant_matches_bitsandbytes(shape: tuple[int, int], monkeypatch) -> None:
    """The autotuned kernel at the benchmark shapes, bit-exact against bitsandbytes' CUDA dequantizer."""
    F = pytest.importorskip("bitsandbytes.functional", reason="no bitsandbytes: nothing to compare")
    from csrc_triton import nf4 as knf4
    from muscle_fast.ops.nf4 import dequantize_4bit

    for nested in (False, True):
        packed, qs = _state(shape, nested)
        want = F.dequantize_4bit(packed, qs)
        for lookup in knf4.LOOKUPS:
            monkeypatch.setattr(knf4, "LOOKUP", lookup)
            assert torch.equal(dequantize_4bit(packed, qs), want), (nested, lookup)


# Small-M inference: is the fused dequant+matmul kernel (muscle_fast.nf4.matmul_4bit) worth using?
# Against our dequant + cuBLAS, bitsandbytes' matmul_4bit (its fused 4-bit GEMV at M=1) and the
# dense bf16 GEMM floor; eager (host path included) and CUDA-graph replay (device time only).
# (M=128 was measured on 2026-11-26: dequant + cuBLAS ahead of bitsandbytes; the open question is <= 16)
SMALL_M = [1, 16]


def _mm_traffic(shape: tuple[int, int], m: int, impl: str) -> int:
    """Bytes the impl's own algorithm moves: x and y, plus the 4-bit weight and its statistics for a
    fused kernel, plus writing and re-reading the 16-bit weight for dequantize + GEMM, or the 16-bit
    weight alone for the dense floor. (bitsandbytes fuses only at M=1, else dequantizes first.)"""
    n, k = shape
    w16 = n * k * DTYPE.itemsize
    quant = _traffic(shape, nested=True) - w16  # packed nibbles + nested absmax + tables
    io = (m * k + m * n) * DTYPE.itemsize
    fused = impl == "ours-fused" or (impl == "bnb-matmul_4bit" and m == 1)
    if impl == "dense-bf16":
        return w16 + io
    return quant + io + (0 if fused else 2 * w16)


@pytest.mark.parametrize("m", SMALL_M, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_fused_matmul_matches_dequant_cublas(shape: tuple[int, int], m: int) -> None:
    """At the benchmark shapes: the fused kernel against dequantize + float64 matmul, within the
    output's rounding plus fp32 accumulation (K * 2^-24 of the sum of |terms|)."""
    from muscle_fast.ops.nf4 import dequantize_4bit, matmul_4bit

    packed, qs = _state(shape, nested=True)
    x = torch.randn(m, shape[1], device="cuda", dtype=DTYPE)
    w = dequantize_4bit(packed, qs).double()
    want = x.double() @ w.T
    tol = 2.0**-7 * want.abs() + 2 * shape[1] * 2.0**-24 * (x.double().abs() @ w.abs().T)
    assert bool(((matmul_4bit(x, packed, qs).double() - want).abs() <= tol).all())


# eager, the whole public call; the two lookups are compared by test_device_time_graph
@pytest.mark.parametrize("lookup", ["gather"])
@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_muscle_fast_dequant(
    benchmark, shape: tuple[int, int], nested: bool, lookup: str, monkeypatch
) -> None:
    from csrc_triton import nf4 as knf4
    from muscle_fast.ops.nf4 import dequantize_4bit

    monkeypatch.setattr(knf4, "LOOKUP", lookup)
    packed, qs = _state(shape, nested)
    out = torch.empty(shape, dtype=DTYPE, device="cuda")
    benchmark.extra_info["lookup"] = lookup
    _run(
        benchmark,
        lambda: dequantize_4bit(packed, qs, out=out),
        _traffic(shape, nested),
        f"muscle_fast {lookup}",
    )


@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_muscle_fast_dequant_prepared(benchmark, shape: tuple[int, int], nested: bool) -> None:
    """The training path's call: arguments checked once per weight (PreparedDequant4bit)."""
    from muscle_fast.ops.nf4 import PreparedDequant4bit

    packed, qs = _state(shape, nested)
    out = torch.empty(shape, dtype=DTYPE, device="cuda")
    prep = PreparedDequant4bit(packed, qs, DTYPE, out)
    benchmark.extra_info["lookup"] = "gather"
    _run(benchmark, prep, _traffic(shape, nested), "muscle_fast prepared")


@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_bitsandbytes_dequant(benchmark, shape: tuple[int, int], nested: bool) -> None:
    F = pytest.importorskip("bitsandbytes.functional", reason="no bitsandbytes: nothing to compare")
    packed, qs = _state(shape, nested)
    out = torch.empty(shape, dtype=DTYPE, device="cuda")
    _run(benchmark, lambda: F.dequantize_4bit(packed, qs, out=out), _traffic(shape, nested), "bitsandbytes")


@pytest.mark.parametrize("impl", ["ours-gather", "ours-select", "bitsandbytes"])
@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_device_time_graph(benchmark, shape: tuple[int, int], nested: bool, impl: str, monkeypatch) -> None:
    """Kernel time alone (CUDA-graph replay): tells a slow kernel from a slow host path, since the
    eager figures above include the Python wrapper and launcher of every call."""
    packed, qs = _state(shape, nested)
    out = torch.empty(shape, dtype=DTYPE, device="cuda")
    if impl == "bitsandbytes":
        F = pytest.importorskip("bitsandbytes.functional", reason="no bitsandbytes: nothing to compare")
        fn = lambda: F.dequantize_4bit(packed, qs, out=out)  # noqa: E731
    else:
        from csrc_triton import nf4 as knf4
        from muscle_fast.ops.nf4 import PreparedDequant4bit

        monkeypatch.setattr(knf4, "LOOKUP", impl.split("-")[1])
        fn = PreparedDequant4bit(packed, qs, DTYPE, out)
    benchmark.extra_info["impl"] = impl
    _run(benchmark, fn, _traffic(shape, nested), f"{impl} (graph)", graph=True)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_torch_copy_floor(benchmark, shape: tuple[int, int]) -> None:
    # Copying n bytes reads n and writes n: size the copy to move as many bytes as a dequantization.
    traffic = _traffic(shape, nested=False)
    src = torch.empty(traffic // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 2 * src.numel(), "torch copy")


class _Base4bit(torch.nn.Module):
    """What ``MuScleLinear`` reads of a bitsandbytes ``Linear4bit``: its packed weight and quant_state."""

    def __init__(self, packed: torch.Tensor, qs: object) -> None:
        super().__init__()
        self.weight = SimpleNamespace(data=packed, quant_state=qs, device=packed.device)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize(
    "impl", ["ours-auto", "ours-fused", "ours-dequant+cublas", "bnb-matmul_4bit", "dense-bf16"]
)
@pytest.mark.parametrize("m", SMALL_M, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_small_m_matmul(benchmark, shape: tuple[int, int], m: int, impl: str, graph: bool) -> None:
    """ours-auto: what a 4-bit ``MuScleLinear`` runs for its base at these rows in backend "auto"
    (``nf4.small_m_linear``: the fastest candidate, measured on the first call; ``extra_info["picked"]``)."""
    from muscle_fast.ops.nf4 import dequantize_4bit, matmul_4bit, small_m_linear

    packed, qs = _state(shape, nested=True)
    x = torch.randn(m, shape[1], device="cuda", dtype=DTYPE)
    picked = None
    if impl == "ours-auto":
        base = _Base4bit(packed, qs)
        fn = lambda: small_m_linear(x, base, None)  # noqa: E731
        fn()  # measures
        key = small_m_linear.key(x, base, None)
        picked = small_m_linear.chosen.get(key, small_m_linear.default) if key else small_m_linear.default
        row = {"key": [str(k) for k in key or ()], "chosen": picked, "ms": small_m_linear.times.get(key)}
        benchmark.extra_info["picked"] = {small_m_linear.op: [row]}  # as summarize.py prints them
    elif impl == "ours-fused":
        fn = lambda: matmul_4bit(x, packed, qs)  # noqa: E731
    elif impl == "ours-dequant+cublas":
        w = torch.empty(shape, dtype=DTYPE, device="cuda")
        fn = lambda: torch.nn.functional.linear(x, dequantize_4bit(packed, qs, out=w))  # noqa: E731
    elif impl == "bnb-matmul_4bit":
        bnb = pytest.importorskip("bitsandbytes", reason="no bitsandbytes: nothing to compare")
        fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)  # noqa: E731
    else:
        w = torch.randn(shape, dtype=DTYPE, device="cuda")
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    benchmark.extra_info.update({"M": m, "N": shape[0], "K": shape[1], "impl": impl})
    if picked:  # the bytes of the candidate that runs
        impl = {"fused": "ours-fused", "bitsandbytes": "bnb-matmul_4bit"}.get(picked, impl)
    _run(benchmark, fn, _mm_traffic(shape, m, impl), f"{impl} M={m}", graph=graph)
