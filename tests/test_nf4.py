"""NF4/FP4 dequantization: Triton kernel vs pure-torch reference vs bitsandbytes, bit for bit.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py), so tensors stay small.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

import muscle_fast.ops.nf4 as mnf4
from muscle_fast.ops.nf4 import SUPPORTED_BLOCKSIZES, dequantize_4bit_ref, get_4bit_code

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NF4 = get_4bit_code("nf4")
#: The kernel path: on the CPU it runs under the interpreter (``auto`` would take the torch path there).
KERNEL = "triton"


def dequantize_4bit(*args, **kwargs) -> torch.Tensor:
    """``muscle_fast.dequantize_4bit`` through the Triton kernel."""
    return mnf4.dequantize_4bit(*args, backend=KERNEL, **kwargs)


def matmul_4bit(*args, **kwargs) -> torch.Tensor:
    """``muscle_fast.matmul_4bit`` through the Triton kernel."""
    return mnf4.matmul_4bit(*args, backend=KERNEL, **kwargs)


def _state(
    shape: tuple[int, ...],
    blocksize: int,
    quant_type: str = "nf4",
    nested: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, SimpleNamespace]:
    """A random packed tensor and a hand-built QuantState (no bitsandbytes needed)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    n_bytes, n_blocks = (numel + 1) // 2, -(-numel // blocksize)
    packed = torch.randint(0, 256, (n_bytes, 1), generator=g, dtype=torch.uint8)
    state2, offset = None, None
    if nested:
        absmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
        code2 = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        n2 = -(-n_blocks // 256)
        absmax2 = torch.rand(n2, generator=g) * 3 + 0.1
        state2 = SimpleNamespace(
            absmax=absmax2.to(device), code=code2.to(device), blocksize=256, dtype=torch.float32, state2=None
        )
        offset = (torch.rand((), generator=g) + 0.5).to(device)
    else:
        absmax = torch.rand(n_blocks, generator=g) * 4 + 1e-3
    qs = SimpleNamespace(
        absmax=absmax.to(device),
        shape=torch.Size(shape),
        code=get_4bit_code(quant_type, device),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
        offset=offset,
        state2=state2,
    )
    return packed.to(device), qs


# --------------------------------------------------------------------------- reference-only tests


@pytest.fixture(params=["gather", "select"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the kernel reads the code table (csrc_triton/nf4.py), as the default."""
    from csrc_triton import nf4 as knf4

    monkeypatch.setattr(knf4, "LOOKUP", request.param)
    return request.param


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_matches_reference(
    device: str, blocksize: int, nested: bool, quant_type: str, lookup: str
) -> None:
    # 67 x 131 = 8777 values: odd, a partial last block for every blocksize, several programs.
    packed, qs = _state((67, 131), blocksize, quant_type, nested, device=device, seed=blocksize)
    for dtype in DTYPES:
        got = dequantize_4bit(packed, qs, dtype=dtype)
        want = dequantize_4bit_ref(packed, qs, dtype=dtype)
        assert got.shape == (67, 131) and got.dtype == dtype and got.device.type == torch.device(device).type
        assert torch.equal(got, want), (blocksize, nested, quant_type, dtype)


@pytest.mark.parametrize("shape", [(1, 64), (3, 5), (7,), (2, 3, 33), (1,), (4, 1024)])
def test_shapes(device: str, shape: tuple[int, ...], lookup: str) -> None:
    for nested in (False, True):
        packed, qs = _state(shape, 64, nested=nested, dtype=torch.bfloat16, device=device)
        got = dequantize_4bit(packed, qs)
        assert got.shape == shape
        assert torch.equal(got, dequantize_4bit_ref(packed, qs))


def test_known_bytes_high_nibble_first(device: str, lookup: str) -> None:
    # 0x1F -> (code[1], code[15]); 0xF1 -> (code[15], code[1]); 0x70 -> (code[7], code[0]).
    packed = torch.tensor([[0x1F], [0xF1], [0x70]], dtype=torch.uint8, device=device)
    for absmax, name in ((1.0, "unit"), (2.5, "scaled")):
        qs = SimpleNamespace(
            absmax=torch.tensor([absmax], device=device),
            shape=torch.Size([1, 6]),
            code=None,  # falls back to the built-in NF4 table
            blocksize=64,
            quant_type="nf4",
            dtype=torch.float32,
            offset=None,
            state2=None,
        )
        c = NF4.tolist()
        want = torch.tensor([[c[1], c[15], c[15], c[1], c[7], c[0]]], device=device) * absmax
        for fn in (dequantize_4bit, dequantize_4bit_ref):
            assert torch.equal(fn(packed, qs), want), (fn.__name__, name)
    assert c[1] == pytest.approx(-0.6961928009986877) and c[15] == 1.0


def test_unaligned_packed_buffer(device: str, lookup: str) -> None:
    """A packed view at an odd byte offset cannot be read as 4-byte words: the kernel assembles
    each word from bytes there, with the same result."""
    for nested in (False, True):
        packed, qs = _state((9, 70), 64, nested=nested, dtype=torch.bfloat16, device=device, seed=5)
        shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)[1:]
        shifted.copy_(packed.view(-1))
        assert shifted.data_ptr() % 4 != 0
        assert torch.equal(dequantize_4bit(shifted, qs), dequantize_4bit_ref(packed, qs)), nested


def test_int64_offsets(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int64 indexing the kernel switches to near 2**31 values, forced on a small tensor."""
    from csrc_triton import nf4 as knf4

    monkeypatch.setattr(knf4, "_INT32_LIMIT", 0)
    for nested in (False, True):
        packed, qs = _state((5, 131), 64, nested=nested, dtype=torch.float16, device=device, seed=6)
        assert torch.equal(dequantize_4bit(packed, qs), dequantize_4bit_ref(packed, qs)), nested


def test_dequant_configs_put_one_word_on_each_thread() -> None:
    """The shared-memory-free layout (csrc_triton/nf4.py) needs WORDS == 32 * num_warps."""
    from csrc_triton import configs

    for mode, cfgs in configs.CONFIGS["nf4.dequant"].items():
        for c in cfgs:
            assert c["WORDS"] == 32 * c["num_warps"], (mode, c)


def test_bf16_rounds_to_nearest_even(device: str) -> None:
    # code[15] = 1.0, so value = absmax exactly; pick absmax on bf16 rounding ties and near-ties.
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3 * 2**-126, 1e38]
    n = len(ties)
    packed = torch.full((n * 32, 1), 0xFF, dtype=torch.uint8, device=device)
    qs = SimpleNamespace(
        absmax=torch.tensor(ties, dtype=torch.float32, device=device).abs(),
        shape=torch.Size([n, 64]),
        code=None,
        blocksize=64,
        quant_type="nf4",
        dtype=torch.bfloat16,
        offset=None,
        state2=None,
    )
    got = dequantize_4bit(packed, qs)
    want = qs.absmax.view(n, 1).expand(n, 64).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert got[0, 0].item() == 1.0 and got[1, 0].item() == 1 + 4 * 2**-8  # ties go to even


def test_out_buffer_reuse_and_dtype_override(device: str) -> None:
    out = torch.empty(67, 131, dtype=torch.bfloat16, device=device)
    for seed in (1, 2):
        packed, qs = _state((67, 131), 64, nested=seed == 2, dtype=torch.float16, device=device, seed=seed)
        res = dequantize_4bit(packed, qs, dtype=torch.bfloat16, out=out)
        assert res is out
        assert torch.equal(out, dequantize_4bit_ref(packed, qs, dtype=torch.bfloat16))
    ref_out = torch.empty_like(out)
    assert dequantize_4bit_ref(packed, qs, dtype=torch.bfloat16, out=ref_out) is ref_out
    assert torch.equal(ref_out, out)


def test_packed_storage_layouts(device: str) -> None:
    packed, qs = _state((8, 64), 64, device=device)
    want = dequantize_4bit_ref(packed, qs)
    assert torch.equal(dequantize_4bit(packed.view(-1), qs), want)  # flat
    assert torch.equal(dequantize_4bit(packed.view(-1).view(torch.bfloat16).view(-1, 1), qs), want)  # storage
    # bitsandbytes' back-compat shim: packed weight given transposed as [1, n/2] -> output transposed.
    assert torch.equal(dequantize_4bit(packed.view(1, -1), qs), want.t())


def test_unusual_nested_state_decoded_in_torch(device: str) -> None:
    # state2.dtype fp16: absmax is decoded (and rounded) in fp16 first, as bitsandbytes does.
    packed, qs = _state((5, 200), 32, nested=True, device=device)
    qs.state2.dtype = torch.float16
    got = dequantize_4bit(packed, qs)
    assert torch.equal(got, dequantize_4bit_ref(packed, qs))
    qs.state2.dtype = torch.float32
    assert not torch.equal(got, dequantize_4bit(packed, qs))


def test_empty(device: str) -> None:
    packed, qs = _state((0, 64), 64, device=device)
    assert dequantize_4bit(packed, qs).shape == (0, 64)


def test_cpu_without_interpreter_is_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from csrc_triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    packed, qs = _state((9, 33), 32, nested=True, dtype=torch.bfloat16)
    assert torch.equal(mnf4.dequantize_4bit(packed, qs), dequantize_4bit_ref(packed, qs))
    with pytest.raises(RuntimeError, match="dequantize_4bit: backend 'triton' needs CUDA"):
        dequantize_4bit(packed, qs)


def test_backend_selects_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """One dispatcher: auto takes the torch path off CUDA, torch always, MUSCLE_FAST_BACKEND overrides."""
    calls: list[str] = []
    real = mnf4.dequantize_4bit_ref
    monkeypatch.setattr(mnf4, "dequantize_4bit_ref", lambda *a, **k: calls.append("torch") or real(*a, **k))
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    packed, qs = _state((4, 64), 64)
    mnf4.dequantize_4bit(packed, qs)
    assert calls == ([] if torch.cuda.is_available() else ["torch"])
    mnf4.dequantize_4bit(packed, qs, backend="torch")
    assert calls[-1] == "torch"
    n = len(calls)
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "torch")
    mnf4.dequantize_4bit(packed, qs, backend="triton")
    assert len(calls) == n + 1
    monkeypatch.setenv("MUSCLE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MUSCLE_FAST_BACKEND must be one of"):
        mnf4.dequantize_4bit(packed, qs)


def test_errors(device: str) -> None:
    packed, qs = _state((4, 64), 64, device=device)
    for fn in (dequantize_4bit, dequantize_4bit_ref):
        with pytest.raises(ValueError, match="quant_state.quant_type"):
            fn(packed, SimpleNamespace(**{**vars(qs), "quant_type": "int4"}))
        with pytest.raises(ValueError, match="quant_state.blocksize"):
            fn(packed, SimpleNamespace(**{**vars(qs), "blocksize": 96}))
        with pytest.raises(ValueError, match="packed A has 127 bytes"):
            fn(packed[:-1], qs)
        with pytest.raises(ValueError, match=r"quant_state.absmax has 3 entries, expected 4"):
            fn(packed, SimpleNamespace(**{**vars(qs), "absmax": qs.absmax[:3]}))
        with pytest.raises(ValueError, match="out.shape"):
            fn(packed, qs, out=torch.empty(64, 4, device=device))
        with pytest.raises(ValueError, match="out.dtype"):
            fn(packed, qs, out=torch.empty(4, 64, dtype=torch.float16, device=device))
        with pytest.raises(ValueError, match="contiguous"):
            fn(packed, qs, out=torch.empty(64, 4, device=device).t())
        with pytest.raises(ValueError, match="quant_state.dtype"):
            fn(packed, SimpleNamespace(**{**vars(qs), "dtype": torch.int8}))
        with pytest.raises(TypeError, match="absmax"):
            fn(packed, qs, qs.absmax)  # bitsandbytes-style positional absmax
    _, nqs = _state((4, 64), 64, nested=True, device=device)
    with pytest.raises(ValueError, match="quant_state.offset"):
        dequantize_4bit(packed, SimpleNamespace(**{**vars(nqs), "offset": None}))


# --------------------------------------------------------------------------- against bitsandbytes


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _eager() -> contextlib.AbstractContextManager:
    # bitsandbytes' CPU fallback is torch.compile'd; recompiling per dtype/shape costs seconds.
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _bnb_shapes(device: str) -> list[tuple[int, int]]:
    # bitsandbytes 0.50's native CPU dequant indexes blocks per row, which disagrees with its own
    # (flat) quantizer when an even last dim is not a multiple of blocksize; odd last dims take its
    # flat torch fallback. Keep to shapes where bitsandbytes is self-consistent on the CPU.
    return [(67, 131), (1, 64), (2, 4096)]


def test_bnb_code_tables_and_nibble_order() -> None:
    F = _bnb()
    for qt in ("nf4", "fp4"):
        assert torch.equal(get_4bit_code(qt), F.get_4bit_type(qt, device="cpu"))
    # bitsandbytes' quantizer puts the first value in the high nibble.
    q, _ = F.quantize_4bit(torch.tensor([NF4[1].item(), 1.0]), blocksize=64, quant_type="nf4")
    assert q.view(-1).tolist() == [0x1F]


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
def test_matches_bitsandbytes(device: str, blocksize: int, nested: bool) -> None:
    F = _bnb()
    quant_types = ("nf4", "fp4") if blocksize == 64 else ("nf4",)
    for shape in _bnb_shapes(device):
        for qt in quant_types:
            x = torch.randn(shape, device=device) * 2
            q, qs = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=qt)
            assert qs.nested == nested
            for dtype in DTYPES:
                qs.dtype = dtype
                with _eager():
                    want = F.dequantize_4bit(q, qs).reshape(shape)  # bnb's CPU path returns (1, n) for 1-D
                got = dequantize_4bit(q, qs)
                assert torch.equal(dequantize_4bit_ref(q, qs), want), (shape, qt, dtype)
                assert torch.equal(got, want), (shape, qt, dtype)


