"""Gradient alignment per optimizer step: fused Triton (2 launches) vs torch foreach vs the paper's loop.

The rule is memory-bound: the floor is reading g and c twice (stats, then update) and writing g
once, 5 x n_params x 4 bytes for fp32 grads (the fused aligned mode does not even re-read g).

    pytest benchmarks/bench_align.py --benchmark-columns=min,mean,rounds -s

On CUDA: a Llama-2-7B LoRA adapter set (r=16 on q,k,v,o,gate,up,down of 32 layers: 448 tensors,
~40M fp32 params). On CPU: 8 layers at r=8 so it finishes in well under a minute; the fused
variant is skipped there (the Triton interpreter's timings say nothing about GPU speed).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import

import pytest  # noqa: E402

from muscle_fast.align import GradientAligner, align_loop_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HIDDEN, INTERMEDIATE = 4096, 11008  # Llama-2-7B
LAYERS, RANK = (32, 16) if CUDA else (8, 8)
NOMINAL_GBPS = 3350.0  # H100 SXM HBM3 peak, for the computed floor
GA = dict(min_ref_grad_norm=5e-7, min_ref_loss=0.4, max_raw_grad_ratio=0.1, ga_epoch=1, epochs=10)
MODES = {"aligned": (1.0, 3), "mixed": (0.1, 5)}  # (ref_loss, epoch)


def adapter_shapes(layers: int = LAYERS, r: int = RANK) -> list[tuple[int, int]]:
    """LoRA A (r x in) and B (out x r) for q,k,v,o,gate,up,down of every layer, in model order."""
    proj = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]  # (in, out)
    shapes: list[tuple[int, int]] = []
    for _ in range(layers):
        for d_in, d_out in proj:
            shapes += [(r, d_in), (d_out, r)]
    return shapes


def make_set() -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params, refs = [], []
    for s in adapter_shapes():
        p = torch.nn.Parameter(torch.zeros(s, device=DEVICE))
        p.grad = torch.randn(s, device=DEVICE, generator=gen)
        params.append(p)
        refs.append(1e-2 * torch.randn(s, device=DEVICE, generator=gen))
    return params, refs


def _run(
    benchmark, fn: Callable[[], object], params: list[torch.nn.Parameter], label: str, rounds: int
) -> None:
    n_params = sum(p.numel() for p in params)
    floor_bytes = 5 * n_params * params[0].grad.element_size()
    fn()  # compile / build the plan outside the timing
    if CUDA:
        torch.cuda.synchronize()

    def step() -> None:
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "n_tensors": len(params),
        "n_params": n_params,
        "layers": LAYERS,
        "rank": RANK,
        "shapes": {f"{a}x{b}": n for (a, b), n in Counter(tuple(p.shape) for p in params).items()},
        "grad_dtype": str(params[0].grad.dtype),
        "floor_bytes": floor_bytes,
        f"floor_us_at_{NOMINAL_GBPS:.0f}GBps": floor_bytes / (NOMINAL_GBPS * 1e9) * 1e6,
    }
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.min
        info["us_per_step"] = t * 1e6
        info["floor_GBps"] = floor_bytes / t / 1e9
        print(
            f"\n{label}: {t * 1e6:10.1f} us/step  {info['floor_GBps']:8.1f} GB/s of floor traffic "
            f"({len(params)} tensors, {n_params / 1e6:.1f}M params)"
        )
    benchmark.extra_info.update(info)


def device_and_host_us(fn: Callable[[], object], reps: int = 20) -> tuple[float, float]:
    """(device us, host us) per call of ``fn``, apart.

    A sleep kernel keeps the GPU busy while the host queues ``reps`` calls, so the events around
    them time the kernels alone; the host's queueing time is measured on the side. The start event
    must still be pending when the queueing ends (asserted), or host time would leak into the device
    figure.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(500_000_000)  # cycles: about 0.25 s at H100/H200 clocks
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    queued_s = time.perf_counter() - t0
    still_sleeping = not start.query()
    torch.cuda.synchronize()
    assert still_sleeping, f"queueing {reps} calls took {queued_s * 1e3:.1f} ms, longer than the sleep"
    return start.elapsed_time(end) * 1e3 / reps, queued_s * 1e6 / reps


@pytest.mark.skipif(not CUDA, reason="fused path timed on CUDA only: Triton interpreter timings mean nothing")
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_triton(benchmark, mode: str) -> None:
    params, refs = make_set()
    al = GradientAligner(params, backend="triton", **GA)
    loss, epoch = MODES[mode]
    loss_t = torch.tensor(loss, device=DEVICE)
    _run(benchmark, lambda: al.align(refs, loss_t, epoch), params, f"fused[{mode}]", rounds=50)
    # The wall time above is host + device in series (it syncs every step); these two say which.
    dev_us, host_us = device_and_host_us(lambda: al.align(refs, loss_t, epoch))
    benchmark.extra_info.update(device_us_per_step=dev_us, host_us_per_step=host_us)
    print(f"fused[{mode}]: device {dev_us:.1f} us/step, host {host_us:.1f} us/step")


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_foreach(benchmark, mode: str) -> None:
    params, refs = make_set()
    al = GradientAligner(params, backend="torch", **GA)
    loss, epoch = MODES[mode]
    loss_t = torch.tensor(loss, device=DEVICE)
    rounds = 20 if CUDA else 5
    _run(benchmark, lambda: al.align(refs, loss_t, epoch), params, f"foreach[{mode}]", rounds=rounds)


def test_paper_loop(benchmark) -> None:
    """The original per-tensor loop: .item() per tensor and a CPU round trip of every reference gradient."""
    params, refs = make_set()
    _run(
        benchmark,
        lambda: align_loop_reference(params, refs, 1.0, 3, **GA),
        params,
        "loop[aligned]",
        rounds=5 if CUDA else 3,
    )


@pytest.mark.skipif(not CUDA, reason="memory-bandwidth ceiling is only meaningful on the GPU")
def test_copy_ceiling(benchmark) -> None:
    """A same-run device copy moving the floor's bytes: the practical ceiling for the fused path."""
    params, _ = make_set()
    n = sum(p.numel() for p in params)
    src = torch.empty(5 * n // 2, device=DEVICE)  # copy reads n and writes n: 5n elements in all
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), params, "copy[5N fp32 moved]", rounds=50)
