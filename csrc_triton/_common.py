"""What every kernel shares: the interpreter switch, launch checks, and the data layouts the torch
references use too. Importing this module does not import triton (the torch paths need it without).
"""

from __future__ import annotations

import functools
import inspect
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

#: True when Triton runs kernels on the CPU through its interpreter.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: ``MUSCLE_FAST_AUTOTUNE=0`` launches every kernel with one conservative config instead of
#: autotuning: the GPU test suite runs hundreds of odd shapes, each a new autotune key, where
#: timing every config would cost minutes and prove nothing about correctness.
AUTOTUNE: bool = os.environ.get("MUSCLE_FAST_AUTOTUNE", "1") != "0"


def upcast_dot(*dtypes: torch.dtype) -> bool:
    """Whether kernels must upcast bf16 operands to fp32 before ``tl.dot``.

    Triton's interpreter returns garbage for bf16 ``tl.dot``; on the GPU the
    bf16 tensor-core dot is kept.
    """
    return INTERPRET and any(d == torch.bfloat16 for d in dtypes)


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or the CPU under the interpreter)."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when a kernel cannot run on these tensors."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise RuntimeError(
            f"muscle_fast Triton kernels need CUDA tensors or TRITON_INTERPRET=1 set before triton "
            f"is imported; got a tensor on {t.device} (interpreter {'on' if INTERPRET else 'off'})"
        )


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with the current CUDA index filled in: ``"cuda"`` alone means whatever device is
    current *now*; objects that outlive the call (plans, workspaces) must pin the index, or their
    device comparisons fail against tensors reporting ``cuda:N`` and later launches go elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (queried once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def block_r(R: int) -> int:
    """The rank block of the low-rank kernels: R padded to a power of two >= 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (R - 1).bit_length()) if R > 0 else 16


def round_f32(x: float) -> float:
    """``x`` rounded to float32. Thresholds and the reference loss are compared as fp32 values on every
    path (the kernels take fp32 scalars), so that all implementations decide alike at a boundary."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


# -- data layouts shared by kernels and torch references ----------------------------------------------------

#: Block sizes bitsandbytes accepts for 4-bit quantization (NF4/FP4).
NF4_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Slots of the gradient-alignment stats vector (fp64, written by the fused kernels and the torch path).
#: ``STAT_N_REF`` counts the tensors that entered the mean reference-gradient norm.
(STAT_MODE, STAT_MEAN_REF_NORM, STAT_RHO, STAT_N_NONFINITE, STAT_N_NONFINITE_GRAD, STAT_N_UPDATED,
 STAT_REF_LOSS, STAT_N_REF) = range(8)  # fmt: skip
N_STATS = 8


def launch_guard(param: str) -> Callable[[F], F]:
    """Run the decorated launcher with the CUDA device of argument ``param`` current.

    Triton launches on the *current* CUDA device and stream. A model spread over GPUs
    (``device_map="auto"``) runs its layers with another device current, so without this a kernel
    for a layer on cuda:1 would launch on cuda:0. ``param`` names a tensor, a ``torch.device``
    (or device string) or an object with a ``.device``. Costs one comparison when the device is
    already current (the single-GPU case) and nothing off CUDA.
    """

    def deco(fn: F) -> F:
        names = list(inspect.signature(fn).parameters)
        if param not in names:
            raise TypeError(f"launch_guard: {fn.__name__} has no parameter {param!r}")
        pos = names.index(param)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            obj = args[pos] if pos < len(args) else kwargs[param]
            if isinstance(obj, torch.device):
                dev = obj
            else:
                dev = torch.device(obj) if isinstance(obj, str) else obj.device
            if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
                with torch.cuda.device(dev):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
