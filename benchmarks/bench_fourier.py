"""Gaussian low-pass filter of the Fourier analysis: streaming vs the dense float64 G of the original code.

    pytest benchmarks/bench_fourier.py --benchmark-columns=min,mean,rounds -s -ra

Sizes are the SST-2 splits (872 dev, 6920 train of the small split, 67349 full train); x is a
flattened padded embedding output, d = 64 x 384 = 24576 on CUDA. Streaming: the Triton kernel on
CUDA (fp32 and bf16 x; all widths in one launch, O(n d + n c) memory), the chunked torch path on
CPU (d = 384 there, n <= 6920: the O(n^2 d) work is minutes beyond that on two cores). Dense:
``gaussian_filter_dense_ref(exact=False)`` (float64 Gram expansion, n x n G), only where its
n x n matrices fit in memory; skipped sizes say why. The Triton interpreter's timings say nothing
about GPU speed, so the kernel is not timed on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import

import pytest  # noqa: E402

from muscle_fast.analysis import gaussian_filter, gaussian_filter_dense_ref  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SIZES = [872, 6920, 67349]
D = 64 * 384 if CUDA else 384
CPU_STREAM_MAX_N = 6920
C = 4  # [probs, onehot] of a 2-class task, as frequency_deviations filters them
DELTAS = [2.0, 8.0, 32.0]


def _data(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, D, device=DEVICE, generator=gen).to(dtype)
    f = torch.rand(n, C, device=DEVICE, generator=gen)
    return x, f


def _free_bytes() -> int:
    if CUDA:
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn: Callable[[], torch.Tensor], n: int, rounds: int, info: dict) -> None:
    fn()  # compile / warm up outside the timing
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()

    def call() -> None:
        fn()
        _sync()

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=0)
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "n": n,
        "d": D,
        "c": C,
        "n_deltas": len(DELTAS),
        "x_shape": [n, D],
        "f_shape": [n, C],
        "out_shape": [len(DELTAS), n, C],
        **info,
    }
    if CUDA:
        info["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if benchmark.stats is not None:
        t = benchmark.stats.stats.min
        info["s_per_call"] = t
        info["distance_GFLOP/s"] = 2.0 * n * n * D / t / 1e9  # the x_i . x_j work
        print(f"\n{info['impl']:>10} n={n:6d} d={D} {info.get('x_dtype', '')}: {t:8.3f} s")
    benchmark.extra_info.update(info)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32], ids=lambda t: str(t).split(".")[-1]
)
@pytest.mark.parametrize("n", SIZES)
def test_streaming(benchmark, n: int, dtype: torch.dtype) -> None:
    if not CUDA and n > CPU_STREAM_MAX_N:
        pytest.skip(
            f"CPU: n={n} is {n * n * D * 2 / 1e12:.1f} TFLOP of distances, minutes on CPU; run on CUDA"
        )
    x, f = _data(n, dtype)
    backend = "triton" if CUDA else "torch"
    rounds = 3 if n * n * D < 1e13 else 1
    _run(
        benchmark,
        lambda: gaussian_filter(x, f, DELTAS, backend=backend),
        n,
        rounds,
        {"impl": f"stream-{backend}", "backend": backend, "x_dtype": str(dtype)},
    )


@pytest.mark.parametrize("n", SIZES)
def test_dense_float64(benchmark, n: int) -> None:
    # x and f in float64, the distance matrix, the scaled logits and G: ~3 n x n float64 at once.
    need = 3 * n * n * 8 + n * D * 8
    free = _free_bytes()
    if need > 0.7 * free:
        pytest.skip(
            f"dense n={n}: needs ~{need / 2**30:.1f} GiB for n x n float64, {free / 2**30:.1f} GiB free"
        )
    if not CUDA and n > CPU_STREAM_MAX_N:
        pytest.skip(f"CPU: dense n={n} takes minutes here")
    x, f = _data(n, torch.float32)
    rounds = 3 if n * n * D < 1e13 else 1
    _run(
        benchmark,
        lambda: gaussian_filter_dense_ref(x, f, DELTAS, exact=False),
        n,
        rounds,
        {"impl": "dense-f64", "backend": "dense", "x_dtype": "torch.float32"},
    )


def test_kernel_not_timed_on_cpu() -> None:
    if not CUDA:
        pytest.skip("Triton kernel: the CPU interpreter's timings say nothing about GPU speed")
