"""Per-shape choice between equivalent implementations of an op, by measured time.

``backend="auto"`` promises the fastest of what muscle_fast ships. Whether a Triton reduction or its
cuBLAS twin wins depends on the card, the shape and the rank, so the choice is measured the way
Triton's autotuner picks a config: the first call with a new key runs every candidate once (compile,
autotune, allocator), then ``reps`` more times, interleaved, queued behind a sleep kernel between CUDA
events; each candidate's figure is the larger of its median device time and its median host time (a
step pays the one that binds), and the smallest figure is remembered and runs from then on. The
candidates compute the same values up to rounding (as Triton's split-K configs differ in summation
order), so the choice may differ between runs, never the result beyond the dtype's rounding.

``MUSCLE_FAST_PICK`` sets the choice: unset or ``"measure"`` measures; ``"default"`` always runs each
op's default candidate (the same implementation in every run: the Triton reductions, the cuBLAS
composition of the frozen GEMMs, dequantize-then-matmul for 4-bit decode); a candidate name
(``"triton"``, ``"cublas"``, ``"bitsandbytes"``, ``"fused"``, ``"dequant"``) forces it in the ops that
offer it, the others run their default. It applies only where an op has a choice at all (its key is
not None), and is read when a key is first seen (the per-call path is a dict lookup): set it before
the first step, or call ``forget_all()`` after changing it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

ENV = "MUSCLE_FAST_PICK"
MODES = ("measure", "default")

#: Times each candidate's ``reps`` runs; returns one figure per candidate (smaller is faster).
Timer = Callable[[Sequence[Callable[[], object]], int], list[float]]

_log = logging.getLogger(__name__)


#: GPU cycles the timing rounds queue behind (about 50 ms at H100/H200 clocks): long enough for the host
#: to enqueue every round, so the events time the device alone; grown tenfold if it was not.
_SLEEP_CYCLES = 100_000_000


def cuda_times(fns: Sequence[Callable[[], object]], reps: int) -> list[float]:
    """Per candidate (already run once: compiled, autotuned), the larger of its median device time and
    its median host time in ms: what it costs a step that is GPU-bound or host-bound.

    The rounds queue behind a sleep kernel, so each pair of CUDA events times the device work alone;
    the host time is the wall time of the call. Candidates alternate their order from round to round."""
    cycles = _SLEEP_CYCLES
    for _ in range(3):
        torch.cuda.synchronize()
        events = [
            [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
            for _ in range(reps)
        ]
        host: list[list[float]] = [[] for _ in fns]
        torch.cuda._sleep(cycles)
        for r, row in enumerate(events):
            for i in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
                start, end = row[i]
                t0 = time.perf_counter()
                start.record()
                fns[i]()
                end.record()
                host[i].append((time.perf_counter() - t0) * 1e3)
        behind = not events[0][0][0].query()  # the first round still waited for the sleep
        torch.cuda.synchronize()
        if behind:
            break
        cycles *= 10
    device = [statistics.median(row[i][0].elapsed_time(row[i][1]) for row in events) for i in range(len(fns))]
    return [max(d, statistics.median(h)) for d, h in zip(device, host, strict=True)]


def bucket(rows: int) -> int:
    """Rows rounded up to a power of two (0 for 0): the M of a choice's key, as of the kernels' autotuner."""
    return 1 << (rows - 1).bit_length() if rows > 0 else 0


def fp32_matmul_ieee() -> bool:
    """Whether torch's fp32 matmuls run in IEEE fp32 (no TF32), as the kernels' fp32 dots do. torch >= 2.9
    has a per-backend setting (``torch.backends.cuda.matmul.fp32_precision``, "none" = the default,
    IEEE) that HF's ``tf32=True`` sets; once it is set, the legacy getter raises, so it is read first."""
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new is not None:
        return new in ("ieee", "none")
    return torch.get_float32_matmul_precision() == "highest"


#: Largest difference between two candidates' outputs, relative to the reference's largest magnitude,
#: per output dtype. Rounding-order differences stay within an ulp or two of the output's dtype, or of
#: bf16 for fp32 sums of bf16 products that one candidate rounds (the CPU's bf16 matmul, tests only); a
#: wrong tile, operand or mask is off by the order of the values themselves.
_AGREE = {torch.float16: 2.0**-7, torch.bfloat16: 2.0**-5, torch.float32: 2.0**-7, torch.float64: 2.0**-7}

#: Elements compared at a time (a few fp32 temporaries of 16 MB).
_AGREE_CHUNK = 1 << 22


