"""Track the Fourier deviations of SPEC section 6 while a model trains (the paper's diagnostic).

:class:`FourierTracker` holds a fixed, seeded sample of each named set (typically ``dev_clean``,
the clean mapping, and ``dev_poison``, the backdoor mapping), tokenised once. Every ``every``
optimizer steps it runs one no-grad eval pass over the sample and records, per set and width delta,
``e_low`` / ``e_high`` and the energy ratios of :func:`~muscle_fast.analysis.fourier.frequency_deviations`.

Inputs x_i: the output of the model's *embeddings module* (for BERT/RoBERTa
``base_model.embeddings``: word + position + token-type embeddings, LayerNorm; dropout is off in
eval mode), captured by a forward hook during the same forward pass that gives the predictions. That
is the representation the encoder actually receives and what the paper's code used
(``plm.base_model.embeddings``); the word-embedding table alone would ignore word order. Models
without such a module (GPT-2, Llama) fall back to ``get_input_embeddings()`` (token embeddings only).
x is recomputed at every record, so a full fine-tune whose embeddings move is measured correctly.

Padding: every sample is laid out on one common length T (the longest tokenised sample over all
sets, at most ``max_length``) with zero vectors at padding positions, then flattened to T * hidden.
Zero padding is what the paper's code did beyond each batch's longest row (``pad_sequence``); doing
it at every padding position makes x a function of the sentence alone (not of which rows share a
batch), and lets the forward pass skip padding (length-sorted batches trimmed to their longest
row), so a record costs one ordinary evaluation of the sample.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import unwrap_model, world
from ..evaluation import Row, as_rows
from .fourier import check_deltas, frequency_deviations

__all__ = ["DEFAULT_NEIGHBOURS", "FourierTracker", "embedding_module", "neighbourhood_size", "plot_fourier"]

#: Default widths: the deltas at which a point's Gaussian neighbourhood holds about this many samples.
DEFAULT_NEIGHBOURS: tuple[float, ...] = (2.0, 8.0, 32.0, 128.0)
#: Metrics recorded per (set, delta): the keys of ``frequency_deviations`` but ``deltas``.
METRICS: tuple[str, ...] = (
    "e_low",
    "e_high",
    "low_energy_target",
    "high_energy_target",
    "low_energy_pred",
    "high_energy_pred",
)
#: Below this share of label energy in the high part, ``e_high`` is 0/0 (e.g. constant labels).
_DEGENERATE_ENERGY = 1e-10
_CALIBRATION_ROWS = 1024  # per set, bounds the dense n x n distance matrix of the delta calibration


def embedding_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) whose output is x: the full embeddings block if the model has one."""
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if not isinstance(emb, nn.Module):
        emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Module):
        raise ValueError(f"{type(model).__name__} has neither base_model.embeddings nor input embeddings")
    name = next((n for n, m in model.named_modules() if m is emb), type(emb).__name__)
    return name, emb


def neighbourhood_size(dist: torch.Tensor, delta: float) -> float:
    """Mean effective number of neighbours ``1 / sum_j G_ij^2`` of the kernel G at width ``delta``.

    ``dist`` is a dense (n, n) distance matrix (the point itself counts: 1 when G is the identity,
    n when G averages uniformly). It grows monotonically with delta, so widths can be chosen by it
    independently of the scale of the embeddings.
    """
    g = torch.softmax(dist * (-0.5 / delta), dim=1)
    return float((1.0 / g.square().sum(1)).mean())


def _mean_size(dists: Sequence[torch.Tensor], delta: float) -> float:
    """``neighbourhood_size`` averaged over the rows of several sets (each with its own G)."""
    rows = sum(d.shape[0] for d in dists)
    return sum(neighbourhood_size(d, delta) * d.shape[0] for d in dists) / rows


