"""Compile the 4-bit kernels for sm_90 without a GPU (run by tests/test_nf4.py in a subprocess,
without TRITON_INTERPRET): type errors the interpreter lets through, and shared memory per config.

Prints ``OK <largest shared memory in bytes>``; any failure raises.
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csrc_triton import configs, nf4, nf4_matmul

H100_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90
SCALES = dict(code_ptr="*fp32", code2_ptr="*fp32", absmax2_ptr="*fp32", offset_ptr="*fp32", blocksize2="i32")


def jit(fn):
    while not isinstance(fn, triton.runtime.JITFunction):  # through autotune/heuristics wrappers
        fn = fn.fn
    return fn


def build(fn, types: dict, consts: dict, num_warps: int) -> int:
    """Compile like a launch would (pointers 16-byte aligned); return the shared memory used."""
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    pointers = [i for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    opts = dict(num_warps=num_warps, num_stages=1, enable_fp_fusion=False)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    assert "cubin" in k.asm
    return k.metadata.shared


def main() -> None:
    fn = jit(nf4._dequant_4bit_kernel)
    for nested in (False, True):
        absmax = "*u8" if nested else "*fp32"
        types = dict(a_ptr="*u8", absmax_ptr=absmax, out_ptr="*bf16", numel="i32", n_bytes="i32", **SCALES)
        for select in (False, True):
            for c in configs.CONFIGS["nf4.dequant"]["gpu"]:
                consts = dict(HALF_BS=32, NESTED=nested, BF16_RNE=False, SELECT=select, BYTES=c["BYTES"])
                consts["COLS"] = 32
                assert build(fn, types, consts, c["num_warps"]) <= H100_SHARED, (nested, select, c)

    fn = jit(nf4_matmul._matmul_4bit_kernel)
    worst = 0
    cases = (("bf16", True, 1), ("bf16", False, 16), ("fp32", False, 16), ("fp16", True, 16))
    for xt, nested, block_m in cases:
        types = dict(
            x_ptr="*" + xt, a_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", part_ptr="*fp32",
            M="i32", N="i32", K="i32", half_k="i32", stride_xm="i32", **SCALES,
        )  # fmt: skip
        for c in configs.CONFIGS["nf4.matmul"]["gpu"]:
            consts = dict(
                BS=64, NESTED=nested, SPLIT_K=4, UPCAST=False, IEEE=xt == "fp32", BLOCK_M=block_m,
                BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
            )  # fmt: skip
            shared = build(fn, types, consts, c["num_warps"])
            assert shared <= H100_SHARED, (xt, nested, block_m, c, shared)
            worst = max(worst, shared)
    print("OK", worst)


if __name__ == "__main__":
    main()