def disagreement(out: Any, ref: Any) -> str | None:
    """Why a candidate's output ``out`` is not the reference's ``ref`` up to rounding, or None.

    Tensors (also inside tuples and lists) of floating dtype are compared by their largest difference
    relative to ``ref``'s largest finite magnitude (``_AGREE``), after their shapes and dtypes:
    elementwise, so that one wrong tile of a large output shows. Non-finite elements must sit at the
    same places with the same values (NaN, +inf, -inf). Anything else (None from an op that writes into
    a buffer, a fake in tests) is taken as agreeing: there is nothing to compare."""
    if isinstance(out, (tuple, list)) and isinstance(ref, (tuple, list)):
        if len(out) != len(ref):
            return f"{len(out)} outputs, not {len(ref)}"
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            why = disagreement(o, r)
            if why is not None:
                return f"output {i}: {why}"
        return None
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return None
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape {tuple(out.shape)} {out.dtype}, not {tuple(ref.shape)} {ref.dtype}"
    tol = _AGREE.get(ref.dtype)
    if tol is None or ref.numel() == 0:
        return None
    o, r = out.detach().reshape(-1), ref.detach().reshape(-1)
    err = scale = 0.0
    for i in range(0, r.numel(), _AGREE_CHUNK):  # in chunks: no full-size fp32 copies of a big output
        oc, rc = o[i : i + _AGREE_CHUNK].float(), r[i : i + _AGREE_CHUNK].float()
        finite = torch.isfinite(rc)
        if not bool(finite.all()):
            same = torch.equal(torch.isnan(oc), torch.isnan(rc)) and torch.equal(
                torch.where(torch.isinf(rc), rc, 0.0), torch.where(torch.isinf(oc), oc, 0.0)
            )
            if not same:
                return "non-finite elements elsewhere"
            oc, rc = torch.where(finite, oc, 0.0), torch.where(finite, rc, 0.0)
        d = torch.sub(oc, rc).abs_()
        chunk_err = float(d.max())
        err = chunk_err if chunk_err != chunk_err else max(err, chunk_err)  # a NaN stays (max drops it)
        scale = max(scale, float(rc.abs().max()))  # (rc may be ref itself: not in place)
        if err != err:
            break
    if not err <= tol * scale:  # also a NaN in ``out``
        return f"largest difference {err:.3g} > {tol:.3g} x largest |value| {scale:.3g}"
    return None


