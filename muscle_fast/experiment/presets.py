"""Hyperparameters: preset files (built-in, on disk or inline JSON), the run's seeds, and the merge
family preset < preset file < method section < spec into each method's MuScleConfig and TrainConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SEED, TRAIN_DEFAULTS
from ..errors import ConfigError, FileFormatError, first_line
from ..fileio import read_json
from .spec import METHODS, RunSpec, _as_spec

log = logging.getLogger("muscle_fast")


# TrainConfig fields a preset may not set: the method decides `align`, the run the rest
_RESERVED = {"align", "checkpoint_dir", "progress"}


_FLAG_KEYS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "lr": "lr",
    "checkpoint_every": "checkpoint_every",
}


def _preset_keys() -> set[str]:
    from ..train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - _RESERVED | {
        "ref_samples",
        "ref_disjoint",
        "muscle_config",
    }


def _check_section(section: Any, where: str, path: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {where} must be a JSON object")
    unknown = sorted(set(section) - _preset_keys())
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in {where}; allowed: {sorted(_preset_keys())}")
    if "muscle_config" in section and not isinstance(section["muscle_config"], dict):
        raise ConfigError(f"{path}: muscle_config in {where} must be a JSON object")
    return section


#: Presets shipped with the package (``--config NAME``): tuned settings with their provenance.
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
#: The preset used when neither a model nor a preset is given (the demo MiniLM).
DEFAULT_MODEL_PRESET = "minilm-sst2"


def builtin_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def json_object(value: str, flag: str) -> dict[str, Any]:
    """A flag's JSON object, given inline (``'{"lora_r": 4}'``) or as a file path; ConfigError
    naming the flag (and the file) when it is neither, does not parse or is not an object."""
    if value.lstrip()[:1] in ("{", "["):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: inline JSON does not parse: {e}") from None
    elif Path(value).is_file():
        try:
            obj = read_json(value, f"the {flag} file")
        except FileFormatError as e:
            raise ConfigError(f"{flag}: {e}") from None
    else:
        raise ConfigError(f"{flag}: {value!r} is neither a JSON object nor an existing file")
    if not isinstance(obj, dict):
        raise ConfigError(f"{flag}: must be a JSON object, got {type(obj).__name__}")
    return obj


def load_preset(path: str | None) -> dict[str, Any]:
    """A JSON preset: a file, a built-in name (``minilm-sst2``) or the JSON object itself (inline,
    as ``--config '{"lr": 1e-4}'``); top-level hyperparameters plus optional per-method ``methods``
    sections. ConfigError names the file (or "inline --config") and the key at fault."""
    if path is None:
        return {}
    inline = path.lstrip()[:1] in ("{", "[")
    if not inline and not Path(path).is_file():
        if path not in builtin_presets():
            raise ConfigError(
                f"preset file {path} (--config) does not exist: pass a JSON file, a JSON object or a "
                f"built-in preset ({', '.join(builtin_presets())})"
            )
        path = str(PRESETS_DIR / f"{path}.json")
    data = json_object(path, "--config")
    p = "inline --config" if inline else path
    methods = data.pop("methods", {})
    data.pop("about", None)  # free text: where the numbers came from
    _check_section(data, "the top level", str(p))
    if not isinstance(methods, dict):
        raise ConfigError(f"{p}: 'methods' must be an object of per-method sections")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{p}: unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    for m, sec in methods.items():
        _check_section(sec, f"methods.{m}", str(p))
    return {**data, "methods": methods}


def preset_for(spec: RunSpec) -> dict[str, Any]:
    """The spec's preset; without one, the built-in preset of the default model (no model) or of
    a model that has one (``smollm2``: :func:`muscle_fast.models.builtin_preset`)."""
    from ..models import builtin_preset

    if spec.preset is None and spec.model is None:
        log.info(f"muscle-fast: default model, built-in preset {DEFAULT_MODEL_PRESET!r} (--config overrides)")
        return load_preset(DEFAULT_MODEL_PRESET)
    builtin = builtin_preset(spec.model) if spec.preset is None else None
    if builtin is not None:
        log.info(f"muscle-fast: {spec.model}, built-in preset {builtin!r} (--config overrides)")
        return load_preset(builtin)
    return load_preset(spec.preset)


def resolve_seed(spec: Any, preset: dict[str, Any]) -> int:
    """The run's seed: the spec's, else its one ``seeds`` entry, else the preset's, else ``DEFAULT_SEED``.

    A spec with several ``seeds`` has no single seed: split it with :func:`seed_specs` first."""
    seed = getattr(spec, "seed", None)
    seeds = getattr(spec, "seeds", None)
    if seed is None and seeds:
        if len(seeds) > 1:
            raise ConfigError(f"this step runs one seed at a time, got seeds {list(seeds)}")
        seed = seeds[0]
    return seed if seed is not None else preset.get("seed", DEFAULT_SEED)


def seed_specs(spec: RunSpec, preset: dict[str, Any]) -> list[RunSpec]:
    """One spec per seed of the run (``seeds``, else the one resolved seed), each with ``seed`` set:
    everything seeded (subsample, poisoning, reference rows, head, training) follows that seed."""
    seeds = list(spec.seeds) if spec.seeds is not None else [resolve_seed(spec, preset)]
    return [dataclasses.replace(spec, seed=s, seeds=None) for s in seeds]


def effective_hparams(model: Any, method: str, preset: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Hyperparameters of one method: family preset < preset file < its method section < spec.

    A method's own defaults (``Method.defaults``, e.g. ``lora+filter``'s scan and teacher) come
    first, under the preset file. A method that inherits (``oracle``, ``ref-only``,
    ``lora+filter``) reads the section of that method (``vanilla``, ``lora``), then its own.

    Reads the spec's override fields by name (``epochs``, ``batch_size``, ``max_length``, ``lr``,
    ``ref_samples``, ``seed``, ``ref_overlap``), so an object with those attributes works too.
    """
    from ..config import model_family

    fam = model_family(model)
    out: dict[str, Any] = {
        "ref_samples": fam.ref_samples if fam else TRAIN_DEFAULTS.ref_samples,
        "ref_disjoint": True,
        "muscle_config": {},
    }
    m = METHODS.get(method)
    inherits = m.inherits if m is not None else None
    for section in (
        dict(m.defaults) if m is not None else {},
        {k: v for k, v in preset.items() if k != "methods"},
        preset.get("methods", {}).get(inherits, {}) if inherits else {},
        preset.get("methods", {}).get(method, {}),
    ):
        for k, v in section.items():
            if k == "muscle_config":
                out["muscle_config"] = {**out["muscle_config"], **v}
            else:
                out[k] = v
    for key, attr in {**_FLAG_KEYS, "ref_samples": "ref_samples", "seed": "seed"}.items():
        if getattr(spec, attr, None) is not None:
            out[key] = getattr(spec, attr)
    seeds = getattr(spec, "seeds", None)
    if getattr(spec, "seed", None) is None and seeds is not None and len(seeds) == 1:
        out["seed"] = seeds[0]  # one seed given as a list is that seed
    if getattr(spec, "ref_overlap", False):
        out["ref_disjoint"] = False
    if not isinstance(out["ref_disjoint"], bool):
        raise ConfigError(f"ref_disjoint must be true or false, got {out['ref_disjoint']!r}")
    if not (isinstance(out["ref_samples"], int) and out["ref_samples"] >= 1):
        raise ConfigError(f"ref_samples must be an integer >= 1, got {out['ref_samples']!r}")
    return out


def method_configs(
    model: Any, method: str, preset: dict[str, Any], spec: RunSpec
) -> tuple[Any, Any, dict[str, Any]]:
    """(MuScleConfig or None for vanilla, TrainConfig, merged hyperparameters) of one method.

    A value the config classes reject is a ConfigError naming the method.
    """
    from ..config import MuScleConfig
    from ..train import TrainConfig

    spec = _as_spec(spec)
    m = METHODS[method]
    hp = effective_hparams(model, method, preset, spec)
    try:
        pcfg = None
        if m.patch:
            overrides = dict(hp["muscle_config"])
            if not m.mslr:
                overrides["mslr_targets"] = []
            pcfg = MuScleConfig.for_model(model, **overrides)
        train_kw = {k: v for k, v in hp.items() if k not in ("ref_samples", "ref_disjoint", "muscle_config")}
        tcfg = TrainConfig.for_model(model, align=m.align, progress=spec.progress, **train_kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method {method}: {first_line(e)}") from e
    return pcfg, tcfg, hp
