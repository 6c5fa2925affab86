"""Deprecated alias of the ``csrc_triton`` package: ``muscle_fast.kernels.<op>`` is ``csrc_triton.<op>``.

The kernels live in the top-level ``csrc_triton`` package; import them from there. Submodules
imported through this alias are the very module objects of ``csrc_triton`` (one copy of each
kernel, one autotune cache), not re-executed copies.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

warnings.warn(
    "muscle_fast.kernels is deprecated; import the kernels from csrc_triton (e.g. csrc_triton.lowrank)",
    DeprecationWarning,
    stacklevel=2,
)

_TARGET = "csrc_triton"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``muscle_fast.kernels.X`` to the already-importable ``csrc_triton.X``."""

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(__name__ + "."):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(_TARGET + spec.name[len(__name__) :])

    def exec_module(self, module: ModuleType) -> None:
        """The target module ran when it was imported under its own name."""


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name: str) -> Any:
    try:
        return importlib.import_module(f"{_TARGET}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
