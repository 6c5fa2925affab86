"""Launch configurations of every kernel, as data, in one format.

``CONFIGS[kernel][mode]`` is a list of dicts: the kernel's meta-parameters (upper case) plus
``num_warps`` and ``num_stages``. The mode in force is picked once, at import:

* ``"gpu"``: the autotune space on CUDA (or the ordered candidates of a heuristic, see below);
* ``"untuned"``: with ``MUSCLE_FAST_AUTOTUNE=0``, one conservative config valid for every shape
  (test runs over hundreds of odd shapes, where autotuning each would cost minutes);
* ``"interpret"``: under Triton's CPU interpreter, one config with small tiles, so that the small
  odd-sized test tensors still span several programs and partial blocks.

Kernels launched without the autotuner (alignment, Gaussian filter) read their single config, or
pick among candidates by lower-case selector keys (``min_rows``, ``tc``): the rule that uses them
is documented at the launcher. This module imports triton only inside :func:`triton_configs`.
"""

from __future__ import annotations

from typing import Any

from . import _common

Config = dict[str, int]


def _c(num_warps: int, num_stages: int, **meta: int) -> Config:
    return {**meta, "num_warps": num_warps, "num_stages": num_stages}


CONFIGS: dict[str, dict[str, list[Config]]] = {
    # -- low-rank layer (lowrank.py) --------------------------------------------------------------------
    # Sized with ptxas (tests/test_compile_sm90.py, figures in docs/kernels.md) to run without spills
    # at R = 16 and 64 with dropout, in every dtype. The rules that measure out: at most 32 elements of
    # an elementwise tile per thread (the Philox dropout mask is computed per element in registers); 16
    # warps cap a thread at 128 registers, which only shrink's 128 x 128 tile fits; and fp32
    # dots (FMA units) reduce 16 deep at a time whatever the tile (``lowrank._CHUNK``). At R = 16 the
    # warp-level MMA spilled shrink's 32 x 128 and dS/dB's 64 x 128 tiles at 4 warps: they run 8.
    "lowrank.shrink": {
        "gpu": [
            _c(8, 4, BLOCK_M=64, BLOCK_K=128),
            _c(16, 3, BLOCK_M=128, BLOCK_K=128),
            _c(8, 4, BLOCK_M=128, BLOCK_K=64),
            _c(8, 4, BLOCK_M=32, BLOCK_K=256),
            _c(8, 5, BLOCK_M=32, BLOCK_K=128),
            _c(4, 3, BLOCK_M=64, BLOCK_K=64),
        ],
        "untuned": [_c(4, 2, BLOCK_M=64, BLOCK_K=64)],
        "interpret": [_c(4, 1, BLOCK_M=32, BLOCK_K=32)],
    },
    "lowrank.expand": {
        "gpu": [
            _c(8, 2, BLOCK_M=64, BLOCK_N=128),
            _c(8, 2, BLOCK_M=128, BLOCK_N=64),
            _c(4, 2, BLOCK_M=64, BLOCK_N=64),
            _c(4, 2, BLOCK_M=32, BLOCK_N=128),
        ],
        "untuned": [_c(4, 2, BLOCK_M=64, BLOCK_N=64)],
        "interpret": [_c(4, 1, BLOCK_M=32, BLOCK_N=32)],
    },
    "lowrank.bwd_ds_db": {
        "gpu": [
            _c(4, 3, BLOCK_M=64, BLOCK_N=64),
            _c(8, 3, BLOCK_M=64, BLOCK_N=128),
            _c(8, 3, BLOCK_M=128, BLOCK_N=64),
            _c(8, 3, BLOCK_M=128, BLOCK_N=128),
        ],
        "untuned": [_c(4, 2, BLOCK_M=64, BLOCK_N=64)],
        "interpret": [_c(4, 1, BLOCK_M=32, BLOCK_N=32)],
    },
    "lowrank.grad_a": {
        "gpu": [
            _c(8, 4, BLOCK_M=64, BLOCK_K=64),
            _c(8, 4, BLOCK_M=64, BLOCK_K=128),
            _c(8, 4, BLOCK_M=128, BLOCK_K=64),
        ],
        "untuned": [_c(8, 2, BLOCK_M=64, BLOCK_K=64)],
        "interpret": [_c(4, 1, BLOCK_M=32, BLOCK_K=32)],
    },
    # -- the frozen GEMM with the low-rank term fused (lowrank_linear.py): the Hopper tiles of Triton's
    # matmul tutorial, one tile per program or persistent. Shared memory holds num_stages x (BLOCK_M +
    # BLOCK_N) x BLOCK_K operands, the U and V tiles and the output tile of the TMA store: at most 224 KiB
    # (128 x 128 x 128, 3 stages, R 64; tests/test_compile_sm90.py, figures in docs/kernels.md).
    "lowrank.linear": {
        "gpu": [
            _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, PERSISTENT=0),
            _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=0),
            _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=0),
            _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, PERSISTENT=0),
            _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=0),
            # one program per SM, the next tile's loads overlapping this tile's store (flattened loop)
            _c(8, 2, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, PERSISTENT=1),
            _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=1),
        ],
        "untuned": [_c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=0)],
        # three different block sizes (a descriptor given another's block shape fails the tests); the
        # persistent loop, 3 programs under the interpreter, each taking several tiles
        "interpret": [_c(4, 1, BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2, PERSISTENT=1)],
    },
    # -- NF4 / FP4 dequantization (nf4.py): WORDS = 32 * num_warps (one 4-byte word, 8 values, per
    # thread and tile: the layout that needs no shared memory), ITERS tiles per program. The small
    # programs keep the SMs busy on small weights (a 576 x 576 weight is 41 programs of 8192 values).
    "nf4.dequant": {
        "gpu": [
            _c(4, 1, WORDS=128, ITERS=1),
            _c(4, 1, WORDS=128, ITERS=4),
            _c(4, 1, WORDS=128, ITERS=8),
            _c(8, 1, WORDS=256, ITERS=4),
            _c(16, 1, WORDS=512, ITERS=2),
        ],
        "untuned": [_c(4, 1, WORDS=128, ITERS=4)],
        "interpret": [_c(4, 1, WORDS=128, ITERS=2)],
    },
    # -- fused 4-bit matmul (nf4_matmul.py): decode shapes are memory-bound, wide N tiles; sized to be
    # spill-free under the ptxas of Triton 3.6 (the GPU image's) as well as 3.9 (docs/kernels.md) ------
    "nf4.matmul": {
        "gpu": [
            _c(4, 1, BLOCK_N=64, BLOCK_K=128),
            _c(8, 1, BLOCK_N=64, BLOCK_K=256),
            _c(8, 1, BLOCK_N=128, BLOCK_K=128),
            _c(8, 1, BLOCK_N=32, BLOCK_K=256),
        ],
        "untuned": [_c(4, 1, BLOCK_N=64, BLOCK_K=128)],
        "interpret": [_c(4, 1, BLOCK_N=16, BLOCK_K=32)],
    },
    # -- gradient alignment (align.py): elements per vector step, steps per chunk, reduction width --------
    "align.fused": {
        "gpu": [_c(4, 1, BLOCK=1024, ITERS=8, RBLOCK=128)],
        "untuned": [_c(4, 1, BLOCK=1024, ITERS=8, RBLOCK=128)],
        "interpret": [_c(4, 1, BLOCK=1024, ITERS=8, RBLOCK=128)],
    },
    # -- Gaussian filter (gaussian_filter.py): the last candidate whose ``tc`` (16-bit tensor-core
    # input) matches and whose ``min_rows`` <= n wins; sized with ptxas to avoid spills -----------------
    "gaussian_filter": {
        mode: [
            {"tc": 0, "min_rows": 0, "BLOCK": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1},
            {"tc": 1, "min_rows": 0, "BLOCK": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1},
            {"tc": 0, "min_rows": 16384, "BLOCK": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 1},
            {"tc": 1, "min_rows": 16384, "BLOCK": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 1},
        ]
        for mode in ("gpu", "untuned", "interpret")
    },
}


