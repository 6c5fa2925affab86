"""README.md is what a user reads first: its Python blocks run as written, it stays short, its test
command is the one CI runs, its links resolve, and the layout table of docs/design.md matches the tree.

The Python blocks run in one subprocess (one import of torch/transformers for all of them), each in a
fresh namespace, from an empty working directory, so a block that relies on a name it does not
define or import fails here as it would for a reader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
DESIGN = ROOT / "docs" / "design.md"

MAX_README_BYTES = 10_000


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced ```lang block of README.md."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


PY_BLOCKS = _blocks("python")

# Runs every snippet in a fresh namespace; reports, per snippet, None or the traceback, as JSON.
_RUNNER = r"""
import json, sys, traceback
snippets = json.loads(sys.stdin.read())
results = []
for i, code in enumerate(snippets):
    ns = {"__name__": "__main__"}
    try:
        exec(compile(code, f"<README python block {i + 1}>", "exec"), ns)
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
    finally:
        ns.clear()
print("@@README-RESULTS@@" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def snippet_results(tmp_path_factory) -> list[str | None]:
    env = dict(os.environ)
    # the checkout first, as for the other tests (an installed copy may be older than the tree)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps([code for _, code in PY_BLOCKS]),
        capture_output=True,
        text=True,
        cwd=tmp_path_factory.mktemp("readme"),
        env=env,
        timeout=600,
    )
    marker = "@@README-RESULTS@@"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"the README snippet runner exited with {proc.returncode}\n"
            f"stdout (tail):\n{proc.stdout[-3000:]}\nstderr (tail):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(marker) :])


def test_readme_has_five_python_snippets() -> None:
    assert len(PY_BLOCKS) == 5, f"README.md has {len(PY_BLOCKS)} python blocks, expected 5"


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_snippet_runs(index: int, snippet_results: list[str | None]) -> None:
    error = snippet_results[index]
    if error is not None:
        line = PY_BLOCKS[index][0]
        pytest.fail(f"README.md python block {index + 1} (line {line}) failed:\n{error}", pytrace=False)


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < MAX_README_BYTES, f"README.md is {size} bytes; keep it under {MAX_README_BYTES}"


def _ci_test_command() -> str:
    lines = [ln.strip() for ln in CI_RUN.read_text(encoding="utf-8").splitlines()]
    cmds = [ln for ln in lines if ln.startswith("python -m pytest")]
    assert len(cmds) == 1, f".ci/run should run pytest exactly once, found {cmds}"
    return cmds[0]


def test_readme_test_command_is_ci_command() -> None:
    ci_cmd = _ci_test_command()
    bash_lines = [ln for _, code in _blocks("bash") for ln in code.splitlines()]
    test_lines = [ln for ln in bash_lines if "pytest" in ln]
    assert len(test_lines) == 1, f"README.md should show one test command, found {test_lines}"
    steps = [s.strip() for s in test_lines[0].split("&&")]
    assert steps[-1] == ci_cmd, f"README runs {steps[-1]!r}, .ci/run runs {ci_cmd!r}"
    # the same install as CI: the pinned torch wheel, then the project with its test extras
    pin = re.search(r"torch==\S+", CI_RUN.read_text(encoding="utf-8"))
    assert pin is not None and f"pip install {pin.group(0)}" in steps
    assert 'pip install ".[test]"' in steps


def test_readme_leads_with_the_demo_then_the_main_job() -> None:
    """The first command installs and runs the demo (tests/test_fresh_clone.py runs it on a fresh
    clone); the main job follows, with no data path a fresh clone lacks."""
    blocks = [code.strip() for _, code in _blocks("bash")]
    first = blocks[0]
    assert 'pip install ".[demo]"' in first and first.endswith("muscle-fast demo --out runs/demo"), first
    jobs = [ln for code in blocks for ln in code.splitlines() if "muscle-fast defend" in ln]
    assert len(jobs) == 1 and "--data-dir" not in jobs[0] and "../shared" not in jobs[0], jobs


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert targets, "README.md links nowhere"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing paths: {missing}"


def test_no_reference_to_the_shared_spec() -> None:
    hits = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        if "shared/" + "SPEC" in path.read_text(encoding="utf-8"):
            hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"these files point at a SPEC outside the repository: {hits}"


def _layout_rows() -> list[str]:
    """The paths in the first column of the layout table of docs/design.md."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1]
    paths = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= {"-", " "} or cells[0] == "path":
            continue
        paths += re.findall(r"`([^`]+)`", cells[0])
    return paths


def test_layout_table_paths_exist() -> None:
    rows = _layout_rows()
    assert rows, "docs/design.md has no layout table"
    missing = []
    for p in rows:
        if "*" in p:
            if not list(ROOT.glob(p)):
                missing.append(p)
        elif not (ROOT / p).exists():
            missing.append(p)
    assert not missing, f"docs/design.md's layout table names paths that do not exist: {missing}"


def test_layout_table_covers_the_packages() -> None:
    rows = _layout_rows()
    listed = {p.rstrip("/") for p in rows}
    dirs = [p.rstrip("/") for p in rows if p.endswith("/")]
    unlisted = []
    for pkg in ("csrc_triton", "muscle_fast"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or (f.name == "__init__.py" and f.parent.name != pkg):
                continue
            if rel in listed or any(rel.startswith(d + "/") for d in dirs if d != pkg):
                continue
            unlisted.append(rel)
    assert not unlisted, f"files missing from docs/design.md's layout table: {unlisted}"
