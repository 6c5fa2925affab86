"""Gradient alignment (SPEC section 4): steer the training gradient onto the clean reference gradient.

For every trainable tensor, with ``g`` its training gradient and ``c`` its reference
gradient, ``g_a = |<g, c>| / ||c||^2 * c``. One decision per step, for all tensors:

* mode 1 (aligned): mean over tensors of ||c|| > ``min_ref_grad_norm`` and
  ``ref_loss > min_ref_loss``: ``g := g_a``;
* mode 2 (mixed): else if ``max_raw_grad_ratio > 0`` and ``epoch >= ga_epoch``:
  ``g := (1 - rho) g_a + rho g``, ``rho`` as in :func:`raw_grad_ratio`;
* mode 0 (kept): else ``g`` is kept.

Option (not in the paper; off by default): ``keep_raw_cos`` -- in mode 1 a tensor whose
cos(g, c) is at least this keeps its raw ``g`` instead of ``g_a``, so the part of the
training gradient that already agrees with the reference is not thrown away.

Option (not in the paper; off by default): ``ref_subspace`` K -- ``g_a`` becomes the projection
of ``g`` onto the span of the tensor's last K reference gradients (this step's included), so the
training gradient keeps every component that lies in directions the clean set has asked for
recently, and loses the rest (a trigger's direction, which no clean batch asks for). Torch path
only (one host sync per step for the validity of each ``c``); K float64 copies of the trainable
parameters.

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
* fused path — two Triton launches over all tensors (``csrc_triton/align.py``):
  fp32 chunk partials combined per tensor in fp64 in a fixed order (deterministic).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from csrc_triton._common import (
    STAT_MEAN_REF_NORM,
    STAT_MODE,
    STAT_N_NONFINITE,
    STAT_N_NONFINITE_GRAD,
    STAT_N_UPDATED,
    STAT_REF_LOSS,
    STAT_RHO,
)
from muscle_fast.config import ALIGN_DEFAULTS, check_align_settings
from muscle_fast.ops.align import (
    RefSubspace,
    align_fused,
    align_loop_reference,
    align_torch,
    build_fused_plan,
    mixed_open,
    raw_grad_ratio,
)
from muscle_fast.ops.dispatch import resolve_backend, use_kernels

__all__ = ["AlignStats", "GradientAligner", "align_loop_reference", "raw_grad_ratio"]

_GRAD = operator.attrgetter("grad")


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

    mode = property(lambda self: self.raw[STAT_MODE], doc="0 kept, 1 aligned, 2 mixed (float64 0-d tensor)")
    mean_ref_norm = property(lambda self: self.raw[STAT_MEAN_REF_NORM], doc="mean ||c||, finite non-zero c")
    rho = property(lambda self: self.raw[STAT_RHO], doc="raw-gradient weight applied (0 unless mode 2)")
    n_nonfinite = property(lambda self: self.raw[STAT_N_NONFINITE], doc="tensors: non-finite g, c or <g,c>")
    n_nonfinite_grad = property(lambda self: self.raw[STAT_N_NONFINITE_GRAD], doc="tensors with non-finite g")
    n_updated = property(lambda self: self.raw[STAT_N_UPDATED], doc="tensors whose g was rewritten")
    ref_loss = property(lambda self: self.raw[STAT_REF_LOSS], doc="reference loss the decision saw")

    @property
    def nonfinite_grad(self) -> torch.Tensor:
        """0-d bool device tensor: some g is non-finite, so the optimizer step should be skipped."""
        return self.raw[STAT_N_NONFINITE_GRAD] > 0

    def to_dict(self) -> dict[str, float]:
        """Host copy of the stats (one sync); warns once per aligner if any tensor was non-finite."""
        v = self.raw.tolist()
        d = {
            "mode": int(v[STAT_MODE]),
            "mean_ref_norm": v[STAT_MEAN_REF_NORM],
            "rho": v[STAT_RHO],
            "n_nonfinite": int(v[STAT_N_NONFINITE]),
            "n_nonfinite_grad": int(v[STAT_N_NONFINITE_GRAD]),
            "n_updated": int(v[STAT_N_UPDATED]),
            "ref_loss": v[STAT_REF_LOSS],
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

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        min_ref_grad_norm: float = ALIGN_DEFAULTS.min_ref_grad_norm,
        min_ref_loss: float = ALIGN_DEFAULTS.min_ref_loss,
        max_raw_grad_ratio: float = ALIGN_DEFAULTS.max_raw_grad_ratio,
        ga_epoch: float = ALIGN_DEFAULTS.ga_epoch,
        epochs: float = ALIGN_DEFAULTS.epochs,
        backend: str = "auto",
        keep_raw_cos: float | None = None,
        ref_subspace: int = 0,
    ) -> None:
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("GradientAligner needs at least one parameter, got an empty list")
        check_align_settings(
            "GradientAligner ", min_ref_grad_norm, min_ref_loss, max_raw_grad_ratio, ga_epoch
        )
        self.min_ref_grad_norm = float(min_ref_grad_norm)
        self.min_ref_loss = float(min_ref_loss)
        self.max_raw_grad_ratio = float(max_raw_grad_ratio)
        self.ga_epoch = ga_epoch
        self.epochs = epochs
        if keep_raw_cos is not None and not (math.isfinite(keep_raw_cos) and -1.0 <= keep_raw_cos <= 1.0):
            raise ValueError(f"GradientAligner keep_raw_cos must be None or in [-1, 1], got {keep_raw_cos!r}")
        self.keep_raw_cos = None if keep_raw_cos is None else float(keep_raw_cos)
        self.backend = resolve_backend(backend)  # MUSCLE_FAST_BACKEND overrides, as everywhere
        self._device_index = self.params[0].get_device()  # -1 on CPU
        self._shapes = tuple(p.shape for p in self.params)  # parameter shapes are fixed for the run
        if isinstance(ref_subspace, bool) or not isinstance(ref_subspace, int) or ref_subspace < 0:
            raise ValueError(f"GradientAligner ref_subspace must be an int >= 0, got {ref_subspace!r}")
        if ref_subspace and self.keep_raw_cos is not None:
            raise ValueError("GradientAligner: ref_subspace and keep_raw_cos cannot be combined; set one")
        if ref_subspace and self.backend == "triton":
            raise ValueError(
                "GradientAligner: ref_subspace has no fused kernel; use backend 'torch' or 'auto' "
                "(MUSCLE_FAST_BACKEND=triton forces the kernel)"
            )
        self.ref_subspace = ref_subspace
        self.subspace = (
            RefSubspace(ref_subspace, self._shapes, self.params[0].device) if ref_subspace else None
        )
        self._plan: Any = None
        self._warned = False
        # fused launch geometry (csrc_triton.configs "align.fused"); tests shrink it per instance
        self.fused_block: int | None = None
        self.fused_iters: int | None = None
        self.fused_num_warps: int | None = None
        self.fused_rblock: int | None = None

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
        mixed = mixed_open(epoch, self.max_raw_grad_ratio, self.ga_epoch)
        raw = None
        projected = None
        if self.subspace is not None:
            self._check_refs(refs)
            projected = self._project(grads, refs)
        elif use_kernels(self.backend, self.params[0].device, op="GradientAligner"):
            raw = self._align_fused(grads, refs, ref_loss, rho, mixed)
        if raw is None:
            if projected is None:
                self._check_refs(refs)
            with torch.no_grad():
                raw = align_torch(
                    grads,
                    refs,
                    ref_loss,
                    self.min_ref_grad_norm,
                    self.min_ref_loss,
                    rho,
                    mixed,
                    self.params[0].device,
                    self.keep_raw_cos,
                    projected,
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
        return list(map(_GRAD, self.params)), refs

    def _project(
        self, grads: list[torch.Tensor | None], refs: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """Push every finite non-zero ``c`` into the subspace buffers; ``P g`` per tensor (None: keep g)."""
        assert self.subspace is not None
        idx = [i for i, c in enumerate(refs) if c is not None]
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm([refs[i].float() for i in idx])).tolist() if idx else []
            out: list[torch.Tensor | None] = [None] * len(refs)
            for i, n in zip(idx, norms, strict=True):
                c, g = refs[i], grads[i]
                if not (math.isfinite(n) and n > 0):
                    continue  # not a direction: the tensor keeps g (align_torch sees the same c)
                self.subspace.push(i, c)
                if g is not None:
                    out[i] = self.subspace.project(i, g.float())
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to align bit for bit (the subspace buffers; empty otherwise)."""
        return {} if self.subspace is None else {"ref_subspace": self.subspace.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a ValueError when it was saved with other settings)."""
        has = "ref_subspace" in state
        if has != (self.subspace is not None):
            raise ValueError(
                f"GradientAligner state {'has' if has else 'lacks'} ref_subspace buffers, "
                f"this aligner has ref_subspace={self.ref_subspace}"
            )
        if self.subspace is not None:
            self.subspace.load_state_dict(state["ref_subspace"])

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
        """The fused path (``ops.align.align_fused``); None when ``auto`` must fall back."""
        if self._plan is None:
            self._plan = build_fused_plan(
                self._shapes,
                self.params[0].device,
                self.fused_block,
                self.fused_iters,
                self.fused_num_warps,
                self.fused_rblock,
            )
        return align_fused(
            self._plan,
            self.params,
            grads,
            refs,
            ref_loss,
            min_ref_grad_norm=self.min_ref_grad_norm,
            min_ref_loss=self.min_ref_loss,
            rho=rho,
            mixed=mixed,
            fallback=self.backend == "auto",
            keep_raw_cos=self.keep_raw_cos,
        )

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
