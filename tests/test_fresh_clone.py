"""A new user's first five minutes: clone the repository into an empty folder (no ``../shared``, no
hub), run README's first command exactly as written, and check the demo's promise on its output.

It installs torch and the package into a fresh venv and trains two models, so it runs only where asked
for: ``MUSCLE_FAST_FRESH_CLONE=1`` (``.ci/run`` sets it). The README command's install step reads the
package index pip is configured with; the demo itself runs with the Hugging Face hub switched off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = [
    pytest.mark.slow(minutes=8),
    pytest.mark.skipif(
        os.environ.get("MUSCLE_FAST_FRESH_CLONE") != "1",
        reason="installs into a fresh venv and runs the demo (~8 min): set MUSCLE_FAST_FRESH_CLONE=1",
    ),
]

#: What README promises of the demo (issue #17): ASR at least this many points under vanilla's ...
MIN_ASR_DROP = 0.40
#: ... at a clean accuracy of at least this.
MIN_CACC = 0.75
#: A hang guard, not a speed claim (README states the demo's time; speed lives in benchmarks):
#: install and demo together, on a slow or shared machine.
TIMEOUT_MINUTES = 45


def _first_command() -> str:
    """README's first bash command: the one that installs the package and runs the demo."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.M | re.S)
    assert block, "README.md has no bash block"
    command = block.group(1).strip()
    assert "muscle-fast demo" in command, f"README's first command does not run the demo: {command}"
    return command


def test_readme_first_command_on_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to clone from")
    clone = tmp_path / "main"
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    # a new user's shell: no venv, no interpreter or Triton switches, and torch's own thread count
    # (conftest caps OMP_NUM_THREADS per xdist worker; this run is the suite's longest, so it takes
    # the cores the other workers free as they finish). Until they do, its OpenMP threads share the
    # cores with them, so waiting threads sleep rather than spin: spinning slowed both it and its
    # neighbours on shared cores, and costs nothing alone (results unchanged).
    drop = ("VIRTUAL_ENV", "PYTHON", "TRITON", "OMP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),  # nothing cached from this machine's earlier runs
        MUSCLE_FAST_CACHE=str(tmp_path / "cache"),
        PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "venv" not in p),
    )
    done = subprocess.run(
        ["bash", "-c", f"set -e; {_first_command()}"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_MINUTES,
    )
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    out = clone / "runs" / "demo"
    records = json.loads((out / "results.json").read_text())
    by = {r["method"]: r for r in records if r["attack"] == "badnets"}
    assert set(by) == {"vanilla", "muscle"}, log
    assert (out / "results.png").stat().st_size > 10_000
    assert "MuScleLoRA" in done.stdout and "ASR points lower" in done.stdout, log
    assert by["muscle"]["asr"] <= by["vanilla"]["asr"] - MIN_ASR_DROP, by
    assert by["muscle"]["cacc"] >= MIN_CACC, by
    assert by["vanilla"]["config"]["data"]["source"].startswith("embedded"), by["vanilla"]["config"]["data"]
