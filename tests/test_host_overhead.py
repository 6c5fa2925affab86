"""Host work per MuScleLinear call (issue #15): what is done once per weight or optimizer step stays
so, and the caches that make it so change no bit of any output or gradient."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from muscle_fast import MuScleLinear
from muscle_fast.ops import dispatch
from muscle_fast.ops.lowrank import MuScleLinearFunction, get_ops

M, K, N = 5, 12, 10
ADAPTERS = {"lora": ((1.0,), 4), "mslr": ((1.0, 2.0, 4.0, 8.0), 2)}
BACKENDS = ["torch", "triton"]


class _Casts(TorchDispatchMode):
    """Counts fp32 -> ``dtype`` copies of tensors shaped like the adapters, and products shaped like
    the scale vector."""

    def __init__(self, m: MuScleLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.shapes = {tuple(m.lora_A.shape), tuple(m.lora_B.shape)}
        self.rank, self.dtype, self.count = m.rank, dtype, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            src = args[0]
            if src.dtype == torch.float32 and out.dtype == self.dtype and tuple(src.shape) in self.shapes:
                self.count["adapter_cast"] += 1
        elif func is torch.ops.aten.mul.Tensor and tuple(out.shape) == (self.rank,):
            self.count["scale_mul"] += 1
        return out


def _layer(
    backend: str, adapter: str, dtype: torch.dtype = torch.bfloat16, bias: bool = True
) -> MuScleLinear:
    scales, r = ADAPTERS[adapter]
    base = nn.Linear(K, N, bias=bias, dtype=dtype)
    return MuScleLinear(base, scales, r, alpha=2.0 * r, init_B="kaiming", backend=backend)


def _step(m: MuScleLinear, x: torch.Tensor, gy: torch.Tensor) -> None:
    m(x).backward(gy)


def test_adapter_casts_and_scale_once_per_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """N forwards + backwards, an optimizer step, N more: the adapters are cast and the scale vector
    built once before the step and once after it, not per call."""
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    m = _layer("torch", "mslr")
    opt = torch.optim.SGD([m.lora_A, m.lora_B], lr=0.1)
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(M, N, dtype=torch.bfloat16)
    spy = _Casts(m, torch.bfloat16)
    with spy:
        for _ in range(4):
            _step(m, x, gy)
        assert spy.count == Counter(adapter_cast=2, scale_mul=1)
        opt.step()
        for _ in range(4):
            _step(m, x, gy)
    assert spy.count == Counter(adapter_cast=4, scale_mul=1)  # the scales are not trained
    with spy:
        with torch.no_grad():
            m.lora_B.mul_(0.5)  # an in-place change outside an optimizer: seen by its version
        _step(m, x, gy)
    assert spy.count == Counter(adapter_cast=5, scale_mul=1)


def test_dispatch_decided_once_per_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend decision is made once per (backend, environment, device, dtype), not per call, and
    still follows a change of ``MUSCLE_FAST_BACKEND``."""
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_ANSWERS", {})
    calls: list[str] = []
    real = dispatch._use_kernels
    monkeypatch.setattr(dispatch, "_use_kernels", lambda chosen, *a: calls.append(chosen) or real(chosen, *a))
    m = _layer("auto", "lora")
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(M, N, dtype=torch.bfloat16)
    for _ in range(5):
        _step(m, x, gy)
    assert calls == ["auto"]
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "torch")
    for _ in range(3):
        _step(m, x, gy)
    assert calls == ["auto", "torch"]
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "bogus")
    for _ in range(2):  # an error is not remembered: it is raised every time
        with pytest.raises(ValueError, match="MUSCLE_FAST_BACKEND must be one of"):
            m(x)


def test_frozen_base_still_checked_every_call() -> None:
    """``requires_grad`` has no version to cache on, so the frozen-base check runs every call."""
    m = _layer("torch", "lora")
    x = torch.randn(M, K, dtype=torch.bfloat16)
    m(x)
    m.base.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must stay frozen"):
        m(x)
    m.base.bias.requires_grad_(False)
    m.base.weight = nn.Parameter(m.base.weight.detach().clone())  # a replaced parameter is seen too
    with pytest.raises(RuntimeError, match="must stay frozen"):
        m(x)


# --------------------------------------------------------------------------------------------------
# Bit identity with the uncached computation
# --------------------------------------------------------------------------------------------------


