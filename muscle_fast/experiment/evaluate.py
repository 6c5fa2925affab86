"""``eval``: test CACC and ASR of a checkpoint saved by ``defend`` (adapter or full model), by
default on the data, seed and row cap recorded with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEED, TRAIN_DEFAULTS
from ..errors import ConfigError, RunError
from ..fileio import read_json
from .data import load_sets
from .loading import load_classifier, resolve_device, resolve_model_name
from .spec import RUN_FILE


@dataclass(frozen=True)
class EvalSpec:
    """One ``eval`` of a checkpoint saved by ``defend``; ``None`` means "as recorded with it"."""

    checkpoint: str | Path  #: a checkpoint folder: OUT/<attack>/<method>
    model: str | None = None  #: base model of an adapter
    data_dir: str | Path | None = None
    attacks: str | None = None
    poison_setting: str | None = None
    poison_rate: float | None = None
    target_label: int | None = None
    num_labels: int | None = None
    max_eval_rows: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    load_in_4bit: bool = False
    device: str = "auto"


@dataclass(frozen=True)
class EvalResult:
    """Test CACC and ASR of a checkpoint on one (dataset, attack)."""

    dataset: str
    attack: str
    method: str | None  #: as recorded with the checkpoint
    label: str  #: the method, or the folder name when none is recorded
    scores: dict[str, float]  #: {"cacc", "asr"}
    test_clean_rows: int
    test_poison_rows: int


def evaluate_checkpoint(spec: EvalSpec) -> list[EvalResult]:
    """CACC and ASR of a saved adapter or fully fine-tuned model, by default on the data, seed and
    row cap recorded with it (so the recorded scores are reproduced)."""
    from ..adapter import ADAPTER_CONFIG, load_adapter, read_adapter_config
    from ..backdoor.data import is_attack_dir
    from ..backdoor.metrics import evaluate_backdoor

    d = Path(spec.checkpoint)
    if not d.is_dir():
        raise RunError(f"checkpoint folder {d} does not exist")
    full = (d / "config.json").is_file()
    if not full and not (d / ADAPTER_CONFIG).is_file():
        raise RunError(
            f"{d} is neither a muscle_fast adapter ({ADAPTER_CONFIG}) nor a saved model (config.json)"
        )
    run: dict[str, Any] = read_json(d / RUN_FILE, "the run record") if (d / RUN_FILE).is_file() else {}
    given = dataclasses.asdict(spec)
    for key, rec in (
        ("data_dir", "data_dir"), ("seed", "seed"), ("max_eval_rows", "max_eval_rows"),
        ("target_label", "target_label"), ("num_labels", "num_labels"),
        ("poison_setting", "setting"), ("poison_rate", "rate"),  # which training file the run used
    ):  # fmt: skip
        if given[key] is None and run.get(rec) is not None:
            given[key] = run[rec]
    seed = given["seed"] if given["seed"] is not None else DEFAULT_SEED
    attacks = spec.attacks
    data_dir = given["data_dir"]
    if data_dir is None and run and "data_dir" in run:  # recorded None: runs before the embedded copy
        data_dir = "hub:sst2"
    if attacks is None and run.get("attack") and not (data_dir and is_attack_dir(data_dir)):
        attacks = run["attack"]
    sets = load_sets(
        data_dir,
        attacks,
        setting=given["poison_setting"],
        rate=given["poison_rate"],
        target_label=given["target_label"],
        num_labels=given["num_labels"],
        max_eval_rows=given["max_eval_rows"],
        seed=seed,
        need_train=False,
    )
    device = resolve_device(spec.device)
    if full:
        for flag, v in (("--load-in-4bit", spec.load_in_4bit), ("--model", spec.model)):
            if v:
                raise ConfigError(f"{d} is a fully fine-tuned model; {flag} is for adapters")
        model, tok = load_classifier(str(d), sets[0].num_labels)
    else:
        read_adapter_config(d)  # a wrong format version fails here, before the model loads
        meta = read_json(d / ADAPTER_CONFIG, "adapter config")
        base = resolve_model_name(spec.model) if spec.model else None
        base = base or run.get("model") or meta.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{d} does not record its base model; pass --model")
        four_bit = spec.load_in_4bit or bool(run.get("load_in_4bit"))
        model, tok = load_classifier(base, sets[0].num_labels, four_bit, device)
        load_adapter(model, d)
    model.to(device)
    batch = spec.batch_size or run.get("eval_batch_size", TRAIN_DEFAULTS.eval_batch_size)
    max_length = spec.max_length or run.get("max_length", TRAIN_DEFAULTS.max_length)
    results = []
    for ds in sets:
        scores = evaluate_backdoor(model, tok, ds, batch, max_length)
        results.append(
            EvalResult(
                ds.dataset,
                ds.attack,
                run.get("method"),
                run.get("method", d.name),
                scores,
                len(ds.test_clean),
                len(ds.test_poison),
            )
        )
    return results
