"""``fourier``: one method trained as ``defend`` trains it while a FourierTracker records e_low /
e_high of dev-clean and dev-poison (SPEC §6), through :func:`run_method`'s hooks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backdoor.data import canonical_data_dir
from ..errors import ConfigError
from .data import _spec_sets
from .loading import BaseModels, resolve_device, resolve_model_name
from .presets import preset_for, resolve_seed, seed_specs
from .run import MethodRun, RunHooks, check_out_dir, filter_records, plan_method, run_method
from .spec import METHODS, RunSpec

log = logging.getLogger("muscle_fast")


def check_deltas(deltas: Sequence[float]) -> tuple[float, ...]:
    """Kernel widths: positive, finite, none repeated (at the precision they are keyed by)."""
    out = tuple(float(v) for v in deltas)
    if not all(v > 0 and v != float("inf") for v in out):
        raise ConfigError("every width must be a positive number")
    if len({f"{v:g}" for v in out}) != len(out):
        raise ConfigError("a width is repeated")
    return out


@dataclass(frozen=True)
class FourierOptions:
    """What ``fourier`` records besides training: how often, on how many rows, at which widths."""

    every: int = 10  #: record every N optimizer steps
    samples: int = 400  #: seeded sample of dev-clean and of dev-poison
    deltas: tuple[float, ...] | None = None  #: kernel widths; None: chosen at the first record

    def __post_init__(self) -> None:
        for flag, v, least in (("--every", self.every, 1), ("--samples", self.samples, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"{flag} must be >= {least}, got {v}")
        if self.deltas is not None:
            object.__setattr__(self, "deltas", check_deltas(self.deltas))


@dataclass(frozen=True)
class FourierResult:
    """The outcome of :func:`run_fourier`: test scores of the selected checkpoint and the files."""

    dataset: str
    attack: str
    method: str
    cacc: float
    asr: float
    records: int  #: how many steps were recorded
    deltas: list[float]
    json_path: Path
    png_path: Path


class _FourierHooks(RunHooks):
    """Runs a FourierTracker on dev-clean and dev-poison along a run_method training."""

    def __init__(self, options: FourierOptions, out: Path, data_dir: str | Path | None) -> None:
        self.options, self.data_dir, self.out = options, data_dir, out
        self.json_path, self.png_path = out / "fourier.json", out / "fourier.png"
        self.tracker: Any = None

    def before_training(self, run: MethodRun) -> None:
        from ..analysis.tracking import FourierTracker
        from ..train import config_dict

        ds, tcfg, opts = run.dataset, run.train_config, self.options
        self.tracker = FourierTracker(
            run.tokenizer,
            {"dev_clean": ds.dev_clean, "dev_poison": ds.dev_poison},
            deltas=list(opts.deltas) if opts.deltas is not None else None,
            every=opts.every,
            max_length=tcfg.max_length,
            max_samples=opts.samples,
            batch_size=tcfg.eval_batch_size,
            seed=run.seed,
        )
        self.tracker.meta.update(
            {
                "dataset": ds.dataset,
                "attack": ds.attack,
                "method": run.method,
                "method_doc": METHODS[run.method].doc,
                "model": run.model_name,
                "train": config_dict(tcfg),
                "muscle_config": run.muscle_config.to_dict() if run.muscle_config is not None else None,
                "data_dir": canonical_data_dir(self.data_dir),
                "rows": ds.summary(),
                "complete": False,
            }
        )
        log.info(
            "muscle-fast: fourier: tracking "
            + ", ".join(f"{len(self.tracker.sample(n))} {n} rows" for n in self.tracker.set_names)
            + f" every {opts.every} steps"
        )
        self.out.mkdir(parents=True, exist_ok=True)
        self.on_step(0, run.model)

    def on_step(self, step: int, model: Any) -> None:
        if self.tracker(step, model):
            self.tracker.to_json(self.json_path)  # partial series survive an interrupted run

    def after_training(self, run: MethodRun) -> None:
        from ..report import model_label

        res, scores, ds = run.result, run.scores or {}, run.dataset
        self.tracker.meta.update(
            {
                "cacc": scores["cacc"],
                "asr": scores["asr"],
                "selected": "cacc/asr: the epoch with the best dev-clean accuracy, as in defend",
                "best_epoch": res.best_epoch,
                "dev_history": res.history,
                "train_steps": res.steps,
                "wall_seconds": res.wall_seconds,
                **filter_records(run.method, res, ds),
                "complete": True,
            }
        )
        self.tracker.to_json(self.json_path)
        doc = METHODS[run.method].doc
        self.tracker.plot(
            self.png_path,
            title=f"Fourier analysis: {ds.dataset}/{ds.attack}, {run.method} ({doc}), "
            f"{model_label(run.model_name)}",
        )


def run_fourier(spec: RunSpec, options: FourierOptions | None = None) -> FourierResult:
    """Train the spec's one method on its one attack as :func:`run_defend` does, while a
    FourierTracker records e_low/e_high of dev-clean and dev-poison (SPEC §6); writes
    fourier.json and fourier.png under ``spec.out`` (no checkpoint)."""
    options = options or FourierOptions()
    if len(spec.methods) != 1:
        raise ConfigError(f"fourier trains one method at a time, got {list(spec.methods)}")
    method = spec.methods[0]
    out = spec.out_dir()
    check_out_dir(out)
    preset = preset_for(spec)  # the default model's tuned preset, as defend uses
    if spec.seeds is not None and len(spec.seeds) > 1:
        raise ConfigError(f"fourier trains one seed at a time, got seeds {list(spec.seeds)}")
    spec = seed_specs(spec, preset)[0]
    seed = resolve_seed(spec, preset)
    device = resolve_device(spec.device)
    sets = _spec_sets(spec, seed)  # data errors before the (slow) model loads
    if len(sets) != 1:
        raise ConfigError(
            f"fourier analyses one attack at a time; pass --attacks with one of {[ds.attack for ds in sets]}"
        )
    ds = sets[0]
    models = BaseModels(resolve_model_name(spec.model), seed, spec.load_in_4bit, device)
    plan = plan_method(ds, method, models, preset, spec)  # a bad method section fails before loading
    hooks = _FourierHooks(options, out, spec.data_dir)
    rec = run_method(ds, method, models, preset, spec, out, hooks=hooks, save_checkpoint=False, plan=plan)
    tracker = hooks.tracker
    return FourierResult(
        ds.dataset,
        ds.attack,
        method,
        rec["cacc"],
        rec["asr"],
        len(tracker.steps),
        list(tracker.deltas or []),
        hooks.json_path,
        hooks.png_path,
    )
