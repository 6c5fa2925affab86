"""One (attack, method) run: its plan (:class:`PairPlan`, the ``config`` its record holds), the
:class:`RunHooks` it calls, training, test evaluation and the saved checkpoint
(:func:`run_method`), and comparing record configs (:func:`config_diff`, :func:`record_key`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backdoor.data import canonical_data_dir
from ..checkpoint import RUN_KEY_IGNORES
from ..errors import ConfigError
from ..fileio import replace_dir, write_json
from .data import reference_indices, reference_split, selection_dev_poison, training_rows
from .loading import BaseModels, resolve_device
from .presets import method_configs, resolve_seed
from .spec import METHODS, RUN_FILE, STEPS_OF, RunSpec, _as_spec

if TYPE_CHECKING:
    from ..train import TeacherCache

log = logging.getLogger("muscle_fast")


@dataclass
class MethodRun:
    """One (attack, method) run as :class:`RunHooks` see it: set up before training, scored after."""

    dataset: Any  #: the BackdoorDataset
    method: str
    model_name: str
    model: Any
    tokenizer: Any
    muscle_config: Any  #: MuScleConfig, or None for the full fine-tune
    train_config: Any  #: TrainConfig
    hparams: dict[str, Any]
    seed: int
    reference: list[Any]
    selection: list[Any]
    result: Any = None  #: TrainResult, once trained
    scores: dict[str, float] | None = None  #: test {"cacc", "asr"}, once trained


class RunHooks:
    """Callbacks into :func:`run_method` (the Fourier tracker uses them); each default does nothing."""

    def before_training(self, run: MethodRun) -> None:
        """Called with the patched model on its device, just before training starts."""

    def on_step(self, step: int, model: Any) -> None:
        """Called after every optimizer step (train_muscle's ``step_callback``)."""

    def after_training(self, run: MethodRun) -> None:
        """Called with the selected checkpoint loaded and ``run.result`` / ``run.scores`` set."""


#: Record ``config`` keys (dotted; a key covers those under it) that say how a run was executed or
#: reported, not what it computed: a finished pair differing only in these is not retrained, and
#: ``report`` does not warn about them. The ``train.*`` ones are the training loop's own
#: (``checkpoint.RUN_KEY_IGNORES``): it resumes a run across them too.
EXECUTION_KEYS = frozenset({"method_doc", "gradient_checkpointing"} | {f"train.{k}" for k in RUN_KEY_IGNORES})


#: Record ``config`` keys added after records were first written, with the value every older record
#: implicitly had: a record lacking the key does not differ from one at this value.
LATER_KEY_DEFAULTS: dict[str, Any] = {"load_in_4bit": False}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(
    old: dict[str, Any] | None, new: dict[str, Any] | None, ignore: Collection[str] = EXECUTION_KEYS
) -> list[str]:
    """The dotted keys (``train.lr``, ``data.rows.train``) whose values differ between two record
    configs, a key present in one only included unless it is at its default (a TrainConfig field
    or :data:`LATER_KEY_DEFAULTS`: a record written before the key existed); keys in ``ignore``,
    or under one, left out."""
    from ..train import TrainConfig

    a, b = _flatten(old or {}), _flatten(new or {})
    defaults = {f"train.{f.name}": f.default for f in dataclasses.fields(TrainConfig)} | LATER_KEY_DEFAULTS

    def ignored(k: str) -> bool:
        return any(k == i or k.startswith(f"{i}.") for i in ignore)

    def differs(k: str) -> bool:
        if k in a and k in b:
            return a[k] != b[k]
        present = a[k] if k in a else b[k]
        return not (k in defaults and present == defaults[k])

    return sorted(k for k in a.keys() | b.keys() if not ignored(k) and differs(k))


def _keys_text(keys: Sequence[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _data_digest(ds: Any) -> str:
    """A short hash of every split's rows and poison flags: data files changed in place (same row
    counts) make another config, not a finished pair to skip."""

    h = hashlib.sha256()
    for name in ("train", "dev_clean", "dev_poison", "test_clean", "test_poison"):
        h.update(f"[{name}]\n".encode())
        for text, label in ds.split(name):
            h.update(f"{label}\t{text}\n".encode())
        h.update(json.dumps(list(ds.poison_flags.get(name, []))).encode())
    return h.hexdigest()[:16]


@dataclass
class PairPlan:
    """One (attack, method) run before it trains: its configs, reference split and the ``config``
    its record will hold (what an earlier run of the pair is compared with)."""

    dataset: Any  #: the BackdoorDataset
    method: str
    muscle_config: Any  #: MuScleConfig, or None for the full fine-tune
    train_config: Any  #: TrainConfig (no checkpoint_dir: where the state goes is the run's business)
    hparams: dict[str, Any]
    seed: int
    reference: list[Any]
    selection: list[Any]
    config: dict[str, Any]  #: JSON-normalised, as results.json stores it
    train_rows: list[Any] = dataclasses.field(default_factory=list)  #: what the method trains on
    dev_poison: list[Any] = dataclasses.field(default_factory=list)  #: the dev ASR's rows
    #: the checkpoint's folder under ``out`` (None: ``<attack>/<method>``; several seeds: ``seed<N>/...``)
    rel: Path | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset.dataset, self.dataset.attack, self.method, self.seed)

    @property
    def path(self) -> Path:
        return self.rel if self.rel is not None else Path(self.dataset.attack) / self.method

    @property
    def label(self) -> str:
        return self.path.as_posix()


def record_seed(rec: dict[str, Any]) -> int | None:
    """A record's seed: its ``seed`` key, else (records written before it existed) its config's."""
    if rec.get("seed") is not None:
        return rec["seed"]
    data = (rec.get("config") or {}).get("data")
    return data.get("seed") if isinstance(data, dict) else None


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, int | None]:
    """What identifies a record among others: (dataset, attack, method, seed)."""
    return (rec["dataset"], rec["attack"], rec["method"], record_seed(rec))


def _steps(epochs: int, rows: int, batch_size: int) -> int:
    return epochs * math.ceil(rows / batch_size)


def plan_method(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    spec: RunSpec,
    model: Any = None,
) -> PairPlan:
    """The configs and record ``config`` of one (attack, method) run, without training.

    ``model`` (None: a stand-in holding only ``models.config()``, no weights) only has to carry the
    Hugging Face config the family defaults are read from, so every pair of a run is checked, and
    compared with what an earlier run recorded, before the weights load. ConfigError names the
    method and the field at fault.
    """
    from types import SimpleNamespace

    from ..train import config_dict

    spec = _as_spec(spec)
    m = METHODS[method]
    seed = resolve_seed(spec, preset)
    if model is None:
        model = SimpleNamespace(config=models.config())
    pcfg, tcfg, hp = method_configs(model, method, preset, spec)
    extra: dict[str, Any] = {}
    split_hp = hp
    if m.train_on == "reference":
        # the aligned method's reference rows (its ref_samples, same seed), and at least its steps
        _, steps_cfg, split_hp = method_configs(model, STEPS_OF, preset, spec)
        target = _steps(steps_cfg.epochs, len(ds.train), steps_cfg.batch_size)
    ref_idx = reference_indices(len(ds.dev_clean), split_hp["ref_samples"], seed)
    ref, select = reference_split(ds.dev_clean, split_hp["ref_samples"], seed, split_hp["ref_disjoint"])
    if m.train_on == "reference":
        hp = {**hp, "ref_samples": split_hp["ref_samples"], "ref_disjoint": split_hp["ref_disjoint"]}
        per_epoch = math.ceil(len(ref) / tcfg.batch_size)
        asked = preset.get("methods", {}).get(method, {}).get("epochs")
        epochs = max(math.ceil(target / per_epoch), asked if isinstance(asked, int) else 0)
        tcfg = dataclasses.replace(tcfg, epochs=epochs)
        extra["steps"] = {"target": target, "of": STEPS_OF, "planned": epochs * per_epoch}
    train_rows = training_rows(ds, method, ref)
    dev_poison, twins = (
        selection_dev_poison(ds, ref_idx) if split_hp["ref_disjoint"] else (list(ds.dev_poison), 0)
    )
    source = ds.source
    if source and Path(source).exists():  # the same folder reached from another working directory
        source = str(Path(source).resolve())
    config = {
        "method": method,
        "method_doc": m.doc,
        "model": models.name,
        "train": config_dict(tcfg),
        "muscle_config": pcfg.to_dict() if pcfg is not None else None,
        "ref_samples": len(ref),
        "ref_disjoint": hp["ref_disjoint"],
        "load_in_4bit": models.load_in_4bit,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "selection_rows": len(select),
        "train_rows": len(train_rows),
        # dev ASR rows: dev-poison less the triggered twins of reference rows (None: unpaired data)
        "dev_asr_rows": {
            "rows": len(dev_poison),
            "twins_dropped": twins,
            "paired": getattr(ds, "dev_poison_source", None) is not None,
        },
        **extra,
        "data": {
            "source": source,
            "setting": ds.setting,
            "rate": ds.rate,
            "target_label": ds.target_label,
            "num_labels": ds.num_labels,
            "seed": seed,
            "max_train_rows": spec.max_train_rows,
            "max_eval_rows": spec.max_eval_rows,
            "rows": ds.summary(),
            "digest": _data_digest(ds),
        },
    }
    config = json.loads(json.dumps(config))  # tuples as lists: compares equal to a stored record
    return PairPlan(ds, method, pcfg, tcfg, hp, seed, ref, select, config, train_rows, dev_poison)


def evaluate_test(
    model: Any,
    tokenizer: Any,
    ds: Any,
    batch_size: int,
    max_length: int,
    progress: bool = False,
    desc: str = "test",
) -> dict[str, float]:
    """Test ``{"cacc", "asr"}`` as ``evaluate_backdoor`` computes them (same batches, same numbers),
    with a progress bar over the rows: a full test set takes minutes on a CPU."""
    from tqdm.auto import tqdm

    from ..backdoor.metrics import attack_success_rate, clean_accuracy
    from ..evaluation import predict

    clean, poison = ds.split("test_clean"), ds.split("test_poison")
    bar = tqdm(total=len(clean) + len(poison), desc=desc, unit="row", leave=False, disable=not progress)

    def preds(rows: Sequence[Any]) -> Any:
        return predict(model, tokenizer, rows, batch_size, max_length, on_batch=bar.update)

    try:
        pc, pp = preds(clean), preds(poison)
    finally:
        bar.close()
    return {
        "cacc": clean_accuracy(pc, [lab for _, lab in clean]),
        "asr": attack_success_rate(pp, ds.target_label),
    }


def run_method(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    spec: RunSpec,
    out: Path | None = None,
    *,
    hooks: RunHooks | None = None,
    save_checkpoint: bool = True,
    plan: PairPlan | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one method on one attack, evaluate the selected checkpoint, save it under
    ``out/<attack>/<method>`` (``out``: the spec's; ``plan.rel`` when set); the result record as
    ``results.json`` holds it.

    ``plan``: the pair's :func:`plan_method` (computed here when None). ``state_dir``: keep the
    training loop's state there (atomic checkpoints) and resume from it when one is there.
    """
    return run_pairs(
        ds, method, models, preset, spec, out, hooks=hooks, save_checkpoint=save_checkpoint, plan=plan,
        state_dir=state_dir,
    )[0]  # fmt: skip


def _rows_model_key(plan: PairPlan, models: BaseModels) -> str:
    """A digest of what a training on the reference rows depends on: the base model, seed, configs,
    reference and selection rows (not the attack's training rows)."""
    cfg = plan.config
    what = [
        models.name, models.load_in_4bit, plan.seed, plan.method, plan.dataset.num_labels, cfg["train"],
        cfg["muscle_config"], cfg["gradient_checkpointing"], plan.reference, plan.selection,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def training_key(plan: PairPlan, models: BaseModels) -> str | None:
    """What a ``ref-only`` pair's training depends on, or None for a method that trains on its
    attack's own rows: pairs of several attacks with the same key train the same model, so
    :func:`run_pairs` trains it once for all of them."""
    return _rows_model_key(plan, models) if METHODS[plan.method].train_on == "reference" else None


def teacher_key(plan: PairPlan, models: BaseModels) -> str | None:
    """What a ``+filter`` pair's teacher depends on (it trains on the reference rows only), or None
    for a method without a teacher: pairs of several attacks with the same key can share one
    :class:`~muscle_fast.train.TeacherCache`."""
    return _rows_model_key(plan, models) if plan.train_config.teacher_epochs else None


def run_pairs(
    ds: Any,
    method: str,
    models: BaseModels,
    preset: dict[str, Any],
    spec: RunSpec,
    out: Path | None = None,
    *,
    hooks: RunHooks | None = None,
    save_checkpoint: bool = True,
    plan: PairPlan | None = None,
    state_dir: Path | None = None,
    shared: Sequence[PairPlan] = (),
    teacher: TeacherCache | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_method`, whose training also serves ``shared``: plans of other attacks with the
    same :func:`training_key`. The model is trained once; every epoch also evaluates each shared
    plan's dev-poison rows, and each is then scored on its own test sets, saved under its own
    folder and recorded as its own pair (``trained_with`` names the pair that trained it).
    ``teacher``: the cache of the pairs with this pair's :func:`teacher_key`; a pair whose teacher
    an earlier one trained records its name as the teacher's ``trained_with``.
    Returns the records, this pair's first."""
    import torch

    from ..adapter import save_adapter
    from ..patch import patch_model
    from ..train import set_activation_checkpointing, train_muscle

    spec = _as_spec(spec)
    m = METHODS[method]
    model_name = models.name
    model, tok = models.get(ds.num_labels)
    if plan is None:
        plan = plan_method(ds, method, models, preset, spec, model)
    for q in (plan, *shared):
        if not q.train_rows:  # a PairPlan built by hand without them: the method's own rows
            q.train_rows = training_rows(q.dataset, method, q.reference)
        if not q.dev_poison:
            q.dev_poison = list(q.dataset.dev_poison)
    key = training_key(plan, models)
    for q in shared:
        if q.method != method or key is None or training_key(q, models) != key:
            raise ValueError(f"run_pairs: {q.label} does not train the same model as {plan.label}")
    seed = plan.seed
    torch.manual_seed(seed)
    pcfg, tcfg, hp, ref, select = (
        plan.muscle_config,
        plan.train_config,
        plan.hparams,
        plan.reference,
        plan.selection,
    )
    if pcfg is not None:
        patch_model(model, pcfg)
    model.to(resolve_device(spec.device))
    checkpointing = spec.gradient_checkpointing
    if checkpointing:  # recompute each layer in backward: activation memory of one layer, not all
        set_activation_checkpointing(model, True)
    what = {"train": "", "clean": " (its unpoisoned rows)", "reference": " (the reference rows)"}
    log.info(
        f"muscle-fast: {ds.dataset}/{ds.attack} {method} ({m.doc}), seed {seed}: "
        f"{len(plan.train_rows)} train rows{what[m.train_on]} of {len(ds.train)} "
        f"({sum(ds.train_poison_flags)} poisoned), {len(ref)} reference rows, {tcfg.epochs} epochs, "
        f"dev ASR on {len(plan.dev_poison)} dev-poison rows "
        f"({plan.config.get('dev_asr_rows', {}).get('twins_dropped', 0)} twins of reference rows left out)"
        + (f"; also serves {', '.join(q.label for q in shared)} (the same training)" if shared else "")
    )
    run = MethodRun(ds, method, model_name, model, tok, pcfg, tcfg, hp, seed, ref, select)
    if hooks is not None:
        hooks.before_training(run)
    loop_cfg = dataclasses.replace(tcfg, checkpoint_dir=str(state_dir)) if state_dir is not None else tcfg
    asr_key = {plan.label: "dev_asr", **{q.label: f"dev_asr@{i}" for i, q in enumerate(shared, 1)}}
    reused = teacher is not None and teacher.result is not None
    forget_kernel_choices()  # the record's ``kernels``: what this pair measured, not earlier pairs
    res = train_muscle(
        model,
        tok,
        plan.train_rows,
        ref,
        select,
        loop_cfg,
        eval_sets={asr_key[q.label]: q.dev_poison for q in (plan, *shared)},
        step_callback=hooks.on_step if hooks is not None else None,
        teacher_cache=teacher,
    )
    if teacher is not None:
        _note_shared_teacher(teacher, res, reused, plan.label)
    records = []
    for q in (plan, *shared):
        qds = q.dataset
        log.info(
            f"muscle-fast: {qds.attack}/{method}: test evaluation on {len(qds.test_clean)} clean and "
            f"{len(qds.test_poison)} poisoned rows"
        )
        scores = evaluate_test(
            model,
            tok,
            qds,
            tcfg.eval_batch_size,
            tcfg.max_length,
            spec.progress,
            f"{qds.attack}/{method} test",
        )
        if q is plan:
            run.result, run.scores = res, scores
            if hooks is not None:
                hooks.after_training(run)
        history = [
            {**{k: v for k, v in h.items() if not k.startswith("dev_asr@")}, "dev_asr": h[asr_key[q.label]]}
            for h in res.history
        ]
        rec = _pair_record(q, model_name, res, history, scores, save_checkpoint)
        if q is not plan:
            rec["trained_with"] = plan.label
        if save_checkpoint:
            run_info = {
                "dataset": qds.dataset,
                "attack": qds.attack,
                "method": method,
                "model": model_name,
                "data_dir": canonical_data_dir(spec.data_dir),
                "full_model": not m.patch,
                "load_in_4bit": models.load_in_4bit,
                "cacc": scores["cacc"],
                "asr": scores["asr"],
                "seed": seed,
                "max_eval_rows": spec.max_eval_rows,
                "setting": qds.setting,
                "rate": qds.rate,
                "target_label": qds.target_label,
                "num_labels": qds.num_labels,
                "max_length": tcfg.max_length,
                "eval_batch_size": tcfg.eval_batch_size,
            }

            def write(tmp: Path, run_info: dict[str, Any] = run_info) -> None:
                if m.patch:
                    save_adapter(model, tmp)
                else:
                    model.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
                write_json(tmp / RUN_FILE, run_info)

            replace_dir((out if out is not None else spec.out_dir()) / q.path, write)
        records.append(rec)
    return records


def _pair_record(
    plan: PairPlan,
    model_name: str,
    res: Any,
    history: list[dict[str, Any]],
    scores: dict[str, float],
    saved: bool,
) -> dict[str, Any]:
    """The results.json record of one pair: test scores, the selected epoch, curves, filters, config."""
    ds = plan.dataset
    best = next(h for h in history if h["epoch"] == res.best_epoch)
    return {
        "dataset": ds.dataset,
        "attack": ds.attack,
        "method": plan.method,
        "seed": plan.seed,
        "cacc": scores["cacc"],
        "asr": scores["asr"],
        "dev_cacc": res.best_dev_acc,
        "dev_asr": best["dev_asr"],
        "best_epoch": res.best_epoch,
        "curves": {
            "epoch": [h["epoch"] for h in history],
            "dev_cacc": [h["dev_acc"] for h in history],
            "dev_asr": [h["dev_asr"] for h in history],
            "train_loss": [h["train_loss"] for h in history],
        },
        "epochs": len(history),
        **filter_records(plan.method, res, ds),
        "steps": res.steps,
        "wall_seconds": res.wall_seconds,
        "adapter": str(plan.path) if saved else None,
        "config": plan.config,
        **({"kernels": kernels} if (kernels := kernel_choices()) else {}),
    }


def kernel_choices() -> dict[str, list[dict[str, Any]]]:
    """What ``backend="auto"`` measured faster since ``forget_kernel_choices``, per op and shape (our
    kernel, cuBLAS or bitsandbytes: ``muscle_fast.ops.measure``), for the run record; empty off CUDA."""
    from ..ops.lowrank import measured_choices

    return {op: rows for op, rows in measured_choices().items() if rows}


def forget_kernel_choices() -> None:
    """Start a pair with nothing measured (each key is measured again: ~0.1 s each on a GPU)."""
    from ..ops.measure import forget_all

    forget_all()


def _split_by_poison(
    rec: dict[str, Any], flags: Sequence[bool] | None, kinds: Sequence[str]
) -> dict[str, Any]:
    """``rec`` without its ``<kind>_index`` row lists and, where the training rows' poison flags are
    known, with how many poisoned and clean rows each kind of action touched."""
    out = {k: v for k, v in rec.items() if k != "history" and not k.endswith("_index")}
    if flags is not None:
        out["poison_rows"] = sum(1 for f in flags if f)
        for kind in kinds:
            rows = rec[f"{kind}_index"]
            out[f"poison_{kind}"] = sum(1 for i in rows if flags[i])
            out[f"clean_{kind}"] = len(rows) - out[f"poison_{kind}"]
    return out


def filter_records(method: str, res: Any, ds: Any) -> dict[str, Any]:
    """The ``scan``, ``disc`` and ``teacher`` records of a TrainResult that has them, for results.json: what
    each dropped or relabelled, split into poisoned and clean rows where the data knows which."""
    flags = ds.train_poison_flags if METHODS[method].train_on == "train" else None  # row i of its rows
    return {
        **({"teacher": _teacher_record(res.teacher, flags)} if res.teacher else {}),
        **({"scan": _scan_record(res.scan, flags)} if res.scan else {}),
        **({"disc": _scan_record(res.disc, flags)} if res.disc else {}),
    }


def _scan_record(scan: dict[str, Any], flags: Sequence[bool] | None) -> dict[str, Any]:
    """A row filter's record (the n-gram scan, the discriminator) for results.json: what it found
    and the rows it dropped."""
    return _split_by_poison(scan, flags, ("dropped",))


def _note_shared_teacher(teacher: TeacherCache, res: Any, reused: bool, label: str) -> None:
    """After a pair's training: the cache remembers the pair that trained its teacher, and a pair
    that reused it records that pair as its teacher's ``trained_with``; a pair whose teacher was
    skipped (``teacher_gate``) does neither."""
    if "skipped" in res.teacher:
        return
    if not reused and teacher.result is not None:
        teacher.trained_by = label
    elif reused and res.teacher:
        res.teacher = {**res.teacher, "trained_with": teacher.trained_by}


def _teacher_record(teacher: dict[str, Any], flags: Sequence[bool] | None) -> dict[str, Any]:
    """The teacher's record for results.json: its epoch, dev accuracy and the rows it dropped or
    relabelled; or why it did not run (``skipped``: ``teacher_gate``)."""
    if "skipped" in teacher:
        return dict(teacher)
    return _split_by_poison(teacher, flags, ("dropped", "relabeled"))


def check_out_dir(out: Path) -> None:
    """ConfigError naming ``--out`` when the output folder cannot be one: an existing file, or a
    path under a file (the OS says only ``[Errno 17] File exists`` or ``Not a directory``)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is an existing file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"RunSpec.out (--out) {out} {where}, not a folder")
            return


def _make_out_dir(out: Path) -> None:
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"RunSpec.out (--out) {out}: cannot create the folder: {e.strerror or e}") from None
