"""The wheel carries the Triton kernels (the top-level csrc_triton package) beside muscle_fast."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("muscle_fast-*.whl")
    return whl


def test_wheel_contains_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc_triton").glob("*.py")}
    assert kernels and kernels <= names, f"missing from the wheel: {sorted(kernels - names)}"
    presets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "muscle_fast" / "presets").glob("*.json")}
    assert presets and presets <= names, f"missing from the wheel: {sorted(presets - names)}"
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "muscle_fast").rglob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert not any(n.startswith("tests/") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "muscle-fast" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_installed_wheel_imports_kernels(wheel, tmp_path):
    """The installed kernels import from the wheel, and the deprecated muscle_fast.kernels alias
    resolves to the very same module objects (one copy of each kernel and its autotune cache)."""
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import muscle_fast, csrc_triton._common as k\n"
        "print(muscle_fast.__file__); print(k.__file__)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import muscle_fast.kernels._common as old\n"
        "assert old is k, (old, k)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path / "site")) for line in lines), lines
