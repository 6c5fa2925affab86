"""Gradient alignment (SPEC section 4): steer the training gradient onto the clean reference gradient.

For every trainable tensor, with ``g`` its training gradient and ``c`` its reference
gradient, ``g_a = |<g, c>| / ||c||^2 * c``. One decision per step, for all tensors:

* mode 1 (aligned): mean over tensors of ||c|| > ``min_ref_grad_norm`` and
  ``ref_loss > min_ref_loss``: ``g := g_a``;
* mode 2 (mixed): else if ``max_raw_grad_ratio > 0`` and ``epoch >= ga_epoch``:
  ``g := (1 - rho) g_a + rho g``, ``rho`` as in :func:`raw_grad_ratio`;
* mode 0 (kept): else ``g`` is kept.

A tensor with ||g|| = 0, ||c|| = 0, no reference gradient, or a non-finite ``g`` /
``c`` / ``<g, c>`` keeps its ``g``. The mean ||c|| is over tensors whose ``c`` is
finite with ||c|| > 0 (0 when there is none). Non-finite tensors are counted in the
stats; when ``g`` itself is non-finite the caller should skip the optimizer step
(:attr:`AlignStats.nonfinite_grad`), since keeping ``g`` cannot make it finite.

Three implementations of the same rule:

* :func:`align_loop_reference` — the paper's per-tensor Python loop (CPU round trip of
  every reference gradient, ``.item()`` per tensor), in float64: the benchmark
  baseline and the test oracle;
* torch path — ``torch._foreach_norm`` norms (fp32 accumulation), ``torch._foreach_mul``
  products summed per tensor in fp64, decision in fp64 tensors with ``torch.where``,
  per-tensor ``torch.where`` update; no host sync. Used on CPU and as a cross-check;
* fused path — two Triton launches over all tensors (``muscle_fast.kernels.align``):
  fp32 chunk partials combined per tensor in fp64 in a fixed order (deterministic).
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from muscle_fast.config import resolve_backend
from muscle_fast.kernels import _common

__all__ = ["AlignStats", "GradientAligner", "align_loop_reference", "raw_grad_ratio"]


# Layout of the stats vector, shared with the fused kernels (kept here so the torch path needs no triton).
# Index 7 holds the number of tensors that entered the mean ||c||.
_MODE, _MEAN_REF_NORM, _RHO, _N_NONFINITE, _N_NONFINITE_GRAD, _N_UPDATED, _REF_LOSS, _N_REF = range(8)


def _f32(x: float) -> float:
    """``x`` rounded to float32. Thresholds and the ref loss are compared as fp32 values in every path
    (the kernels take fp32 scalars; the paper compares fp32 loss/norm tensors with Python floats, which
    torch also does in fp32), so that the three implementations take the same decision at a boundary."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def raw_grad_ratio(epoch: float, max_raw_grad_ratio: float, ga_epoch: float, epochs: float) -> float:
    """Weight ``rho`` of the raw gradient in the mixed branch (host-side: it depends on the epoch only).

    ``rho = max_raw_grad_ratio * (epoch - ga_epoch) / (epochs - ga_epoch)``, clamped to
    ``[0, 1]``. When ``epochs <= ga_epoch`` the schedule has no length (the paper's code
    divides by zero); we then use ``rho = max_raw_grad_ratio``, the value the schedule ends at.
    """
    if epochs > ga_epoch:
        rho = max_raw_grad_ratio * (epoch - ga_epoch) / (epochs - ga_epoch)
    else:
        rho = max_raw_grad_ratio
    return min(max(float(rho), 0.0), 1.0)


def _mixed_open(epoch: float, max_raw_grad_ratio: float, ga_epoch: float) -> bool:
    return max_raw_grad_ratio > 0 and epoch >= ga_epoch


