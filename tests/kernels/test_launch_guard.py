"""Every Triton launch runs with its tensors' CUDA device current (models spread over GPUs)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from csrc_triton._common import launch_guard, resolve_device

KERNEL_DIR = Path(__file__).resolve().parents[2] / "csrc_triton"


def _launching_functions(path: Path) -> dict[str, list[str]]:
    """Module-level functions whose body launches a kernel (``name_kernel[grid](...)``) -> decorators."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        launches = any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
            and isinstance(n.func.value, ast.Name) and n.func.value.id.endswith("_kernel")
            for n in ast.walk(node)
        )  # fmt: skip
        if launches:
            found[node.name] = [ast.unparse(d) for d in node.decorator_list]
    return found


# modules that launch kernels (configs.py is data)
MODULES = sorted(
    p.stem for p in KERNEL_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "configs"
)


@pytest.mark.parametrize("module", MODULES)
def test_every_launcher_is_guarded(module):
    funcs = _launching_functions(KERNEL_DIR / f"{module}.py")
    assert funcs, f"csrc_triton/{module}.py: no kernel launch found (the scan is broken)"
    guarded = {name for name, decos in funcs.items() if any(d.startswith("launch_guard(") for d in decos)}
    unguarded = sorted(set(funcs) - guarded)
    assert not unguarded, f"csrc_triton/{module}.py launches kernels without @launch_guard in {unguarded}"


@pytest.fixture
def fake_cuda(monkeypatch):
    """Current device 0; records the devices the guard enters."""
    entered = []

    @contextlib.contextmanager
    def device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return entered


def test_guard_enters_the_argument_device(fake_cuda):
    @launch_guard("y")
    def launcher(x, y, *, flag=False):
        return x, y, flag

    t1 = SimpleNamespace(device=torch.device("cuda", 1))
    t0 = SimpleNamespace(device=torch.device("cuda", 0))
    assert launcher(0, t1, flag=True) == (0, t1, True)  # arguments and result pass through
    assert launcher(0, y=t1) == (0, t1, False)
    assert fake_cuda == [torch.device("cuda", 1)] * 2
    fake_cuda.clear()
    launcher(0, t0)  # already current: nothing entered
    launcher(0, torch.zeros(1))  # CPU (the interpreter): nothing entered
    launcher(0, SimpleNamespace(device=torch.device("cuda")))  # no index means the current device
    assert fake_cuda == []


def test_guard_takes_devices_and_strings(fake_cuda):
    @launch_guard("device")
    def make(n, device):
        return n

    make(3, "cuda:2")
    make(3, device=torch.device("cuda", 1))
    make(3, "cpu")
    assert fake_cuda == [torch.device("cuda", 2), torch.device("cuda", 1)]


def test_guard_names_a_missing_parameter():
    with pytest.raises(TypeError, match="launcher has no parameter 'z'"):

        @launch_guard("z")
        def launcher(x, y):
            return x


def test_resolve_device_pins_the_current_cuda_index(monkeypatch):
    """A plan built for bare "cuda" records the device current at build time, not "cuda" (which would
    compare unequal to every cuda:N tensor and follow whatever device is current at launch)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_build_plan_resolves_its_device(monkeypatch):
    from csrc_triton import align as kalign

    seen = []
    monkeypatch.setattr(kalign, "resolve_device", lambda d: seen.append(d) or torch.device("cpu"))
    plan = kalign.build_plan([(3, 2)], "cuda")
    assert seen == ["cuda"] and plan.device == torch.device("cpu")