def test_matches_bitsandbytes_out_and_transposed(device: str) -> None:
    F = _bnb()
    x = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    q, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    with _eager():
        # bitsandbytes' CPU backend has no dequantize_4bit.out kernel.
        want = F.dequantize_4bit(q, qs, out=torch.empty_like(x) if device == "cuda" else None)
        want_t = F.dequantize_4bit(q.view(1, -1), qs)
    out = torch.empty_like(x)
    assert dequantize_4bit(q, qs, out=out) is out and torch.equal(out, want)
    assert torch.equal(dequantize_4bit(q.view(1, -1), qs), want_t)
    assert (x.float() - out.float()).abs().max() < 0.5 * x.float().abs().max()  # it is a real round trip


def test_lookup_argument_checked(device: str) -> None:
    from csrc_triton.nf4 import dequantize_4bit_packed

    out = torch.empty(8, device=device)
    packed = torch.zeros(4, dtype=torch.uint8, device=device)
    absmax = torch.ones(1, device=device)
    with pytest.raises(ValueError, match="lookup must be one of"):
        dequantize_4bit_packed(packed, absmax, NF4.to(device), out, 64, lookup="table")


def test_launcher_rejects_strided_packed_and_absmax(device: str) -> None:
    """The kernel reads packed and absmax flat: a strided view is an error, not wrong values."""
    from csrc_triton.nf4 import dequantize_4bit_packed

    out = torch.empty(8, device=device)
    packed = torch.zeros(8, dtype=torch.uint8, device=device)[::2]
    absmax = torch.ones(4, device=device)[::2]
    with pytest.raises(ValueError, match=r"packed must be contiguous, got strides \(2,\)"):
        dequantize_4bit_packed(packed, torch.ones(1, device=device), NF4.to(device), out, 64)
    with pytest.raises(ValueError, match=r"absmax must be contiguous, got strides \(2,\)"):
        dequantize_4bit_packed(packed.contiguous(), absmax, NF4.to(device), out, 64)


