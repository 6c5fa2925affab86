"""The one dispatcher: which implementation, the Triton kernels or the torch reference, runs an op.

Every op (low-rank layer, gradient alignment, NF4 dequantization and matmul, Gaussian filter)
asks :func:`use_kernels` and nothing else, so ``backend`` means the same everywhere:

* ``"torch"``: the pure-PyTorch path (the reference; exact for float64);
* ``"triton"``: the Triton kernels; on a CPU tensor only under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported), otherwise a clear error;
* ``"auto"``: the kernels on CUDA for the dtypes they take, the torch path everywhere else
  (the CPU included, interpreter or not: the interpreter is a test tool, not a fast path).

The environment variable ``MUSCLE_FAST_BACKEND`` overrides the argument.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from csrc_triton import _common

BACKENDS = ("auto", "torch", "triton")

#: Floating dtypes every kernel takes; ops with a narrower set pass their own.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str) -> str:
    """The backend in force: ``MUSCLE_FAST_BACKEND`` when set, else ``backend``; validated."""
    return _resolve(backend, os.environ.get("MUSCLE_FAST_BACKEND"))


def _resolve(backend: str, env: str | None) -> str:
    chosen = env if env else backend
    if chosen not in BACKENDS:
        src = "MUSCLE_FAST_BACKEND" if env else "backend"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {chosen!r}")
    return chosen


def use_kernels(
    backend: str,
    device: torch.device | str,
    dtypes: Iterable[torch.dtype | None] = (),
    *,
    op: str = "muscle_fast",
    supported: tuple[torch.dtype, ...] = KERNEL_DTYPES,
) -> bool:
    """Whether ``op`` runs its Triton kernels for tensors on ``device`` with these ``dtypes``.

    ``"auto"`` answers by device and dtype; ``"triton"`` where the kernels cannot run raises a
    RuntimeError naming the op and the device (a dtype the kernels lack is left to the kernel's own
    error, which names the tensor). Answers are remembered per argument set, environment value and
    interpreter switch (every layer asks on every call); errors are not, so they repeat.
    """
    env = os.environ.get("MUSCLE_FAST_BACKEND")
    dtypes = tuple(dtypes)
    key = (backend, env, _common.INTERPRET, device, dtypes, supported)
    hit = _ANSWERS.get(key)
    if hit is None:
        hit = _use_kernels(_resolve(backend, env), device, dtypes, op, supported)
        if len(_ANSWERS) >= 256:  # a handful of keys in practice; bound it anyway
            _ANSWERS.clear()
        _ANSWERS[key] = hit
    return hit


_ANSWERS: dict[tuple, bool] = {}


def _use_kernels(
    chosen: str,
    device: torch.device | str,
    dtypes: tuple[torch.dtype | None, ...],
    op: str,
    supported: tuple[torch.dtype, ...],
) -> bool:
    if chosen == "torch":
        return False
    device = torch.device(device)
    if chosen == "auto":
        return device.type == "cuda" and all(d is None or d in supported for d in dtypes)
    if not _common.kernels_run_on(device):
        state = "on" if _common.INTERPRET else "off"
        raise RuntimeError(
            f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported for CPU tensors; got a tensor on {device} (interpreter {state})"
        )
    return True
