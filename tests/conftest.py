"""Test setup: run every Triton kernel through the interpreter when there is no GPU."""

import os
import sys

# Under pytest-xdist every worker gets its share of the cores: torch's default pool (one thread per
# core) in each worker and in the processes tests start would oversubscribe them. Set before torch
# is imported, and inherited by those processes.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_choices():
    """No test sees the measured choices of ``backend="auto"`` another made (MUSCLE_FAST_PICK is read
    when a shape is first seen)."""
    yield
    measure = sys.modules.get("muscle_fast.ops.measure")
    if measure is not None:
        measure.forget_all()


def _minutes(item: pytest.Item) -> float:
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("minutes", 1))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first (``slow(minutes=...)``): under pytest-xdist none of them starts last, alone.

    ``--dist loadscope`` hands out whole modules in this order only with ``--no-loadscope-reorder``
    (README's command); its default reorders them by test count, which put the one-test fresh-clone
    module last."""
    items.sort(key=_minutes, reverse=True)
