"""Host (Python) time of one MuScleLinear forward + backward, with the Triton launches stubbed out.

At small shapes a layer's cost on the GPU is the host path (dispatch, checks, casts, allocations),
not the kernels. This file measures that path on any machine, the CPU included, by replacing what
the ops call in ``csrc_triton.lowrank`` (issue #15):

* ``ours-triton-stubbed``: the five launchers replaced by stubs that return correctly shaped empty
  tensors, so what remains is ``MuScleLinear``, dispatch, the autograd function and the frozen base
  GEMMs;
* ``ours-triton-launchers``: the launchers real (their checks, ``torch.zeros`` outputs, grid setup)
  but every Triton kernel object replaced by a no-op, so the difference to the row above is the
  launcher-side host time;
* ``ours-accumulate-stubbed`` / ``ours-accumulate-launchers``: the same for what ``backend="auto"``
  runs on CUDA (``accumulate_ops``: two cuBLAS low-rank GEMMs in place of the expand and dX
  launches; forced on the CPU);
* ``ours-torch``: the torch path (real tensor work, tiny here);
* ``base``: the frozen base alone (``F.linear`` forward, dX backward), the floor every path pays.

``test_host_align`` does the same for one ``GradientAligner.align`` call over the Llama-2-7B LoRA
set (448 tensors, as in ``bench_align.py``) with the two alignment kernels stubbed: the per-step
Python work (reading and checking every ``g`` and ``c``, the pointer table) that the GPU waits on.

    pytest benchmarks/bench_host.py --benchmark-json=host.json

Shape M=8, K=N=64, bf16 compute with fp32 adapters: LoRA r=16 and MSLR 4 scales x r=4. Numbers
are per call (one forward + backward); subtract ``base`` for the adapter's own host overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from muscle_fast import MuScleLinear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
M, K, N = 8, 64, 64
ADAPTERS = {"lora-r16": ((1.0,), 16), "mslr-4x4": ((1.0, 2.0, 4.0, 8.0), 4)}
IMPLS = [
    "base",
    "ours-torch",
    "ours-triton-stubbed",
    "ours-triton-launchers",
    "ours-accumulate-stubbed",
    "ours-accumulate-launchers",
]
if not CUDA:
    torch.set_num_threads(1)  # host time: one thread, no pool wake-ups in the figures


def _groups(row_split: int | None) -> int:
    return 1 if row_split is None else 2


def _shrink(x: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0):
    return torch.empty((x.shape[0], A.shape[0]), dtype=torch.float32, device=x.device)


def _expand_(y: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return y


def _dS_dB(dY: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: torch.Tensor, *, row_split=None):
    M_, N_ = dY.shape
    R = B.shape[1]
    dS = torch.empty((M_, R), dtype=torch.float32, device=dY.device)
    return dS, torch.empty((_groups(row_split), N_, R), dtype=torch.float32, device=dY.device)


def _grad_A(dS: torch.Tensor, x: torch.Tensor, *, row_split=None, dropout_p: float = 0.0, seed: int = 0):
    return torch.empty((_groups(row_split), dS.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)


def _dx_(dX: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, *, dropout_p: float = 0.0, seed: int = 0):
    return dX


LAUNCHER_STUBS: dict[str, Callable[..., Any]] = {  # the entry points the op table uses
    "launch_shrink": _shrink,
    "launch_expand_": _expand_,
    "launch_backward_dS_dB": _dS_dB,
    "launch_grad_A": _grad_A,
    "launch_dx_": _dx_,
}


class _NoLaunch:
    """Stands in for a Triton kernel object: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """``stub("launchers")`` or ``stub("kernels")``; the op table is rebuilt around the stubs."""
    from triton.runtime import KernelInterface

    import csrc_triton._common as common
    import csrc_triton.lowrank as klr
    from muscle_fast.ops import lowrank

    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    monkeypatch.setenv("MUSCLE_FAST_PICK", "default")  # time the Triton launchers, never a measured twin
    if not CUDA:  # the dispatcher's "kernels can run here" (nothing is launched)
        monkeypatch.setattr(common, "INTERPRET", True)

    def stub(what: str, accumulate: bool = False) -> None:
        if accumulate and not CUDA:  # what "auto" picks on CUDA, for a "triton" layer on the CPU
            from muscle_fast import layers

            def get_ops(backend: str, device: torch.device, dtype: torch.dtype | None = None):
                return (
                    lowrank.accumulate_ops()
                    if backend == "triton"
                    else lowrank.get_ops(backend, device, dtype)
                )

            monkeypatch.setattr(layers, "get_ops", get_ops)
        if what == "launchers":
            for name, fn in LAUNCHER_STUBS.items():
                monkeypatch.setattr(klr, name, fn)
        else:
            for name, obj in list(vars(klr).items()):
                if isinstance(obj, KernelInterface):
                    monkeypatch.setattr(klr, name, _NoLaunch())
        lowrank.triton_ops.cache_clear()
        lowrank.accumulate_ops.cache_clear()

    yield stub
    lowrank.triton_ops.cache_clear()
    lowrank.accumulate_ops.cache_clear()


def _layer(impl: str, scales: tuple[float, ...], r: int) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if impl == "base":
        return base
    backend = "torch" if impl == "ours-torch" else "auto" if CUDA and "accumulate" in impl else "triton"
    return MuScleLinear(base, scales, r, 2.0 * r, init_B="kaiming", backend=backend)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_host_fwdbwd(benchmark, stubbed, adapter: str, impl: str) -> None:
    """One forward + backward per call; no synchronisation (host time only)."""
    scales, r = ADAPTERS[adapter]
    if impl.endswith("-stubbed"):
        stubbed("launchers", "accumulate" in impl)
    elif impl.endswith("-launchers"):
        stubbed("kernels", "accumulate" in impl)
    layer = _layer(impl, scales, r)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    gy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    benchmark.extra_info.update(
        dict(M=M, K=K, N=N, R=len(scales) * r, adapter=adapter, impl=impl, dtype=str(DTYPE), device=DEVICE)
    )

    params = [p for p in layer.parameters() if p.requires_grad]

    def fwdbwd() -> None:  # as in a training step: the gradients start as None
        layer(x).backward(gy)
        x.grad = None
        for p in params:
            p.grad = None

    benchmark.pedantic(fwdbwd, rounds=50, iterations=40, warmup_rounds=5)


def test_host_align(benchmark, monkeypatch: pytest.MonkeyPatch) -> None:
    """One alignment step's host time, kernels stubbed (the tensors' sizes do not enter it)."""
    from bench_align import GA, adapter_shapes

    import csrc_triton._common as common
    import csrc_triton.align as kalign
    from muscle_fast.align import GradientAligner

    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    if not CUDA:
        monkeypatch.setattr(common, "INTERPRET", True)
    monkeypatch.setattr(kalign, "_align_stats_kernel", _NoLaunch())
    monkeypatch.setattr(kalign, "_align_apply_kernel", _NoLaunch())
    shapes = adapter_shapes(32, 16)
    params = [nn.Parameter(torch.zeros(s, device=DEVICE)) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    refs = [torch.zeros(s, device=DEVICE) for s in shapes]
    aligner = GradientAligner(params, backend="triton", **GA)
    loss = torch.tensor(1.0, device=DEVICE)
    benchmark.extra_info.update(dict(n_tensors=len(shapes), device=DEVICE, impl="ours-triton-stubbed"))
    benchmark.pedantic(lambda: aligner.align(refs, loss, 3.0), rounds=30, iterations=10, warmup_rounds=2)
