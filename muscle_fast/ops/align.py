"""Gradient alignment (SPEC §4): the torch path, the paper's loop (reference) and the rho schedule.

Kernels: ``csrc_triton/align.py``; the user-facing ``GradientAligner`` (``muscle_fast.align``)
dispatches between them and this torch path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from csrc_triton._common import round_f32 as _f32
from muscle_fast.config import ALIGN_DEFAULTS

__all__ = [
    "align_fused",
    "align_loop_reference",
    "align_torch",
    "build_fused_plan",
    "mixed_open",
    "raw_grad_ratio",
    "RefSubspace",
    "SUBSPACE_RTOL",
]

#: Relative singular-value cutoff of the reference-subspace projection: directions of the span of the
#: kept reference gradients whose singular value is below this times the largest are dropped (the
#: float64 loop uses ``torch.linalg.pinv(..., rtol=SUBSPACE_RTOL)``, the fast path the same cut on
#: the Gram matrix's eigenvalues, squared).
SUBSPACE_RTOL = 1e-6


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


def mixed_open(epoch: float, max_raw_grad_ratio: float, ga_epoch: float) -> bool:
    """Whether the mixed branch (mode 2) may run at this epoch."""
    return max_raw_grad_ratio > 0 and epoch >= ga_epoch


# -- torch path ---------------------------------------------------------------------------------------------
def align_torch(
    grads: list[torch.Tensor | None],
    refs: list[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    min_ref_grad_norm: float,
    min_ref_loss: float,
    rho: float,
    mixed: bool,
    device: torch.device,
    keep_raw_cos: float | None = None,
    projected: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Torch implementation, no host sync: the readable fast-enough path for CPU and for checking.

    ``projected`` (the ``ref_subspace`` option): per tensor the training gradient projected onto
    the span of its recent reference gradients (:class:`RefSubspace`), used instead of ``g_a``;
    a tensor whose entry is None keeps ``g``.

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
    if projected is not None:  # the subspace option: the direction is P g itself, weight 1 - rho
        has = torch.tensor([projected[i] is not None for i in range(T)], device=device)
        ok = ok & has
        coef = torch.ones_like(coef)
    if keep_raw_cos is not None:  # aligned mode: a tensor that agrees this well with c keeps g
        cos = dot / torch.where(ok, gg * cc, 1.0).sqrt()
        ok = ok & ~((mode == 1.0) & (cos >= _f32(keep_raw_cos)))
    a = torch.where(ok, (1.0 - w_raw) * coef, 0.0).to(torch.float32)
    b = torch.where(ok, w_raw, 1.0).to(torch.float32)
    for i in pi:
        g, gf, cf = grads[i], g32[i], c32[i]
        assert g is not None and gf is not None and cf is not None
        d = cf if projected is None else projected[i]
        if d is None:
            continue  # ok[i] is False: g is kept as it is
        g.copy_(torch.where(ok[i], a[i] * d + b[i] * gf, gf))

    n_nf = (~(g_fin & c_fin & d_fin)).sum().to(torch.float64)
    n_nf_g = (~g_fin).sum().to(torch.float64)
    rho_out = torch.where(mode == 2.0, w_raw, 0.0)
    return torch.stack([mode, mean_norm, rho_out, n_nf, n_nf_g, ok.sum().to(torch.float64), loss, n_ref])


class RefSubspace:
    """The last ``k`` finite non-zero reference gradients of every tensor and the projection onto
    their span (the ``ref_subspace`` option of ``GradientAligner``).

    Per tensor a float64 ring buffer ``[k, numel]`` and its Gram matrix, updated with one
    matrix-vector product per step; the projection ``P g`` solves the small Gram system by an
    eigendecomposition, dropping eigenvalues below ``SUBSPACE_RTOL**2`` times the largest (a
    rank-deficient span is projected onto exactly, like ``pinv``). Memory: ``k`` float64 copies
    of the trainable parameters.
    """

    def __init__(self, k: int, shapes: Sequence[Sequence[int]], device: torch.device) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"RefSubspace k must be an int >= 1, got {k!r}")
        self.k = k
        numels = [math.prod(s) for s in shapes]
        self.bufs = [torch.zeros(k, n, dtype=torch.float64, device=device) for n in numels]
        self.grams = [torch.zeros(k, k, dtype=torch.float64, device=device) for _ in numels]
        self.counts = [0] * len(numels)

    def push(self, i: int, c: torch.Tensor) -> None:
        """Add tensor ``i``'s reference gradient (finite, non-zero: caller's check); drops the oldest."""
        slot = self.counts[i] % self.k
        buf, gram = self.bufs[i], self.grams[i]
        c64 = c.detach().reshape(-1).to(torch.float64)
        buf[slot] = c64
        row = torch.mv(buf, c64)
        gram[slot, :] = row
        gram[:, slot] = row
        self.counts[i] += 1

    def project(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``P g`` (float32, ``g``'s shape): ``g`` projected onto the span of tensor ``i``'s buffer."""
        n = min(self.counts[i], self.k)
        buf, gram = self.bufs[i][:n], self.grams[i][:n, :n]
        lam, vec = torch.linalg.eigh(gram)
        keep = lam > (SUBSPACE_RTOL**2) * lam[-1].clamp_min(0)
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        alpha = vec @ (inv * (vec.T @ torch.mv(buf, g.detach().reshape(-1).to(torch.float64))))
        return (buf.T @ alpha).to(torch.float32).reshape(g.shape)

    def state_dict(self) -> dict[str, Any]:
        """The buffers (on the CPU), for a checkpoint that resumes bit for bit."""
        return {
            "k": self.k,
            "counts": list(self.counts),
            "bufs": [b.cpu() for b in self.bufs],
            "grams": [g.cpu() for g in self.grams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different ``k`` or tensor layout is a ValueError."""
        shapes = [tuple(b.shape) for b in self.bufs]
        if state.get("k") != self.k or [tuple(b.shape) for b in state["bufs"]] != shapes:
            raise ValueError(
                f"RefSubspace state is for k={state.get('k')!r} and buffers "
                f"{[tuple(b.shape) for b in state['bufs']]}, this run has k={self.k} and {shapes}"
            )
        for dst, src in zip(self.bufs + self.grams, list(state["bufs"]) + list(state["grams"]), strict=True):
            dst.copy_(src)
        self.counts = [int(c) for c in state["counts"]]


# -- the paper's loop (baseline and oracle) ------------------------------------------------------------------
def align_loop_reference(
    params: Sequence[torch.Tensor],
    ref_grads: Sequence[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    epoch: float,
    *,
    min_ref_grad_norm: float = ALIGN_DEFAULTS.min_ref_grad_norm,
    min_ref_loss: float = ALIGN_DEFAULTS.min_ref_loss,
    max_raw_grad_ratio: float = ALIGN_DEFAULTS.max_raw_grad_ratio,
    ga_epoch: float = ALIGN_DEFAULTS.ga_epoch,
    epochs: float = ALIGN_DEFAULTS.epochs,
    keep_raw_cos: float | None = None,
    ref_subspace: int = 0,
    ref_history: Sequence[Sequence[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """The rule as the paper's code runs it: a Python loop, ``.item()`` per tensor, CPU round trips.

    Kept as the readable statement of the rule, the benchmark baseline and, since it
    works in float64, the test oracle. Same guards as the fast paths (zero / missing /
    non-finite tensors keep g). Returns host stats with the keys of ``AlignStats.to_dict``.

    ``ref_subspace`` K > 0 (an option): ``g_a`` becomes the projection of ``g`` onto the span of
    the tensor's last K finite non-zero reference gradients, ``ref_history[i]`` (oldest first,
    without this step's) followed by this step's ``c``: ``C pinv(C) g`` in float64.
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
    elif mixed_open(epoch, max_raw_grad_ratio, ga_epoch):
        mode, w_raw = 2, raw_grad_ratio(epoch, max_raw_grad_ratio, ga_epoch, epochs)
    else:
        mode, w_raw = 0, 0.0
    n_nf = n_nf_g = n_upd = 0
    for i, (p, c, cn) in enumerate(zip(params, refs64, cnorms, strict=True)):
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
        if mode == 1 and keep_raw_cos is not None and dot / (gn * cn) >= _f32(keep_raw_cos):
            continue  # agrees with c at least this well: keep g
        if ref_subspace > 0:
            past = [h.detach().cpu().double().flatten() for h in (ref_history or [[]] * len(params))[i]]
            C = torch.stack([*past, c.cpu()][-ref_subspace:], dim=1)  # numel x k
            a_dir = (C @ (torch.linalg.pinv(C, rtol=SUBSPACE_RTOL) @ g.cpu())).to(g.device)
        else:
            a_dir = coef * c
        new = (1.0 - w_raw) * a_dir + w_raw * g
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


# -- fused path (csrc_triton/align.py) ---------------------------------------------------------------------
def build_fused_plan(
    shapes: Sequence[Sequence[int]],
    device: torch.device,
    block: int | None = None,
    iters: int | None = None,
    num_warps: int | None = None,
    rblock: int | None = None,
) -> Any:
    """The kernels' chunk table and workspace for one parameter list (built once per aligner)."""
    from csrc_triton import align as kalign  # lazy: triton must be imported after TRITON_INTERPRET

    return kalign.build_plan(shapes, device, block, iters, num_warps, rblock)


def align_fused(
    plan: Any,
    params: Sequence[torch.Tensor],
    grads: list[torch.Tensor | None],
    refs: list[torch.Tensor | None],
    ref_loss: torch.Tensor | float,
    *,
    min_ref_grad_norm: float,
    min_ref_loss: float,
    rho: float,
    mixed: bool,
    fallback: bool,
    keep_raw_cos: float | None = None,
) -> torch.Tensor | None:
    """The rule in two Triton launches over all tensors; returns the stats vector.

    With ``fallback`` a dtype the kernels lack (float64) returns None, so the caller runs
    ``align_torch``; without it the kernel's error stands.
    """
    from csrc_triton import align as kalign

    if isinstance(ref_loss, torch.Tensor) and ref_loss.device.type == "cpu" and plan.device.type == "cuda":
        ref_loss = float(ref_loss)  # host memory: reading it does not sync the device
    kw = dict(
        min_ref_grad_norm=min_ref_grad_norm,
        min_ref_loss=min_ref_loss,
        rho=rho,
        mixed_ok=mixed,
        keep_raw_cos=keep_raw_cos,
    )
    try:
        try:
            return kalign.align_fused(plan, grads, refs, ref_loss, **kw)
        except kalign.NonContiguousError:
            # Rare (non-dense parameter layouts). The kernels address g flat, so give p a dense
            # grad (and c a dense copy) and launch again; the launcher checks before it launches.
            for i, g in enumerate(grads):
                if g is not None and not g.is_contiguous():
                    grads[i] = params[i].grad = g.contiguous()
            refs = [c if c is None or c.is_contiguous() else c.contiguous() for c in refs]
            return kalign.align_fused(plan, grads, refs, ref_loss, **kw)
    except kalign.UnsupportedDtypeError:
        if fallback:
            return None
        raise