def test_prepared_dequant_matches_and_tracks_identity(device: str, lookup: str) -> None:
    """The training path's checked-once dequantization: same bits, and a stale cache is detectable."""
    from muscle_fast.ops.nf4 import PreparedDequant4bit

    for nested in (False, True):
        packed, qs = _state((33, 128), 64, nested=nested, dtype=torch.bfloat16, device=device)
        want = dequantize_4bit_ref(packed, qs)
        out = torch.full_like(want, float("nan"))
        prep = PreparedDequant4bit(packed, qs, torch.bfloat16, out)
        assert torch.equal(out, want)  # construction fills the buffer once
        out.fill_(float("nan"))
        assert prep() is out and torch.equal(out, want)
        assert prep.matches(packed, qs, out)
        assert not prep.matches(packed, qs, torch.empty_like(out))  # another buffer
        assert not prep.matches(packed.clone(), qs, out)  # another weight storage
        other = SimpleNamespace(**vars(qs))
        assert not prep.matches(packed, other, out)  # another state object


def test_prepared_dequant_refuses_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnf4, "kernels_run_on", lambda device: False)
    packed, qs = _state((4, 64), 64)
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        mnf4.PreparedDequant4bit(packed, qs, torch.float32, torch.empty(4, 64))


# --------------------------------------------------------------------------- fused small-M matmul