class AlignStats:
    """Per-step alignment stats, kept as device tensors so that reading them is the caller's choice.

    Fields (0-d tensors, views of one float64 vector ``raw``; no host sync until read):
    ``mode`` (0 kept, 1 aligned, 2 mixed), ``mean_ref_norm`` (mean ||c|| over tensors
    with finite ||c|| > 0), ``rho`` (raw-gradient weight used; 0 unless mode 2),
    ``n_nonfinite`` (tensors whose g, c or <g,c> is non-finite; they kept g),
    ``n_nonfinite_grad`` (of those, tensors whose g is non-finite), ``n_updated``
    (tensors rewritten), ``ref_loss``. All are float64 (compare ``stats.mode == 1``).
    :meth:`to_dict` syncs once and warns (once per aligner) about non-finite gradients.
    A new vector per step, so stats of earlier steps stay valid.
    """

    def __init__(self, raw: torch.Tensor, owner: GradientAligner | None = None) -> None:
        self.raw = raw
        self._owner = owner

    mode = property(lambda self: self.raw[_MODE], doc="0 kept, 1 aligned, 2 mixed (float64 0-d tensor)")
    mean_ref_norm = property(lambda self: self.raw[_MEAN_REF_NORM], doc="mean ||c|| over finite, non-zero c")
    rho = property(lambda self: self.raw[_RHO], doc="raw-gradient weight applied (0 unless mode 2)")
    n_nonfinite = property(lambda self: self.raw[_N_NONFINITE], doc="tensors with non-finite g, c or <g,c>")
    n_nonfinite_grad = property(lambda self: self.raw[_N_NONFINITE_GRAD], doc="tensors with non-finite g")
    n_updated = property(lambda self: self.raw[_N_UPDATED], doc="tensors whose g was rewritten")
    ref_loss = property(lambda self: self.raw[_REF_LOSS], doc="reference loss the decision saw")

    @property
    def nonfinite_grad(self) -> torch.Tensor:
        """0-d bool device tensor: some g is non-finite, so the optimizer step should be skipped."""
        return self.raw[_N_NONFINITE_GRAD] > 0

    def to_dict(self) -> dict[str, float]:
        """Host copy of the stats (one sync); warns once per aligner if any tensor was non-finite."""
        v = self.raw.tolist()
        d = {
            "mode": int(v[_MODE]),
            "mean_ref_norm": v[_MEAN_REF_NORM],
            "rho": v[_RHO],
            "n_nonfinite": int(v[_N_NONFINITE]),
            "n_nonfinite_grad": int(v[_N_NONFINITE_GRAD]),
            "n_updated": int(v[_N_UPDATED]),
            "ref_loss": v[_REF_LOSS],
        }
        if d["n_nonfinite"] and self._owner is not None:
            self._owner._warn_nonfinite(d["n_nonfinite"], d["n_nonfinite_grad"])
        return d

    def __repr__(self) -> str:
        return f"AlignStats(raw={self.raw})"