def random_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every floating tensor replaced by standard normal values of the same
    shape, strides, dtype and device: what ``Measured`` compares candidates on, where the real values
    may hide a difference (LoRA's B starts at zero: the low-rank terms and their gradients are zero on
    the first step)."""

    def rand(t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        span = (
            1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
        )
        return torch.randn(span, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride())

    return tuple(rand(a) for a in args), {k: rand(v) for k, v in kwargs.items()}


class Measured:
    """A callable that runs the fastest of ``candidates`` (same signature, same result up to rounding).

    ``key(*args, **kwargs)`` names what the choice depends on (shapes, dtypes, device), or returns None
    where only ``default`` may run (e.g. a dropout mask other steps must regenerate); ``offered`` (same
    arguments) narrows the candidates where only some compute the same values, and the key must
    determine its answer. The first positional argument is a tensor on the op's device. Off CUDA, and
    while a CUDA graph is being captured on the current stream (nothing may sync), ``default`` runs
    unmeasured, unless a ``timer`` is given (tests). A candidate other than the default that raises on
    its first run is left out (logged); the default's error is raised. So is any candidate, the default
    included, whose output is not the ``reference``'s up to rounding (``disagreement``; the reference
    is the library's implementation, the default unless named): a kernel miscompiled on some GPU or
    Triton version must neither win by being fast nor shut the library's out. The outputs are compared
    on ``probe(args, kwargs)`` (e.g. ``random_args``: the real values may hide a difference, as zeros
    do), then each candidate runs once on the real arguments before the timing. Measuring syncs the
    device: not while another thread captures a CUDA graph in global mode.
    """

    def __init__(
        self,
        op: str,
        candidates: dict[str, Callable[..., Any]],
        key: Callable[..., tuple | None],
        default: str,
        *,
        reps: int = 5,
        timer: Timer | None = None,
        offered: Callable[..., Collection[str]] | None = None,
        reference: str | None = None,
        probe: Callable[[tuple, dict], tuple[tuple, dict]] | None = None,
    ) -> None:
        for role, name in (("default", default), ("reference", reference or default)):
            if name not in candidates:
                raise ValueError(f"{op}: {role} {name!r} is not one of the candidates {sorted(candidates)}")
        self.op = op
        self.candidates = candidates
        self.key = key
        self.default = default
        self.reps = reps
        self.timer = timer
        self.offered = offered  # the candidates these arguments allow (all when None); the key decides it
        self.reference = reference or default
        self.probe = probe
        self.chosen: dict[tuple, str] = {}  # key -> candidate name (measured, or pinned by the env var)
        self.times: dict[tuple, dict[str, float]] = {}  # key -> what the measurement gave (ms)
        _ALL.add(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key(*args, **kwargs)
        if key is None:
            return self.candidates[self.default](*args, **kwargs)
        name = self.chosen.get(key) or self._choose(key, args, kwargs)
        return self.candidates[name](*args, **kwargs)

    def _choose(self, key: tuple, args: tuple, kwargs: dict) -> str:
        mode = os.environ.get(ENV) or "measure"
        if mode == "default":
            return self._remember(key, self.default)
        allowed = self.candidates.keys() if self.offered is None else self.offered(*args, **kwargs)
        if mode != "measure":
            if mode in self.candidates:
                return self._remember(key, mode if mode in allowed else self.default)
            names = sorted({n for m in list(_ALL) for n in m.candidates})
            if mode in names:  # another op's candidate (MUSCLE_FAST_PICK=cublas on a 4-bit dequant)
                return self._remember(key, self.default)
            raise ValueError(f"{ENV} must be one of {[*MODES, *names]}, got {mode!r} (at {self.op})")
        device = args[0].device
        if self.timer is None and device.type != "cuda":
            return self._remember(key, self.default)
        if device.type != "cuda":
            return self._measure(key, args, kwargs, allowed)
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():
                return self.default  # not remembered: measured on the first call outside a capture
            return self._measure(key, args, kwargs, allowed)

    def _measure(self, key: tuple, args: tuple, kwargs: dict, allowed: Collection[str]) -> str:
        reference = self.reference if self.reference in allowed else self.default
        rest = dict.fromkeys((self.default, *self.candidates))  # the default first: ties go to it
        order = [reference, *(n for n in rest if n != reference and n in allowed)]
        check_args, check_kwargs = self.probe(args, kwargs) if self.probe else (args, kwargs)
        ref: Any = None
        kept: list[str] = []
        for name in order:
            try:
                out = self.candidates[name](*check_args, **check_kwargs)  # also compiles and autotunes
            except Exception as exc:  # noqa: BLE001 - the default's error is the op's error
                if name == self.default:
                    raise
                _log.warning("%s: candidate %r failed at %s (%s: %s); not used", self.op, name, key,
                             type(exc).__name__, exc)  # fmt: skip
                continue
            if name == reference:
                ref = out
            else:
                off = disagreement(out, ref)
                del out  # not held through the other candidates' runs
                if off is not None:  # a miscompiled kernel must not win by being fast
                    _log.warning("%s: candidate %r disagrees with %r at %s (%s); not used", self.op, name,
                                 reference, key, off)  # fmt: skip
                    continue
            kept.append(name)
        del ref, check_args, check_kwargs
        if self.default in kept:  # ties go to the default: listed first
            kept.insert(0, kept.pop(kept.index(self.default)))
        if len(kept) <= 1:  # nothing to measure against (or the reference alone failed: the default)
            return self._remember(key, kept[0] if kept else self.default)
        fns = [self._bound(name, args, kwargs) for name in kept]
        for fn in fns:
            fn()  # warm-up on the real arguments (their alignment may compile another specialisation)
        got = (self.timer or cuda_times)(fns, self.reps)
        times = dict(zip(kept, got, strict=True))
        best = min(kept, key=times.__getitem__)
        _log.info("%s %s: %s -> %s", self.op, key, times, best)
        return self._remember(key, best, times)

    def _bound(self, name: str, args: tuple, kwargs: dict) -> Callable[[], object]:
        fn = self.candidates[name]
        return lambda: fn(*args, **kwargs)

    def _remember(self, key: tuple, name: str, times: dict[str, float] | None = None) -> str:
        if len(self.chosen) >= 4096:  # a few keys per layer shape in practice; bound it anyway
            self.forget()
        self.chosen[key] = name
        if times is not None:
            self.times[key] = times
        return name

    def forget(self) -> None:
        """Drop every remembered choice (the next call of each key chooses again)."""
        self.chosen.clear()
        self.times.clear()


_ALL: weakref.WeakSet[Measured] = weakref.WeakSet()


def forget_all() -> None:
    """Drop the remembered choices of every ``Measured`` op (after changing ``MUSCLE_FAST_PICK``)."""
    for m in list(_ALL):
        m.forget()


def choices(*measured: Measured) -> dict[str, list[dict[str, Any]]]:
    """What these ops chose per key, with the measured times (ms) where they were measured; for
    benchmark records and logs."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in measured:
        rows = out.setdefault(m.op, [])
        for key, name in m.chosen.items():
            rows.append({"key": [str(k) for k in key], "chosen": name, "ms": m.times.get(key)})
    return out
