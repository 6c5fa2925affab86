"""``defend``: every (attack, method) pair of a spec planned before anything loads, then each
skipped (finished earlier with the same config), resumed (from its training state) or trained,
with overall progress; records merged into ``results.json`` (:func:`run_defend`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fileio import write_json
from .data import _spec_sets
from .loading import BaseModels, resolve_device, resolve_model_name
from .presets import preset_for, seed_specs
from .run import (
    PairPlan,
    RunHooks,
    _keys_text,
    _make_out_dir,
    check_out_dir,
    config_diff,
    plan_method,
    record_key,
    run_pairs,
    teacher_key,
    training_key,
)
from .spec import RUN_FILE, RunSpec

if TYPE_CHECKING:
    from ..train import TeacherCache

log = logging.getLogger("muscle_fast")


def plan_defend(
    spec: RunSpec, sets: Sequence[Any], models: BaseModels, preset: dict[str, Any], seeded: bool = False
) -> list[PairPlan]:
    """Every (attack, method) pair of a run, planned, in run order.

    Builds every method's MuScleConfig and TrainConfig (backend names included) and every reference
    split from the model's config alone: a bad later method section fails before the first
    (possibly hours-long) run and before the weights load, with nothing trained or written.
    ``seeded``: checkpoints go under ``seed<N>/<attack>/<method>`` (a run of several seeds)."""
    plans = [plan_method(ds, method, models, preset, spec) for ds in sets for method in spec.methods]
    if seeded:
        for p in plans:
            p.rel = Path(f"seed{p.seed}") / p.dataset.attack / p.method
    return plans


def check_before_training(spec: RunSpec, plans: Sequence[PairPlan], models: BaseModels) -> None:
    """The checks that need the loaded model (support for --gradient-checkpointing), before the
    first pair trains; everything else is checked by :func:`plan_defend` without it."""
    from ..train import supports_checkpointing

    if not spec.gradient_checkpointing:
        return
    for num_labels in sorted({p.dataset.num_labels for p in plans}):
        base, _ = models.get(num_labels)
        if not supports_checkpointing(base):
            raise ConfigError(f"{models.name} does not support --gradient-checkpointing")
        del base


def previous_records(out: Path, rerun: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The records of an earlier ``defend`` into ``out`` that this run does not redo.

    Rerunning into a folder (after an interruption, or to add a method) must not drop what
    was finished; a (dataset, attack, method) run again replaces its old record."""
    kept = [r for r in _read_results(out) if record_key(r)[:3] not in rerun]
    if kept:
        log.info(f"muscle-fast: keeping {len(kept)} earlier records of {out / 'results.json'}")
    return kept


def _read_results(out: Path) -> list[dict[str, Any]]:
    from ..report import merge_records

    f = out / "results.json"
    # read and checked as `report` reads results (clear error if broken)
    return merge_records([f], warn=False) if f.is_file() else []


#: Under ``--out``: the training state of the pairs not finished yet, ``.train-state/<attack>/<method>``
#: (``.train-state/seed<N>/...`` with several seeds; the loop's atomic checkpoint plus PAIR_FILE),
#: removed once the pair's checkpoint and record are written.
STATE_DIR = ".train-state"
#: In a pair's state folder: the record ``config`` it trains with (a rerun resumes only the same config).
PAIR_FILE = "pair.json"


def _checkpoint_problem(out: Path, rec: dict[str, Any]) -> str | None:
    """Why an earlier record does not count as finished (its checkpoint is missing, unreadable or
    another run's), or None."""
    if not rec.get("adapter"):
        return "it saved no checkpoint"
    d = out / rec["adapter"]
    try:
        info = json.loads((d / RUN_FILE).read_text())
    except FileNotFoundError:
        return f"its checkpoint {d} is missing"
    except (OSError, ValueError):
        return f"its checkpoint {d} is unreadable"
    if not isinstance(info, dict) or (info.get("cacc"), info.get("asr")) != (rec["cacc"], rec["asr"]):
        return f"its checkpoint {d} is another run's"
    return None