#: Final rounding of the output per dtype (one unit in the last place, relative).
OUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _check_matmul(got: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, qs, bias=None) -> None:
    """Against float64 on the weights dequantize_4bit gives in x's dtype: the output's own rounding
    plus fp32 accumulation, bounded by K * 2^-24 * (|x| @ |W|^T), the sum of |terms|."""
    w = dequantize_4bit_ref(packed, qs, dtype=x.dtype).double()
    want = x.double() @ w.T
    if bias is not None:
        want = (want.to(x.dtype) + bias.to(x.dtype)).double()  # bias added after rounding
    bound = x.double().abs() @ w.abs().T
    k = x.shape[-1]
    tol = OUT_EPS[x.dtype] * want.abs() + 2 * k * 2.0**-24 * bound + 1e-30
    err = (got.double() - want).abs()
    assert got.dtype == x.dtype and got.shape == want.shape
    worst = (err / tol).max().item()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst err/tol {worst:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize(
    "m,n,k,blocksize,split_k",
    [
        (1, 37, 130, 64, 1),  # decode row; 130 % 64 != 0: quantization blocks straddle rows
        (1, 37, 130, 64, 3),  # K split in three (uneven), partial sums added
        (3, 1, 64, 32, 2),  # one output feature
        (17, 33, 96, 128, 1),  # two M tiles; block larger than a row
        (5, 16, 2, 32, 1),  # K = 2: one byte per row
    ],
    ids=lambda v: str(v),
)
def test_matmul_4bit_matches_float64(
    device: str, dtype: torch.dtype, nested: bool, m: int, n: int, k: int, blocksize: int, split_k: int
) -> None:
    packed, qs = _state((n, k), blocksize, nested=nested, device=device, seed=m * 1000 + n + k)
    x = torch.randn(m, k, device=device).to(dtype)
    _check_matmul(matmul_4bit(x, packed, qs, split_k=split_k), x, packed, qs)


def test_matmul_4bit_leading_dims_bias_and_strides(device: str) -> None:
    from muscle_fast.ops.nf4 import matmul_4bit_ref

    packed, qs = _state((24, 70), 64, nested=True, device=device)
    x = torch.randn(2, 3, 140, device=device, dtype=torch.float16)[..., ::2]  # non-unit column stride
    bias = torch.randn(24, device=device, dtype=torch.float16)
    got = matmul_4bit(x, packed, qs, bias)
    assert got.shape == (2, 3, 24)
    _check_matmul(got.reshape(6, 24), x.reshape(6, 70), packed, qs, bias)
    ref = matmul_4bit_ref(x, packed, qs, bias)  # the torch path computes the same thing
    _check_matmul(ref.reshape(6, 24), x.reshape(6, 70), packed, qs, bias)


def test_matmul_4bit_cpu_without_interpreter_is_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from csrc_triton import _common
    from muscle_fast.ops.nf4 import matmul_4bit_ref

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.delenv("MUSCLE_FAST_BACKEND", raising=False)
    packed, qs = _state((9, 34), 32, nested=True)
    x = torch.randn(2, 34)
    assert torch.equal(mnf4.matmul_4bit(x, packed, qs), matmul_4bit_ref(x, packed, qs))


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_matmul_4bit_paths_agree_on_odd_k_transposed_a_and_bias_dtype(
    device: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths of matmul_4bit take the same inputs and mean the same thing: odd K (the kernel
    cannot split a byte across rows: the torch path runs), A as bitsandbytes' [1, n/2] ``W.t()``
    (the back-compat transpose must not scramble the weight), an fp32 bias with a bf16 x."""
    backend = "torch" if path == "torch" else KERNEL
    if path == "kernel" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel path on the CPU needs the interpreter")
    packed, qs = _state((6, 65), 64, nested=True, device=device, seed=5)  # odd K: 390 values
    x = torch.randn(3, 65, device=device)
    _check_matmul(mnf4.matmul_4bit(x, packed, qs, backend=backend), x, packed, qs)
    packed, qs = _state((8, 64), 64, device=device, seed=6)
    x = torch.randn(2, 64, device=device)
    assert packed.shape == (256, 1)
    _check_matmul(mnf4.matmul_4bit(x, packed.t(), qs, backend=backend), x, packed, qs)
    xb, bias = x.bfloat16(), torch.randn(8, device=device)
    _check_matmul(mnf4.matmul_4bit(xb, packed, qs, bias, backend=backend), xb, packed, qs, bias)


def test_prepared_dequant_tracks_state_fields_replaced_in_place(device: str) -> None:
    """A QuantState whose fields were reassigned (another quantization's absmax, state2, offset,
    code) is not the state the prepared launch was built from: ``matches`` must say so."""
    from muscle_fast.ops.nf4 import PreparedDequant4bit

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("PreparedDequant4bit needs the kernels")
    packed, qs = _state((16, 64), 64, nested=True, device=device, seed=1)
    _, other = _state((16, 64), 64, nested=True, device=device, seed=2)
    out = torch.empty(16, 64, device=device)
    prep = PreparedDequant4bit(packed, qs, torch.float32, out)
    for field in ("absmax", "state2", "offset", "code", "blocksize"):
        saved = getattr(qs, field)
        replacement = {"blocksize": 32, "code": qs.code.clone()}.get(field, getattr(other, field, None))
        setattr(qs, field, replacement)
        assert not prep.matches(packed, qs, out), field
        setattr(qs, field, saved)
        assert prep.matches(packed, qs, out), field
    qs.state2.absmax = other.state2.absmax  # the nested absmax swapped inside state2
    assert not prep.matches(packed, qs, out)


def test_matmul_4bit_errors(device: str) -> None:
    packed, qs = _state((8, 64), 64, device=device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"x.shape \(2, 63\) does not end in in_features 64"):
        matmul_4bit(x[:, :63], packed, qs)
    with pytest.raises(ValueError, match=r"bias.shape \(7,\) != \(8,\)"):
        matmul_4bit(x, packed, qs, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="x must be an fp16, bf16 or fp32 tensor"):
        matmul_4bit(x.double(), packed, qs)
    p1, q1 = _state((512,), 64, device=device)
    with pytest.raises(ValueError, match="2-D weight shape"):
        matmul_4bit(x, p1, q1)
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="split_k must be >= 1"):
            matmul_4bit(x, packed, qs, split_k=0)


def test_matmul_4bit_launcher_errors(device: str) -> None:
    """The low-level launcher names the argument at fault (muscle_fast.nf4 checks QuantStates first)."""
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the launcher needs CUDA or the interpreter")
    from csrc_triton.nf4_matmul import matmul_4bit_packed

    code = get_4bit_code("nf4", device)
    packed = torch.zeros(8 * 32, dtype=torch.uint8, device=device)
    absmax = torch.ones(8, device=device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="x must be 2-D with unit column stride"):
        matmul_4bit_packed(x[None], packed, absmax, code, 8, 64)
    with pytest.raises(ValueError, match="x dtype must be fp16, bf16 or fp32"):
        matmul_4bit_packed(x.double(), packed, absmax, code, 8, 64)
    with pytest.raises(ValueError, match=r"packed must be uint8 with 256 bytes for \[8, 64\]"):
        matmul_4bit_packed(x, packed[:-1], absmax, code, 8, 64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        matmul_4bit_packed(x, packed, absmax, code, 8, 48)
    with pytest.raises(ValueError, match="absmax must be torch.float32 with >= 8 entries"):
        matmul_4bit_packed(x, packed, absmax[:7], code, 8, 64)
    with pytest.raises(ValueError, match="double quantization needs absmax2 and offset"):
        code2 = torch.zeros(256, device=device)
        matmul_4bit_packed(x, packed, absmax.to(torch.uint8), code, 8, 64, code2=code2)
