"""Fourier analysis of a classifier's mapping (SPEC §6): low/high-frequency deviations.

The paper tracks how fast the low and high parts of the predictions approach those of the labels;
the low part is ``G f`` for the Gaussian filter G of ``muscle_fast.ops.gaussian_filter``.
"""

from __future__ import annotations

import torch

from muscle_fast.ops.gaussian_filter import (
    Deltas,
    check_deltas,
    check_inputs,
    gaussian_filter,
    gaussian_filter_dense_ref,
)

__all__ = ["check_deltas", "frequency_deviations", "gaussian_filter", "gaussian_filter_dense_ref"]


def frequency_deviations(
    x: torch.Tensor,
    probs: torch.Tensor,
    onehot: torch.Tensor,
    deltas: Deltas,
    *,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Low/high-frequency deviations of predictions ``probs`` from labels ``onehot`` (SPEC section 6).

    ``probs`` (n, classes) softmax outputs; ``onehot`` (n, classes) targets, or (n,) integer labels.
    One ``gaussian_filter`` call on ``[probs, onehot]`` shares the distance work. Every entry is a
    float64 tensor of shape (len(deltas),) on x's device:

    * ``e_low``  = mean_i ||(G p)_i - (G t)_i|| / mean_i ||(G t)_i||;
    * ``e_high`` = the same with the high parts ``p - G p`` and ``t - G t``;
    * ``low_energy_target`` / ``high_energy_target``: sum_i ||(G t)_i||^2 / sum_i ||t_i||^2 and the
      same for ``t - G t`` (how much of the label mapping is low frequency at this width);
    * ``low_energy_pred`` / ``high_energy_pred``: likewise for ``p``;
    * ``deltas``: the widths.

    A zero denominator (e.g. n = 0, or labels without any high part) gives NaN/inf, as the formula does.
    """
    if onehot.dim() == 1 and not onehot.is_floating_point() and probs.dim() == 2:
        onehot = torch.nn.functional.one_hot(onehot.long(), probs.shape[1])
    if probs.dim() != 2 or probs.shape != onehot.shape:
        raise ValueError(
            f"probs and onehot must both be (n, classes), got {tuple(probs.shape)} and {tuple(onehot.shape)}"
        )
    p = probs.to(torch.float32)
    t = onehot.to(device=probs.device, dtype=torch.float32)
    vals = check_inputs(x, p, deltas)
    C = p.shape[1]
    g = gaussian_filter(x, torch.cat([p, t], dim=1), vals, backend=backend).to(torch.float64)
    p64, t64 = p.to(torch.float64), t.to(torch.float64)
    gp, gt = g[..., :C], g[..., C:]
    hp, ht = p64 - gp, t64 - gt

    def mean_norm(v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(v, dim=-1).mean(-1)

    def energy(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        return part.square().sum((-2, -1)) / whole.square().sum()

    return {
        "deltas": torch.tensor(vals, dtype=torch.float64, device=x.device),
        "e_low": mean_norm(gp - gt) / mean_norm(gt),
        "e_high": mean_norm(hp - ht) / mean_norm(ht),
        "low_energy_target": energy(gt, t64),
        "high_energy_target": energy(ht, t64),
        "low_energy_pred": energy(gp, p64),
        "high_energy_pred": energy(hp, p64),
    }