def _saved_progress(state_dir: Path) -> tuple[int, int] | str | None:
    """(epoch index, step in that epoch) of the training state in ``state_dir``; None when there is
    none; a message when it cannot be read. Memory-maps the file: only a few numbers are needed."""
    import torch

    from ..checkpoint import CKPT

    f = state_dir / CKPT
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["step_in_epoch"])
    except Exception as e:  # noqa: BLE001 - a truncated, corrupt or foreign file: start the pair over
        return f"its checkpoint {f} is unreadable ({type(e).__name__})"


@dataclass
class _Pair:
    """What run_defend does with one planned pair: skip it, train it, or resume its training."""

    plan: PairPlan
    action: str  # "skip" | "train" | "resume"
    state_dir: Path
    old: dict[str, Any] | None  #: the earlier record (kept when skipped, replaced otherwise)


def _decide(out: Path, plan: PairPlan, old: dict[str, Any] | None) -> _Pair:
    """Skip a finished pair whose record and checkpoint match this run's config; resume an
    interrupted one trained with the same config; otherwise train it, saying why."""
    import shutil

    label = plan.label
    state = out / STATE_DIR / plan.path
    if old is not None:
        problem = _checkpoint_problem(out, old)
        diff = config_diff(old.get("config"), plan.config)
        if problem is None and not diff:
            log.info(f"muscle-fast: {label} finished earlier with the same config: skipped")
            shutil.rmtree(state, ignore_errors=True)  # killed after its record was written
            return _Pair(plan, "skip", state, old)
        if diff:
            log.info(
                f"muscle-fast: {label} finished earlier with another config ({_keys_text(diff)} differ): "
                "retraining; its record will be replaced"
            )
        else:
            log.info(f"muscle-fast: {label} finished earlier, but {problem}: retraining")
    pair_file = state / PAIR_FILE
    if pair_file.is_file():
        try:
            saved = json.loads(pair_file.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            saved = None
        diff = config_diff(saved, plan.config)
        progress = _saved_progress(state) if not diff else None
        if diff:
            why = f"with another config ({_keys_text(diff)} differ)" if saved is not None else "(unreadable)"
            log.info(f"muscle-fast: {label} was interrupted {why}: starting it over")
        elif progress is None:
            log.info(f"muscle-fast: {label} was interrupted before its first checkpoint: starting it over")
        elif isinstance(progress, str):
            log.info(f"muscle-fast: {label} was interrupted, but {progress}: starting it over")
        else:
            epoch, step = progress
            epochs = plan.train_config.epochs
            where = (
                f"epoch {epoch + 1} step {step}"
                if epoch < epochs
                else "its last epoch (evaluation and saving only)"
            )
            log.info(f"muscle-fast: resuming {label} from {where}")
            return _Pair(plan, "resume", state, old)
    if state.exists():
        shutil.rmtree(state)
    return _Pair(plan, "train", state, old)


def _shared(
    pairs: Sequence[_Pair],
    models: dict[int, BaseModels],
    key_of: Callable[[PairPlan, BaseModels], str | None],
    actions: Collection[str],
) -> dict[int, list[int]]:
    """Pairs (numbered from 1, in run order) whose ``action`` is in ``actions`` and whose
    ``key_of(plan, models)`` is the same (not None): the first of each such set, and the later ones."""
    first: dict[str, int] = {}
    serves: dict[int, list[int]] = {}
    for i, p in enumerate(pairs, 1):
        key = key_of(p.plan, models[p.plan.seed]) if p.action in actions else None
        if key is None:
            continue
        if key in first:
            serves[first[key]].append(i)
        else:
            first[key] = i
            serves[i] = []
    return {i: js for i, js in serves.items() if js}


def _shared_training(pairs: Sequence[_Pair], models: dict[int, BaseModels]) -> dict[int, list[int]]:
    """The pairs that train the same model (:func:`training_key`: a ``ref-only`` control of several
    attacks): the first of each such set to train from the start, and the later ones it trains for.
    A pair resumed from its own state trains alone."""
    return _shared(pairs, models, training_key, ("train",))


def _shared_teachers(pairs: Sequence[_Pair], models: dict[int, BaseModels]) -> dict[int, TeacherCache]:
    """One :class:`TeacherCache` per set of pairs that would train the same teacher
    (:func:`teacher_key`: a ``+filter`` method on several attacks), for each of them, by pair number."""
    from ..train import TeacherCache

    caches: dict[int, TeacherCache] = {}
    for i, js in _shared(pairs, models, teacher_key, ("train", "resume")).items():
        cache = TeacherCache()
        for k in (i, *js):
            caches[k] = cache
    return caches


def _remove_empty_state(out: Path) -> None:
    """Remove ``out/.train-state`` and its (seed and) attack folders where nothing unfinished is left."""
    import contextlib

    root = out / STATE_DIR
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):  # not empty (an interrupted pair)
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Progress(RunHooks):
    """Overall progress of a defend run beside the per-epoch bar: which pair of how many, time so
    far, and time left estimated from the mean wall time of the pairs trained so far."""

    def __init__(self, total: int, to_train: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.left = total, to_train
        self.t0 = time.perf_counter()
        self.pair_t0 = self.t0
        self.durations: list[float] = []
        self.index, self.label = 0, ""
        self._shown = 0.0
        self.bar = (
            tqdm(total=total, bar_format="{desc}", position=0, leave=True, dynamic_ncols=True)
            if enabled
            else None
        )

    def text(self) -> str:
        now = time.perf_counter()
        if self.durations:
            remaining = sum(self.durations) / len(self.durations) * self.left - (now - self.pair_t0)
            eta = f"about {_fmt_seconds(max(0.0, remaining))} remaining"
        else:
            eta = "estimating the time remaining"
        return (
            f"pair {self.index} of {self.total} ({self.label}), {_fmt_seconds(now - self.t0)} elapsed, {eta}"
        )

    def start(self, index: int, label: str) -> None:
        self.index, self.label, self.pair_t0 = index, label, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(self.text())
        else:
            log.info(f"muscle-fast: {self.text()}")

    def on_step(self, step: int, model: Any) -> None:
        """Refresh the elapsed and remaining times (at most once a second)."""
        now = time.perf_counter()
        if self.bar is not None and now - self._shown >= 1.0:
            self._shown = now
            self.bar.set_description_str(self.text())

    def done(self, resumed: bool, served: int = 0) -> None:
        """A pair finished, with ``served`` others its training also served (no time of their own)."""
        if not resumed or not self.durations:  # a resumed pair's time is only its remainder
            self.durations.append(time.perf_counter() - self.pair_t0)
        self.left -= 1 + served
        if self.bar is not None:
            self.bar.update(1 + served)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.n == self.total:
                elapsed = _fmt_seconds(time.perf_counter() - self.t0)
                self.bar.set_description_str(f"{self.total} pairs done, {elapsed} elapsed")
            self.bar.close()


@dataclass(frozen=True)
class DefendResult:
    """What :func:`run_defend` wrote: every record of ``out/results.json`` (earlier ones kept)."""

    records: list[dict[str, Any]]
    model_name: str
    out: Path
    seconds: float  #: training and evaluation time of this call
    skipped: tuple[str, ...] = ()  #: pairs (``attack/method``) finished earlier with the same config
    resumed: tuple[str, ...] = ()  #: pairs continued from their last training checkpoint
    trained: tuple[str, ...] = ()  #: pairs trained from the start


def run_defend(spec: RunSpec) -> DefendResult:
    """Train and evaluate every method on every attack of ``spec``; writes one checkpoint per
    (attack, method) and results.json/md/png under ``spec.out``, updated after each pair.

    Rerun into the same folder, the same command skips the pairs finished with the same config,
    resumes an interrupted one from its last training checkpoint (under ``out/.train-state``) and
    retrains a pair whose config changed, logging which and why."""
    import contextlib
    import shutil

    from ..report import write_results

    out = spec.out_dir()
    check_out_dir(out)  # before the data and the model: an unusable --out fails at once
    preset = preset_for(spec)
    device = resolve_device(spec.device)
    specs = seed_specs(spec, preset)  # one per seed, seed-major: seed 1's comparison is complete first
    spec_of = {s.seed: s for s in specs}
    sets = {s.seed: _spec_sets(s, s.seed) for s in specs}  # data errors before the (slow) model loads
    model_name = resolve_model_name(spec.model)
    models = {s.seed: BaseModels(model_name, s.seed, spec.load_in_4bit, device) for s in specs}
    plans = [
        p
        for s in specs
        for p in plan_defend(s, sets[s.seed], models[s.seed], preset, seeded=spec.seeds is not None)
    ]
    old = {record_key(r): r for r in _read_results(out)}
    pairs = [_decide(out, p, old.get(p.key)) for p in plans]
    todo = [p for p in pairs if p.action != "skip"]
    check_before_training(spec, [p.plan for p in todo], models[specs[0].seed])
    _make_out_dir(out)
    mine = {p.plan.key for p in pairs}
    others = [r for k, r in old.items() if k not in mine]
    if others:
        log.info(
            f"muscle-fast: keeping {len(others)} earlier records of other pairs in {out / 'results.json'}"
        )
    if len(pairs) > 1 or not todo:
        n_skip, n_resume = len(pairs) - len(todo), sum(p.action == "resume" for p in todo)
        log.info(
            f"muscle-fast: {len(pairs)} pairs: {n_skip} finished earlier (skipped), {n_resume} to resume, "
            f"{len(todo) - n_resume} to train"
        )
    done: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def current() -> list[dict[str, Any]]:
        """Others' records, then this run's in run order: a finished pair's, else its earlier one."""
        mine_now = [done.get(p.plan.key) or p.old for p in pairs]
        return others + [r for r in mine_now if r is not None]

    serves = _shared_training(pairs, models)  # pair number -> later pair numbers it trains for
    served_by = {j: i for i, js in serves.items() for j in js}
    for i, js in serves.items():
        log.info(
            f"muscle-fast: {pairs[i - 1].plan.label} trains the same model as "
            f"{', '.join(pairs[j - 1].plan.label for j in js)}: trained once, evaluated on each attack "
            "(interrupted, it resumes alone and the others train again)"
        )
    teachers = _shared_teachers(pairs, models)  # pair number -> the teacher it shares
    for cache in {id(c): c for c in teachers.values()}.values():
        first, *later = (pairs[i - 1].plan.label for i, c in teachers.items() if c is cache)
        log.info(f"muscle-fast: {first} shares its teacher with {', '.join(later)}: trained at most once")
    progress = _Progress(len(pairs), len(todo), spec.progress)
    redirect: Any = contextlib.nullcontext()
    if spec.progress:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()  # log lines above the bars, not through them
    t0 = time.perf_counter()
    try:
        with redirect:
            for i, pair in enumerate(pairs, 1):
                if i in served_by:
                    continue  # trained with an earlier pair (``served_by[i]``), recorded with it
                if pair.action == "skip":
                    if progress.bar is not None:
                        progress.bar.update(1)
                    continue
                plan = pair.plan
                progress.start(i, plan.label)
                pair.state_dir.mkdir(parents=True, exist_ok=True)
                write_json(pair.state_dir / PAIR_FILE, {"pair": plan.label, "config": plan.config})
                for other, m in models.items():
                    if other != plan.seed:
                        m.release()  # one seed's base model in memory at a time
                recs = run_pairs(
                    plan.dataset,
                    plan.method,
                    models[plan.seed],
                    preset,
                    spec_of[plan.seed],
                    out,
                    hooks=progress,
                    plan=plan,
                    state_dir=pair.state_dir,
                    shared=[pairs[j - 1].plan for j in serves.get(i, [])],
                    teacher=teachers.pop(i, None),  # the last pair of a set releases its cache
                )
                for j, rec in zip([i, *serves.get(i, [])], recs, strict=True):
                    done[pairs[j - 1].plan.key] = rec
                write_results(out, current(), model_name)  # partial results survive an interrupted run
                for j in [i, *serves.get(i, [])]:
                    shutil.rmtree(pairs[j - 1].state_dir, ignore_errors=True)
                progress.done(pair.action == "resume", served=len(serves.get(i, [])))
    finally:
        progress.close()
        _remove_empty_state(out)
    if not done:
        write_results(out, current(), model_name)  # md/png as this version writes them
    labels = {a: tuple(p.plan.label for p in pairs if p.action == a) for a in ("skip", "resume", "train")}
    return DefendResult(
        current(),
        model_name,
        out,
        time.perf_counter() - t0,
        skipped=labels["skip"],
        resumed=labels["resume"],
        trained=labels["train"],
    )
