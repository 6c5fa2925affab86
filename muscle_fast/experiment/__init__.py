"""The defense experiment behind ``muscle-fast defend``/``eval``/``fourier`` (SPEC §5-6).

A run is a :class:`RunSpec` in and records out: :func:`run_defend` trains and compares the
methods, :func:`run_fourier` trains one while a Fourier tracker records it, and both go through
:func:`run_method`, one (attack, method) training run with its evaluation and checkpoint.
Hyperparameters merge as family preset < preset file < method section < spec overrides.
Bad input is a typed error from :mod:`muscle_fast.errors` (or the data's ``DataError``), never a
process exit, so the library can be driven from code; the CLI turns them into one-line messages.

Every name is importable from here; the submodules, each importing only from those above it:

- :mod:`.loading`: the model (``default_model``, ``resolve_model_name``, ``check_model_path``,
  ``load_model_config``, ``load_classifier`` with 4-bit loading, ``resolve_device``, ``BaseModels``).
- :mod:`.spec`: the compared methods (``Method``, ``METHODS``, ``parse_methods``, ``RUN_FILE``) and
  ``RunSpec`` (``parse_seeds``).
- :mod:`.presets`: preset files (``load_preset``, ``preset_for``, ``builtin_presets``), seeds
  (``resolve_seed``, ``seed_specs``) and the merged hyperparameters (``effective_hparams``,
  ``method_configs``).
- :mod:`.data`: the rows a run sees (``load_sets``, ``reference_split``, ``selection_dev_poison``,
  ``training_rows``).
- :mod:`.run`: one (attack, method) run (``PairPlan``, ``plan_method``, ``RunHooks``, ``run_method``,
  ``evaluate_test``; ``run_pairs``: one training for several pairs with the same ``training_key``,
  as ``ref-only`` across attacks) and record configs (``config_diff``, ``record_key``, ``EXECUTION_KEYS``).
- :mod:`.defend`: ``run_defend`` with skip / resume / retrain decisions (``DefendResult``,
  ``previous_records``, ``STATE_DIR``).
- :mod:`.fourier`: ``run_fourier`` (``FourierOptions``, ``FourierResult``).
- :mod:`.evaluate`: ``evaluate_checkpoint`` (``EvalSpec``, ``EvalResult``).
- :mod:`.scan`: ``scan_data`` (``ScanReport``), the lexical-trigger scan without training.

A test that replaces a function a run calls patches it in the submodule that calls it (e.g.
``muscle_fast.experiment.loading.load_classifier``): replacing the name here does not reach it.
"""

from __future__ import annotations

import logging

from .data import (
    load_sets,
    reference_indices,
    reference_split,
    selection_dev_poison,
    training_rows,
)
from .defend import (
    PAIR_FILE,
    STATE_DIR,
    DefendResult,
    check_before_training,
    plan_defend,
    previous_records,
    run_defend,
)
from .evaluate import (
    EvalResult,
    EvalSpec,
    evaluate_checkpoint,
)
from .fourier import (
    FourierOptions,
    FourierResult,
    check_deltas,
    run_fourier,
)
from .loading import (
    TOKENIZER_FILES,
    BaseModels,
    check_model_path,
    default_model,
    load_classifier,
    load_model_config,
    resolve_device,
    resolve_model_name,
)
from .presets import (
    DEFAULT_MODEL_PRESET,
    PRESETS_DIR,
    builtin_presets,
    effective_hparams,
    json_object,
    load_preset,
    method_configs,
    preset_for,
    resolve_seed,
    seed_specs,
)
from .run import (
    EXECUTION_KEYS,
    LATER_KEY_DEFAULTS,
    MethodRun,
    PairPlan,
    RunHooks,
    check_out_dir,
    config_diff,
    evaluate_test,
    plan_method,
    record_key,
    record_seed,
    run_method,
    run_pairs,
    training_key,
)
from .scan import SCAN_METHOD, ScanReport, scan_data
from .spec import (
    DEFAULT_METHODS,
    METHODS,
    RUN_FILE,
    STEPS_OF,
    TRAIN_ON,
    Method,
    RunSpec,
    parse_methods,
    parse_seeds,
)

log = logging.getLogger("muscle_fast")

__all__ = [
    "BaseModels",
    "DEFAULT_METHODS",
    "DEFAULT_MODEL_PRESET",
    "DefendResult",
    "EXECUTION_KEYS",
    "EvalResult",
    "EvalSpec",
    "FourierOptions",
    "LATER_KEY_DEFAULTS",
    "FourierResult",
    "METHODS",
    "Method",
    "MethodRun",
    "PAIR_FILE",
    "PRESETS_DIR",
    "PairPlan",
    "RUN_FILE",
    "RunHooks",
    "RunSpec",
    "SCAN_METHOD",
    "STATE_DIR",
    "ScanReport",
    "STEPS_OF",
    "TOKENIZER_FILES",
    "TRAIN_ON",
    "builtin_presets",
    "check_before_training",
    "check_deltas",
    "check_model_path",
    "check_out_dir",
    "config_diff",
    "default_model",
    "effective_hparams",
    "evaluate_checkpoint",
    "evaluate_test",
    "load_classifier",
    "load_model_config",
    "json_object",
    "load_preset",
    "load_sets",
    "method_configs",
    "parse_methods",
    "parse_seeds",
    "plan_defend",
    "plan_method",
    "preset_for",
    "previous_records",
    "record_key",
    "record_seed",
    "reference_indices",
    "reference_split",
    "resolve_device",
    "resolve_model_name",
    "resolve_seed",
    "run_defend",
    "run_fourier",
    "run_method",
    "run_pairs",
    "training_key",
    "scan_data",
    "seed_specs",
    "selection_dev_poison",
    "training_rows",
]
