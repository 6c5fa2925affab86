"""Backdoor data for the defense evaluation (SPEC §5): loaders, built-in poisoners and metrics.

Poisoned data comes either from OpenBackdoor-format folders (what the paper released)
or from a clean set poisoned here with BadNets / AddSent; both give a ``BackdoorDataset``
with the five splits the protocol needs.

Modules, each importing only those above it: ``dataset`` (the structure and ``DataError``),
``poison`` (BadNets, AddSent, ``make_poisoned``), ``data`` (file and hub loaders,
``load_backdoor_sets``), ``metrics`` (CACC, ASR).
"""

from .data import (
    load_backdoor_sets,
    load_clean_dir,
    load_clean_file,
    load_hub_sst2,
    load_openbackdoor,
    resolve_train_file,
)
from .dataset import SETTINGS, SPLITS, BackdoorDataset, DataError
from .metrics import attack_success_rate, clean_accuracy, evaluate_backdoor
from .poison import POISONERS, AddSent, BadNets, get_poisoner, make_poisoned, poison_eval, poison_train

__all__ = [
    "POISONERS",
    "SETTINGS",
    "SPLITS",
    "AddSent",
    "BackdoorDataset",
    "BadNets",
    "DataError",
    "attack_success_rate",
    "clean_accuracy",
    "evaluate_backdoor",
    "get_poisoner",
    "load_backdoor_sets",
    "load_clean_dir",
    "load_clean_file",
    "load_hub_sst2",
    "load_openbackdoor",
    "make_poisoned",
    "poison_eval",
    "poison_train",
    "resolve_train_file",
]