def _delta_for_size(dists: Sequence[torch.Tensor], target: float) -> float:
    """The width whose mean neighbourhood size over all rows of ``dists`` is ``target`` (bisection)."""
    pos = torch.cat([d[d > 0] for d in dists])
    if pos.numel() == 0:
        return 1.0  # every point identical: any width gives the same G
    lo, hi = math.log(float(pos.min()) / 200.0), math.log(float(pos.max()) * 200.0)
    for _ in range(48):  # in log delta; the size grows monotonically with delta
        mid = 0.5 * (lo + hi)
        if _mean_size(dists, math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def _round_sig(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits}g}")


def _delta_key(d: float) -> str:
    return f"{d:g}"


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (strict JSON has no NaN), containers copied."""
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class _Fixed:
    """One named set: the tokenised sample (CPU), labels, real lengths, length-sorted batch order."""

    def __init__(self, rows: list[Row], enc: dict[str, torch.Tensor], side: str | None) -> None:
        self.rows = rows
        self.enc = enc
        self.labels = torch.tensor([lab for _, lab in rows], dtype=torch.long)
        self.mask = enc["attention_mask"].bool()
        self.lengths = self.mask.sum(1)
        self.side = side
        self.order = torch.argsort(self.lengths, descending=True, stable=True).tolist()


class FourierTracker:
    """Records e_low / e_high (SPEC section 6) of fixed sample sets every ``every`` optimizer steps.

    ``sets`` maps names to rows ((text, label) pairs or dicts); each is cut to a seeded sample of at
    most ``max_samples`` rows and tokenised once (``max_length`` tokens). ``deltas``: the widths, or
    None to choose them at the first record so that each point's neighbourhood holds about
    ``neighbours`` samples (:func:`neighbourhood_size`; the kernel width only means something
    relative to the spread of the embedding distances, which depends on the model). Use the tracker
    itself as ``train_muscle(..., step_callback=tracker)`` or ``tracker.callback()`` with a
    transformers ``Trainer``; ``to_json`` / ``plot`` write the series.
    """

    def __init__(
        self,
        tokenizer: Any,
        sets: Mapping[str, Sequence[Any]],
        deltas: Sequence[float] | None = None,
        every: int = 10,
        max_length: int = 128,
        max_samples: int | None = None,
        *,
        batch_size: int = 64,
        seed: int = 0,
        neighbours: Sequence[float] = DEFAULT_NEIGHBOURS,
        backend: str = "auto",
    ) -> None:
        if not sets:
            raise ValueError("FourierTracker: no sets to track")
        for name, v in (("every", every), ("max_length", max_length), ("batch_size", batch_size)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"FourierTracker: {name} must be an integer >= 1, got {v!r}")
        if max_samples is not None and not (isinstance(max_samples, int) and max_samples >= 2):
            raise ValueError(f"FourierTracker: max_samples must be an integer >= 2, got {max_samples!r}")
        self.deltas: list[float] | None = None
        if deltas is not None:
            self.deltas = check_deltas(deltas)
            keys = [_delta_key(d) for d in self.deltas]
            if len(set(keys)) != len(keys):
                raise ValueError(f"FourierTracker: deltas {self.deltas} repeat a width")
        if not neighbours or any(not (math.isfinite(k) and k >= 1) for k in neighbours):
            raise ValueError(f"FourierTracker: neighbours must be sizes >= 1, got {list(neighbours)!r}")
        self.every, self.max_length, self.batch_size, self.seed = every, max_length, batch_size, seed
        self.neighbours_targets = [float(k) for k in neighbours]
        self.backend = backend

        picked: dict[str, list[Row]] = {}
        for name, raw in sets.items():
            rows = as_rows(raw, f"sets[{name!r}]")
            if len(rows) < 2:
                raise ValueError(f"FourierTracker: set {name!r} needs at least 2 rows, got {len(rows)}")
            if max_samples is not None and len(rows) > max_samples:
                keep = sorted(random.Random(f"{seed}:fourier:{name}").sample(range(len(rows)), max_samples))
                rows = [rows[i] for i in keep]
            picked[name] = rows
        # one tokenizer call for all sets: one common padded length T, so every x lives in one space
        texts = [t for rows in picked.values() for t, _ in rows]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        if "attention_mask" not in enc:
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        self.length = int(enc["input_ids"].shape[1])
        side = self._padding_side(enc["attention_mask"].bool())
        self._sets: dict[str, _Fixed] = {}
        start = 0
        for name, rows in picked.items():
            part = {k: v[start : start + len(rows)] for k, v in enc.items()}
            self._sets[name] = _Fixed(rows, part, side)
            start += len(rows)

        self.steps: list[int] = []
        self.series: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in self._sets}
        self.neighbours: dict[str, float] = {}
        self.record_seconds: list[float] = []
        self.meta: dict[str, Any] = {}
        self._embedding: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def _padding_side(mask: torch.Tensor) -> str | None:
        """'right' / 'left' when every row's padding sits on that side (then batches can be trimmed)."""
        n, t = mask.shape
        lengths = mask.sum(1, keepdim=True)
        pos = torch.arange(t).expand(n, t)
        if torch.equal(mask, pos < lengths):
            return "right"
        if torch.equal(mask, pos >= t - lengths):
            return "left"
        return None

    @property
    def set_names(self) -> list[str]:
        return list(self._sets)

    def sample(self, name: str) -> list[Row]:
        """The fixed rows of set ``name`` (in the order of the recorded x and predictions)."""
        return list(self._sets[name].rows)

    @torch.no_grad()
    def inputs(self, model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, probs, labels) of set ``name`` under ``model`` as it is now (its train/eval mode kept).

        x: (n, T * hidden) float32, flattened embeddings-module outputs, zeros at padding; probs:
        (n, classes) softmax outputs; labels: (n,) integer targets. One forward pass per batch.
        """
        model = unwrap_model(model)
        fs = self._sets[name]
        device = next(model.parameters()).device
        mod_name, module = embedding_module(model)
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, (tuple, list)) else out)

        n, T = len(fs.rows), self.length
        x: torch.Tensor | None = None
        probs: torch.Tensor | None = None
        handle = module.register_forward_hook(hook)
        try:
            for s in range(0, n, self.batch_size):
                idx = torch.tensor(fs.order[s : s + self.batch_size])
                longest = int(fs.lengths[idx].max())
                cols = {"right": slice(0, longest), "left": slice(T - longest, T)}.get(fs.side, slice(0, T))
                batch = {k: v[idx][:, cols].to(device) for k, v in fs.enc.items()}
                captured.clear()
                logits = model(**batch).logits
                if not captured:
                    raise RuntimeError(f"the embeddings module {mod_name} was not called in the forward pass")
                emb = captured[0].float()
                emb = emb * batch["attention_mask"].to(emb.dtype)[..., None]  # zero vectors at padding
                if x is None:
                    x = emb.new_zeros(n, T, emb.shape[-1])
                    probs = logits.new_zeros(n, logits.shape[-1], dtype=torch.float32)
                x[idx.to(device), cols] = emb
                probs[idx.to(device)] = torch.softmax(logits.float(), dim=-1)
        finally:
            handle.remove()
        assert x is not None and probs is not None
        self._embedding = {
            "module": mod_name,
            "hidden": int(x.shape[-1]),
            "kind": "token embeddings (the model has no embeddings block)"
            if isinstance(module, nn.Embedding)
            else "embeddings block output (BERT: word + position + token type, LayerNorm)",
        }
        labels = fs.labels.to(device)
        if labels.max() >= probs.shape[1] or labels.min() < 0:
            raise ValueError(
                f"FourierTracker: set {name!r} has labels outside the model's {probs.shape[1]} classes"
            )
        return x.reshape(n, -1), probs, labels

    # ------------------------------------------------------------------------------------------ widths

    def _calibrate(self, xs: Mapping[str, torch.Tensor]) -> None:
        """Choose the widths (if not given) and note each width's neighbourhood size, from the first x."""
        dists = []
        for name, x in xs.items():
            if x.shape[0] > _CALIBRATION_ROWS:
                keep = random.Random(f"{self.seed}:calibrate:{name}").sample(
                    range(x.shape[0]), _CALIBRATION_ROWS
                )
                x = x[torch.tensor(sorted(keep), device=x.device)]
            x64 = x.to(torch.float64)
            x64 = x64 - x64.mean(0)
            dists.append(torch.cdist(x64, x64).cpu())
        smallest = min(d.shape[0] for d in dists)
        if self.deltas is None:
            targets = [k for k in self.neighbours_targets if k <= smallest / 2] or [max(1.0, smallest / 2)]
            deltas: list[float] = []
            for k in targets:
                d = _round_sig(_delta_for_size(dists, k))
                if d > 0 and _delta_key(d) not in {_delta_key(v) for v in deltas}:
                    deltas.append(d)
            self.deltas = sorted(deltas)
            self.meta["delta_rule"] = (
                "widths at which a point's Gaussian neighbourhood in its own set (1 / sum_j G_ij^2, "
                f"averaged over the samples of all sets) holds about {', '.join(f'{k:g}' for k in targets)} "
                "samples, from the embeddings at the first record, rounded to 3 significant digits"
            )
        else:
            self.meta["delta_rule"] = "given"
        self.neighbours = {_delta_key(d): round(_mean_size(dists, d), 2) for d in self.deltas}

    # ------------------------------------------------------------------------------------------ recording

    def __call__(self, step: int, model: nn.Module) -> bool:
        """Record at every ``every``-th step (``train_muscle`` step_callback); True if it recorded."""
        if step % self.every != 0:
            return False
        return self.record(step, model)

    def record(self, step: int, model: nn.Module) -> bool:
        """Record now: eval mode and no grad for the pass, the previous mode restored; rank 0 only."""
        if world()[0] != 0 or (self.steps and self.steps[-1] == step):
            return False
        t0 = time.perf_counter()
        core = unwrap_model(model)
        was = core.training
        core.eval()
        try:
            data = {name: self.inputs(core, name) for name in self._sets}
        finally:
            core.train(was)
        if not self.steps:
            self._calibrate({name: x for name, (x, _, _) in data.items()})
        assert self.deltas is not None
        for name, (x, probs, labels) in data.items():
            res = frequency_deviations(x, probs, labels, self.deltas, backend=self.backend)
            vals = {k: res[k].cpu().tolist() for k in METRICS}
            for j, d in enumerate(self.deltas):
                # no high-frequency label part (e.g. every dev-poison label is the target): e_high is 0/0
                if vals["high_energy_target"][j] <= _DEGENERATE_ENERGY:
                    vals["e_high"][j] = float("nan")
                per = self.series[name].setdefault(_delta_key(d), {k: [] for k in METRICS})
                for k in METRICS:
                    per[k].append(float(vals[k][j]))
        self.steps.append(int(step))
        self.record_seconds.append(time.perf_counter() - t0)
        return True

    def callback(self, record_initial: bool = True) -> Any:
        """A transformers ``TrainerCallback`` that records on ``on_step_end`` (and at step 0 if asked)."""
        from transformers import TrainerCallback

        tracker = self

        class FourierCallback(TrainerCallback):
            """Feeds the optimizer steps of a (MuScle)Trainer to a FourierTracker."""

            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if record_initial and state.global_step == 0 and state.is_world_process_zero:
                    tracker.record(0, kwargs["model"])

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.is_world_process_zero:
                    tracker(state.global_step, kwargs["model"])

        return FourierCallback()

    # ------------------------------------------------------------------------------------------ output

    def undefined(self) -> dict[str, list[str]]:
        """Per set, the delta keys whose e_high is undefined (no high-frequency part in the labels)."""
        out: dict[str, list[str]] = {}
        for name, per in self.series.items():
            bad = [k for k, v in per.items() if v["e_high"] and all(math.isnan(e) for e in v["e_high"])]
            if bad:
                out[name] = bad
        return out

    def to_dict(self) -> dict[str, Any]:
        """The series as plain JSON data (non-finite values as null)."""
        series = {
            name: {
                dk: {k: [_finite_or_none(v) for v in vals] for k, vals in per.items()}
                for dk, per in sets.items()
            }
            for name, sets in self.series.items()
        }
        meta = {
            "embedding": dict(
                self._embedding, padding="zero vectors at padding positions", length=self.length
            ),
            "dim": self.length * self._embedding["hidden"] if self._embedding else None,
            "samples": {name: len(fs.rows) for name, fs in self._sets.items()},
            "label_counts": {name: torch.bincount(fs.labels).tolist() for name, fs in self._sets.items()},
            "every": self.every,
            "max_length": self.max_length,
            "seed": self.seed,
            "neighbours": self.neighbours,
            "e_high_undefined": self.undefined(),
            "record_seconds": round(sum(self.record_seconds), 3),
            "metrics": {
                "e_low": "mean_i ||(G p)_i - (G t)_i|| / mean_i ||(G t)_i||  (p softmax, t one-hot)",
                "e_high": "the same with the high parts p - G p and t - G t; null when t has no high part",
                "low_energy_target": "sum_i ||(G t)_i||^2 / sum_i ||t_i||^2 (high_*: t - G t; *_pred: p)",
            },
            **self.meta,
        }
        return {
            "deltas": list(self.deltas or []),
            "steps": list(self.steps),
            "series": series,
            "meta": _jsonable(meta),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` atomically (a reader never sees half a file)."""
        from ..fileio import write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of e_low and e_high against the step, one panel per width (see :func:`plot_fourier`)."""
        return plot_fourier(self.to_dict(), path, title)


_SET_COLOURS = {"dev_clean": "tab:blue", "dev_poison": "tab:red"}
_MAX_PANELS = 6


def plot_fourier(data: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Plot a ``FourierTracker.to_dict()`` (or a loaded fourier.json) to a PNG, written atomically.

    One panel per width delta (at most 6, evenly spread when there are more): e_low solid, e_high
    dashed, one colour per set, against the training step.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from ..fileio import atomic_write

    deltas, steps, series = list(data["deltas"]), list(data["steps"]), data["series"]
    if not deltas or not steps:
        raise ValueError("plot_fourier: nothing recorded yet")
    meta = data.get("meta", {})
    shown = deltas
    if len(deltas) > _MAX_PANELS:
        pick = sorted({round(i * (len(deltas) - 1) / (_MAX_PANELS - 1)) for i in range(_MAX_PANELS)})
        shown = [deltas[i] for i in pick]
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    neighbours = meta.get("neighbours", {})
    for i, d in enumerate(shown):
        ax = axes[i // cols][i % cols]
        key = _delta_key(d)
        for j, (name, per) in enumerate(series.items()):
            colour = _SET_COLOURS.get(name, f"C{j + 2}")
            vals = per.get(key)
            if vals is None:
                continue
            low = [math.nan if v is None else v for v in vals["e_low"]]
            high = [math.nan if v is None else v for v in vals["e_high"]]
            ax.plot(steps, low, "-o", ms=3, color=colour, label=f"{name}: low frequency (e_low)")
            if all(math.isnan(v) for v in high):
                ax.plot(
                    [], [], "--", color=colour, label=f"{name}: e_high undefined (labels have no high part)"
                )
            else:
                ax.plot(steps, high, "--x", ms=3, color=colour, label=f"{name}: high frequency (e_high)")
        size = neighbours.get(key)
        ax.set_title(f"width δ = {d:g}" + (f" (≈ {size:.0f} neighbours per point)" if size else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step (optimizer updates)")
        ax.set_ylabel("relative error vs labels (0 = learned)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(shown), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    head = title or "Fourier analysis of training"
    note = (
        "e = mean‖filtered(prediction − one-hot label)‖ / mean‖filtered label‖; "
        "Gaussian low-pass over the input embeddings"
    )
    if len(shown) < len(deltas):
        note += f"; {len(shown)} of {len(deltas)} widths shown (all in the JSON)"
    fig.suptitle(f"{head}\n{note}", fontsize=10)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)
    return path