class GradientAligner:
    """Rewrites ``p.grad`` in place by the SPEC section 4 rule, one call per optimizer step.

    ``backend``: ``"auto"`` (fused Triton on CUDA, torch on CPU), ``"torch"`` or
    ``"triton"`` (CPU tensors only under ``TRITON_INTERPRET=1``). The environment
    variable ``MUSCLE_FAST_BACKEND`` overrides the argument. Neither path syncs with
    the host; the returned :class:`AlignStats` holds device tensors.
    """

    #: Fused launch geometry: elements per vector step, and steps per chunk (one program per chunk).
    fused_block: int = 1024
    fused_iters: int = 8
    fused_num_warps: int = 4
    fused_rblock: int = 128

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        min_ref_grad_norm: float = 5e-7,
        min_ref_loss: float = 0.4,
        max_raw_grad_ratio: float = 0.1,
        ga_epoch: float = 1,
        epochs: float = 10,
        backend: str = "auto",
    ) -> None:
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("GradientAligner needs at least one parameter, got an empty list")
        self.min_ref_grad_norm = float(min_ref_grad_norm)
        self.min_ref_loss = float(min_ref_loss)
        self.max_raw_grad_ratio = float(max_raw_grad_ratio)
        self.ga_epoch = ga_epoch
        self.epochs = epochs
        self.backend = resolve_backend(backend)  # MUSCLE_FAST_BACKEND overrides, as everywhere
        self._device_index = self.params[0].get_device()  # -1 on CPU
        self._shapes = tuple(p.shape for p in self.params)  # parameter shapes are fixed for the run
        self._plan: Any = None
        self._warned = False

    # -- public ---------------------------------------------------------------------------------------------
    def align(
        self, ref_grads: Sequence[torch.Tensor | None], ref_loss: torch.Tensor | float, epoch: float
    ) -> AlignStats:
        """Align every ``p.grad`` onto its reference gradient (same order as ``params``); returns stats.

        ``p.grad`` is rewritten in place: no reference gradient may share memory with any ``p.grad``
        (a later tensor's c would be read after an earlier g overwrote it). Norms and dot products
        accumulate in fp32 per chunk: a gradient whose squared norm passes fp32's range (elements
        ~1e19) is reported non-finite and the step skipped; one below it (~1e-23) counts as zero.
        """
        grads, refs = self._validate(ref_grads)
        if isinstance(ref_loss, torch.Tensor) and ref_loss.numel() != 1:
            raise ValueError(f"ref_loss must be a scalar, got a tensor of shape {tuple(ref_loss.shape)}")
        rho = raw_grad_ratio(epoch, self.max_raw_grad_ratio, self.ga_epoch, self.epochs)
        mixed = _mixed_open(epoch, self.max_raw_grad_ratio, self.ga_epoch)
        raw = None
        if self.backend == "triton" or (self.backend == "auto" and self._device_index >= 0):
            raw = self._align_fused(grads, refs, ref_loss, rho, mixed)
        if raw is None:
            self._check_refs(refs)
            with torch.no_grad():
                raw = _align_torch(
                    grads,
                    refs,
                    ref_loss,
                    self.min_ref_grad_norm,
                    self.min_ref_loss,
                    rho,
                    mixed,
                    self.params[0].device,
                )
        return AlignStats(raw, self)

    # -- internals ------------------------------------------------------------------------------------------
    def _validate(
        self, ref_grads: Sequence[torch.Tensor | None]
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Length check; the per-tensor checks run inside each path's own loop (one pass per step)."""
        refs = list(ref_grads)
        if len(refs) != len(self.params):
            raise ValueError(f"ref_grads has {len(refs)} entries but there are {len(self.params)} params")
        return [p.grad for p in self.params], refs

    def _check_refs(self, refs: list[torch.Tensor | None]) -> None:
        dev = self._device_index
        for i, (p, c) in enumerate(zip(self.params, refs, strict=True)):
            if c is not None:
                if c.shape != p.shape:
                    raise ValueError(
                        f"ref_grads[{i}] has shape {tuple(c.shape)} but param {i} has shape {tuple(p.shape)}"
                    )
                if c.get_device() != dev:
                    raise ValueError(f"ref_grads[{i}] is on {c.device} but param {i} is on {p.device}")

    def _align_fused(
        self,
        grads: list[torch.Tensor | None],
        refs: list[torch.Tensor | None],
        ref_loss: torch.Tensor | float,
        rho: float,
        mixed: bool,
    ) -> torch.Tensor | None:
        """Two-launch Triton path; None when ``auto`` must fall back (a dtype the kernels lack)."""
        _common.check_device(self.params[0])  # clear error for CPU tensors without the interpreter
        # lazy: triton must be imported after TRITON_INTERPRET is set
        from muscle_fast.kernels import align as kalign

        plan = self._plan
        if plan is None:
            plan = self._plan = kalign.build_plan(
                self._shapes,
                self.params[0].device,
                self.fused_block,
                self.fused_iters,
                self.fused_num_warps,
                self.fused_rblock,
            )
        if not all([g is None or g.is_contiguous() for g in grads]):
            for i, g in enumerate(grads):
                if g is not None and not g.is_contiguous():
                    # Rare (non-dense parameter layouts): the kernels address g flat, so give p a dense grad.
                    grads[i] = self.params[i].grad = g.contiguous()
        if not all([c is None or c.is_contiguous() for c in refs]):
            refs = [c if c is None or c.is_contiguous() else c.contiguous() for c in refs]
        if isinstance(ref_loss, torch.Tensor) and ref_loss.device.type == "cpu" and self._device_index >= 0:
            ref_loss = float(ref_loss)  # host memory: reading it does not sync the device
        try:
            return kalign.align_fused(
                plan,
                grads,
                refs,
                ref_loss,
                min_ref_grad_norm=self.min_ref_grad_norm,
                min_ref_loss=self.min_ref_loss,
                rho=rho,
                mixed_ok=mixed,
            )
        except kalign.UnsupportedDtypeError:
            if self.backend == "auto":
                return None  # e.g. float64 grads: the torch path handles them
            raise

    def _warn_nonfinite(self, n_nonfinite: int, n_nonfinite_grad: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"gradient alignment: {n_nonfinite} tensor(s) had a non-finite gradient or reference gradient "
            f"({n_nonfinite_grad} with non-finite g); they kept their raw gradient. Skip the optimizer step "
            f"when stats.nonfinite_grad is true. (warned once per aligner)",
            RuntimeWarning,
            stacklevel=3,
        )


# -- torch path ---------------------------------------------------------------------------------------------
def _align_torch(
    grads: list[torch.Tensor | None],
    refs: list[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    min_ref_grad_norm: float,
    min_ref_loss: float,
    rho: float,
    mixed: bool,
    device: torch.device,
) -> torch.Tensor:
    """Torch implementation, no host sync: the readable fast-enough path for CPU and for checking.

    ||g||, ||c||: ``torch._foreach_norm`` (fp32 accumulation, fp32 inputs: bf16/fp16 are
    upcast first). <g, c>: ``torch._foreach_mul`` products summed per tensor in fp64.
    Decision and coefficients: float64 [T] tensors combined with ``torch.where``. Update:
    per-tensor ``torch.where`` (so that a kept tensor is never touched by a NaN in c).
    """
    T = len(grads)
    f64 = dict(dtype=torch.float64, device=device)
    zero32 = torch.zeros((), dtype=torch.float32, device=device)
    g32 = [None if g is None else g.float() for g in grads]
    c32 = [None if c is None else c.float() for c in refs]
    gi = [i for i in range(T) if g32[i] is not None]
    ci = [i for i in range(T) if c32[i] is not None]
    pi = [i for i in range(T) if g32[i] is not None and c32[i] is not None]

    def stack_at(idx: list[int], vals: Sequence[torch.Tensor]) -> torch.Tensor:
        """[T] float64 vector from 0-d values at positions ``idx`` (0 elsewhere), one stack."""
        if len(idx) == T:
            return torch.stack(list(vals)).to(torch.float64)
        zero = zero32.to(vals[0].dtype)
        full: list[torch.Tensor] = [zero] * T
        for i, v in zip(idx, vals, strict=True):
            full[i] = v
        return torch.stack(full).to(torch.float64)

    gn = stack_at(gi, torch._foreach_norm([g32[i] for i in gi])) if gi else torch.zeros(T, **f64)
    cn = stack_at(ci, torch._foreach_norm([c32[i] for i in ci])) if ci else torch.zeros(T, **f64)
    if pi:
        # Products multi-tensor; the signed sums per tensor in fp64 (a sum of mixed-sign terms
        # has no foreach form that stays accurate when g and c are nearly orthogonal).
        prods = torch._foreach_mul([g32[i] for i in pi], [c32[i] for i in pi])
        dots = [p.sum(dtype=torch.float64) for p in prods]
        del prods
        dot = stack_at(pi, dots)
    else:
        dot = torch.zeros(T, **f64)
    gg, cc = gn * gn, cn * cn

    g_fin, c_fin, d_fin = torch.isfinite(gg), torch.isfinite(cc), torch.isfinite(dot)
    c_ok = c_fin & (cc > 0)
    n_ref = c_ok.sum().to(torch.float64)
    mean_norm = torch.where(c_ok, cn, 0.0).sum() / n_ref.clamp_min(1.0)
    if isinstance(ref_loss, torch.Tensor) and ref_loss.device == device:
        loss = ref_loss.detach().reshape(()).to(torch.float32).to(torch.float64)
    else:
        loss = torch.full((), _f32(float(ref_loss)), **f64)  # a fill, not a host->device copy
    aligned = (mean_norm > _f32(min_ref_grad_norm)) & (loss > _f32(min_ref_loss))
    mode = torch.where(aligned, 1.0, 2.0 if mixed else 0.0).to(torch.float64)
    w_raw = torch.where(aligned, 0.0, float(rho)).to(torch.float64)
    ok = g_fin & c_fin & d_fin & (gg > 0) & (cc > 0)
    coef = dot.abs() / torch.where(ok, cc, 1.0)
    ok = ok & torch.isfinite(coef) & (mode != 0)
    a = torch.where(ok, (1.0 - w_raw) * coef, 0.0).to(torch.float32)
    b = torch.where(ok, w_raw, 1.0).to(torch.float32)
    for i in pi:
        g, gf, cf = grads[i], g32[i], c32[i]
        assert g is not None and gf is not None and cf is not None
        g.copy_(torch.where(ok[i], a[i] * cf + b[i] * gf, gf))

    n_nf = (~(g_fin & c_fin & d_fin)).sum().to(torch.float64)
    n_nf_g = (~g_fin).sum().to(torch.float64)
    rho_out = torch.where(mode == 2.0, w_raw, 0.0)
    return torch.stack([mode, mean_norm, rho_out, n_nf, n_nf_g, ok.sum().to(torch.float64), loss, n_ref])


# -- the paper's loop (baseline and oracle) ------------------------------------------------------------------
def align_loop_reference(
    params: Sequence[torch.Tensor],
    ref_grads: Sequence[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    epoch: float,
    *,
    min_ref_grad_norm: float = 5e-7,
    min_ref_loss: float = 0.4,
    max_raw_grad_ratio: float = 0.1,
    ga_epoch: float = 1,
    epochs: float = 10,
) -> dict[str, float]:
    """The rule as the paper's code runs it: a Python loop, ``.item()`` per tensor, CPU round trips.

    Kept as the readable statement of the rule, the benchmark baseline and, since it
    works in float64, the test oracle. Same guards as the fast paths (zero / missing /
    non-finite tensors keep g). Returns host stats with the keys of ``AlignStats.to_dict``.
    """
    if len(ref_grads) != len(params):
        raise ValueError(f"ref_grads has {len(ref_grads)} entries but there are {len(params)} params")
    # The paper accumulates reference gradients on the CPU and moves them back per step.
    refs64 = [None if c is None else c.detach().cpu().to(torch.float64) for c in ref_grads]
    cnorms = [None if c is None else c.norm().item() for c in refs64]
    valid = [n for n in cnorms if n is not None and math.isfinite(n) and n > 0]
    mean_norm = sum(valid) / len(valid) if valid else 0.0
    loss = _f32(float(ref_loss))
    if mean_norm > _f32(min_ref_grad_norm) and loss > _f32(min_ref_loss):
        mode, w_raw = 1, 0.0
    elif _mixed_open(epoch, max_raw_grad_ratio, ga_epoch):
        mode, w_raw = 2, raw_grad_ratio(epoch, max_raw_grad_ratio, ga_epoch, epochs)
    else:
        mode, w_raw = 0, 0.0
    n_nf = n_nf_g = n_upd = 0
    for p, c, cn in zip(params, refs64, cnorms, strict=True):
        g = None if p.grad is None else p.grad.detach().to(torch.float64).flatten()
        gn = 0.0 if g is None else g.norm().item()
        cn = 0.0 if cn is None else cn
        if g is not None and c is not None:
            c = c.to(g.device).flatten()  # ... and back to the device, per tensor
            dot = torch.dot(g, c).item()
        else:
            dot = 0.0
        finite = math.isfinite(gn) and math.isfinite(cn) and math.isfinite(dot)
        n_nf += not finite
        n_nf_g += not math.isfinite(gn)
        if g is None or c is None or not finite or mode == 0 or gn == 0 or cn == 0:
            continue  # keep g
        coef = abs(dot) / (cn * cn)
        if not math.isfinite(coef):
            continue
        new = (1.0 - w_raw) * coef * c + w_raw * g
        p.grad.copy_(new.reshape(p.grad.shape).to(p.grad.dtype))
        n_upd += 1
    return {
        "mode": mode,
        "mean_ref_norm": mean_norm,
        "rho": w_raw if mode == 2 else 0.0,
        "n_nonfinite": n_nf,
        "n_nonfinite_grad": n_nf_g,
        "n_updated": n_upd,
        "ref_loss": loss,
    }