def mode() -> str:
    """The config list in force: ``"interpret"``, ``"gpu"`` or ``"untuned"``."""
    if _common.INTERPRET:
        return "interpret"
    return "gpu" if _common.AUTOTUNE else "untuned"


def configs(kernel: str) -> list[Config]:
    """The configs in force for ``kernel`` (a KeyError names the known kernels)."""
    try:
        table = CONFIGS[kernel]
    except KeyError:
        raise KeyError(f"no launch configs for kernel {kernel!r}; known: {sorted(CONFIGS)}") from None
    return table[mode()]


def launch_config(kernel: str, **selectors: int) -> Config:
    """The one config of a kernel launched without the autotuner.

    With ``selectors``: the last candidate whose ``min_rows`` is at most ``rows`` and whose other
    lower-case keys equal the given values."""
    rows = selectors.pop("rows", None)
    chosen: Config | None = None
    for c in configs(kernel):
        if rows is not None and c.get("min_rows", 0) > rows:
            continue
        if all(c.get(k) == v for k, v in selectors.items()):
            chosen = c
    if chosen is None:
        raise KeyError(f"no {kernel} config matches {selectors} (rows={rows})")
    return chosen


def meta(config: Config) -> dict[str, Any]:
    """The kernel meta-parameters of a config (upper-case keys)."""
    return {k: v for k, v in config.items() if k.isupper()}


def triton_configs(kernel: str, pre_hook: Any = None) -> list[Any]:
    """``triton.Config`` objects for ``@triton.autotune``; ``pre_hook`` runs before each launch with the
    config's arguments (e.g. to give TMA descriptors the config's block shape)."""
    import triton

    return [
        triton.Config(meta(c), num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=pre_hook)
        for c in configs(kernel)
    ]