def _uncached(m: MuScleLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward as it was before the caches: casts and scale made inside the call."""
    dtype = x.dtype
    if dtype == torch.float64:
        kvec = torch.tensor(m.scales, dtype=torch.float64).repeat_interleave(m.r)
        scale = m.scaling * kvec
    else:
        scale = m.scaling * m.scale_vector
    ops = get_ops(m.backend, x.device, dtype)
    return MuScleLinearFunction.apply(x, m.lora_A, m.lora_B, scale, m.base, m.kind, ops, 0.0, 0, None, m)


def _run(m: MuScleLinear, x: torch.Tensor, gy: torch.Tensor, fwd: Callable) -> list[torch.Tensor]:
    xi = x.detach().clone().requires_grad_(True)
    m.lora_A.grad = m.lora_B.grad = None
    y = fwd(m, xi)
    y.backward(gy)
    y2 = fwd(m, xi)  # a second call in the same step (gradient accumulation): grads add up
    y2.backward(gy)
    return [y.detach(), y2.detach(), xi.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()]


def _assert_same(m: MuScleLinear, x: torch.Tensor, gy: torch.Tensor) -> None:
    got = _run(m, x, gy, lambda m, x: m(x))
    want = _run(m, x, gy, _uncached)
    assert got[3].dtype == m.lora_A.dtype and got[4].dtype == m.lora_B.dtype  # fp32 grads on fp32 params
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_cached_equals_uncached_across_updates(
    backend: str, adapter: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and gradients equal bit for bit with and without the caches: at first, after an
    optimizer step, after in-place changes of a parameter, after ``load_state_dict`` and after a
    ``.data`` write followed by ``drop_host_cache()``."""
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32/fp16/bf16")
    m = _layer(backend, adapter, dtype)
    opt = torch.optim.AdamW([m.lora_A, m.lora_B], lr=0.05)
    x = torch.randn(2, 3, K, dtype=dtype)  # a leading batch dim: the row reshape is covered too
    gy = torch.randn(2, 3, N, dtype=dtype)
    _assert_same(m, x, gy)
    opt.step()  # both adapters change (AdamW moves even a zero-init B)
    _assert_same(m, x, gy)
    with torch.no_grad():
        m.lora_A.add_(0.25)
    _assert_same(m, x, gy)
    state = {k: v.clone() * 0.5 for k, v in m.state_dict().items() if k.startswith("lora_")}
    m.load_state_dict(state, strict=False)
    _assert_same(m, x, gy)
    m.lora_B.data.mul_(-1.0)  # does not bump the version counter: the documented escape hatch
    m.drop_host_cache()
    _assert_same(m, x, gy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_and_dtype_switches_use_the_right_cast(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One layer called in fp32, then under bf16 autocast, then in fp32 again: each call gets the
    adapters in its own compute dtype, equal to the uncached computation."""
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    m = _layer(backend, "mslr", torch.float32)
    x = torch.randn(M, K)
    gy = torch.randn(M, N)
    _assert_same(m, x, gy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    with torch.autocast("cpu", enabled=False):
        want = _uncached(m, x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    _assert_same(m, x, gy)


def test_module_to_another_dtype_recasts() -> None:
    """``module.to(dtype)`` replaces the parameters' data (same objects, new storage): not stale."""
    m = _layer("torch", "lora", torch.bfloat16)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    gy = torch.randn(M, N, dtype=torch.bfloat16)
    _assert_same(m, x, gy)
    m.to(torch.float64)
    _assert_same(m, x.double(), gy.double())
    m.to(torch.float32)
    _assert_same(m, x.float(), gy.float())


def test_layer_made_under_inference_mode() -> None:
    """Parameters made under ``torch.inference_mode`` have no version counter: cast per call."""
    with torch.inference_mode():
        m = _layer("torch", "mslr")
        x = torch.randn(M, K, dtype=torch.bfloat16)
        y = m(x)
        m.lora_B.mul_(2.0)  # not versioned: a cache would miss this
        assert torch.equal(m(x), _uncached(m, x)) and not torch.equal(m(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_under_inference_mode_then_train(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cast made under ``torch.inference_mode`` is an inference tensor, which autograd will not
    save: a training call after an inference-mode evaluation must not reuse it."""
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    m = _layer(backend, "mslr")
    x = torch.randn(M, K, dtype=torch.bfloat16)
    gy = torch.randn(M, N, dtype=torch.bfloat16)
    with torch.inference_mode():
        m(x)
    _assert_same(m, x, gy)
    with torch.inference_mode():
        assert torch.equal(m(x), _uncached(m, x))
