"""Compile the 4-bit kernels for sm_90 without a GPU (run by tests/test_nf4.py in a subprocess,
without TRITON_INTERPRET): type errors the interpreter lets through, and shared memory per config.

A thin wrapper around ``tests/compile_sm90.py`` (which compiles every kernel; see
``tests/test_compile_sm90.py`` for the register and spill budgets): every config of the dequantizer
and of the fused matmul, on both matmul paths (GEMV and tl.dot).

Prints ``OK <largest shared memory in bytes>``; any failure raises.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_sm90  # noqa: E402


def main() -> None:
    rows = compile_sm90.run(kernels=["nf4."], ci=True)
    worst = max(r["shared"] for r in rows)
    for r in rows:
        assert r["shared"] <= compile_sm90.SHARED_LIMIT, r
    print("OK", worst)


if __name__ == "__main__":
    main()
