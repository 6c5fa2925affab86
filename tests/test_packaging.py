"""The wheel carries the Triton kernels (csrc_triton/ installed as muscle_fast.kernels)."""

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
    names = zipfile.ZipFile(wheel).namelist()
    kernels = {Path(n).name for n in names if n.startswith("muscle_fast/kernels/")}
    expected = {p.name for p in (ROOT / "csrc_triton").glob("*.py")}
    assert expected and expected <= kernels, f"missing from the wheel: {sorted(expected - kernels)}"
    presets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "muscle_fast" / "presets").glob("*.json")}
    assert presets and presets <= set(names), f"missing from the wheel: {sorted(presets - set(names))}"
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "muscle_fast").rglob("*.py")}
    sources.discard("muscle_fast/kernels/__init__.py")  # the source-tree stand-in; csrc_triton's ships
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"
    shipped = zipfile.ZipFile(wheel).read("muscle_fast/kernels/__init__.py").decode()
    assert shipped == (ROOT / "csrc_triton" / "__init__.py").read_text()
    assert not any(n.startswith(("csrc_triton/", "tests/")) for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "muscle-fast" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_installed_wheel_imports_kernels(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import muscle_fast, muscle_fast.kernels._common as k; print(muscle_fast.__file__); print(k.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert all(line.startswith(str(tmp_path / "site")) for line in lines), lines
