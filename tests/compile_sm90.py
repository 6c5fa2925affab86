"""Compile every Triton kernel, for every ``gpu`` and ``untuned`` config, offline for sm_90.

No GPU is needed: ``triton.compile`` runs the whole pipeline down to ptxas for ``GPUTarget("cuda", 90,
32)``, and ptxas's ``-v`` report gives registers and local-memory spills per kernel; the compiled
metadata gives the shared memory. Run without ``TRITON_INTERPRET`` (``tests/test_compile_sm90.py`` runs
this in a subprocess and asserts the budgets).

Each case is compiled as a launch would specialise it: pointers 16-byte aligned, the constexprs the
launcher passes (dtype flags, ``BLOCK_R``, dropout, splits), unit strides as the constant 1 and the
other integer arguments divisible by 16 (Triton's specialisation for the usual LLM shapes).

    python tests/compile_sm90.py [--full] [--jobs N] [--kernels lowrank.expand,nf4.matmul] [--json F]

By default every config is compiled for every launcher dtype at the register-heaviest settings of the
other constexprs (R = 16 and 64, dropout on, split reductions); ``--full`` sweeps them all (R in 1, 16,
64; dropout on and off; split and unsplit; a few blocksizes), which takes several minutes.
Prints one table row per compiled variant, then ``JSON <list of rows>``; a failed compile raises.
``--ci`` is the subset ``tests/test_compile_sm90.py`` runs: every config once or more, at the variants
that measured heaviest. ``COMPILE_SM90_LOG=1`` echoes each ptxas report to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
DTYPES = ("bf16", "fp16", "fp32")  # the layer casts x, A, B, y and dY to one dtype (ops/lowrank.py)
SPLIT_MODE = {"fp32": 0, "bf16": 1, "fp16": 2}  # lowrank._split_mode
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # attribute names in torch

# A case is plain data (picklable for the process pool): the kernel's module attribute, its argument
# types (a leading "*" marks a pointer; "1" passes the integer constant 1), the constexprs, the
# config, and ``div`` (integer arguments specialised as divisible by 16).
Case = dict


def _configs(kernel: str) -> list[dict]:
    from csrc_triton import configs

    seen: list[dict] = []
    for mode in ("gpu", "untuned"):
        for c in configs.CONFIGS[kernel][mode]:
            if c not in seen:
                seen.append(c)
    return seen


def _case(kernel, fn, label, types, consts, config, fusion=True, **extra) -> Case:
    from csrc_triton import configs

    meta = configs.meta(config)
    return dict(
        kernel=kernel, fn=fn, label=label, types=types, consts={**consts, **meta},
        num_warps=config["num_warps"], num_stages=config["num_stages"], fusion=fusion,
        config=" ".join([*(f"{k}={v}" for k, v in meta.items()), f"w{config['num_warps']}",
                         f"s{config['num_stages']}"]),
        **extra,
    )  # fmt: skip


def lowrank_cases(full: bool) -> list[Case]:
    import torch

    from csrc_triton import lowrank

    chunk = {"CHUNK": lowrank._CHUNK}
    cases: list[Case] = []
    # R 16 as well as 64: at BLOCK_R 16 the dots with R on the MMA's M side lower to the warp-level MMA,
    # whose register profile differs, so R 64 is not the heaviest case everywhere.
    ranks = (1, 16, 64) if full else (16, 64)
    drops = (False, True) if full else (True,)
    splits = (1, 4) if full else (4,)

    def rank(r: int) -> tuple[dict, dict]:
        # R == 1 is specialised to the constant 1; BLOCK_R = max(16, next_pow2(R)) (lowrank._block_r).
        return ({"R": "1"} if r == 1 else {"R": "i32"}), {"BLOCK_R": max(16, 1 << (r - 1).bit_length())}

    for dt, r in itertools.product(DTYPES, ranks):
        rt, rc = rank(r)
        f32 = dt == "fp32"
        for c in _configs("lowrank.shrink"):
            for drop, split in itertools.product(drops, splits):
                types = dict(
                    x_ptr="*" + dt,
                    a_ptr="*" + dt,
                    scale_ptr="*fp32",
                    s_ptr="*fp32",
                    M="i32",
                    K="i32",
                    M_BUCKET="i32",
                    stride_xm="i32",
                    stride_xk="1",
                    stride_ar="i32",
                    stride_ak="1",
                    stride_sm="i32",
                    stride_sr="1",
                    seed="i64",
                    p_drop="fp32",
                    inv_keep="fp32",
                    **rt,
                )
                consts = dict(rc, **chunk, SPLIT_K=split, DROPOUT=drop, F32_DOT=f32)
                cases.append(
                    _case(
                        "lowrank.shrink",
                        "lowrank:_shrink_kernel",
                        f"{dt} R{r} drop{int(drop)} split{split}",
                        types,
                        consts,
                        c,
                        dtype=dt,
                        R=r,
                    )
                )
        for c in _configs("lowrank.expand"):
            # expand_: bt = B.t() (stride_br = 1); dx_: bt = A (stride_bn = 1), with dropout.
            variants = [("expand", False)] + ([("dx", d) for d in drops] if full else [("dx", True)])
            for use, drop in variants:
                sb = (
                    dict(stride_br="1", stride_bn="i32")
                    if use == "expand"
                    else dict(stride_br="i32", stride_bn="1")
                )
                types = dict(
                    y_ptr="*" + dt,
                    s_ptr="*fp32",
                    b_ptr="*" + dt,
                    M="i32",
                    N="i32",
                    M_BUCKET="i32",
                    stride_ym="i32",
                    stride_yn="1",
                    stride_sm="i32",
                    stride_sr="1",
                    seed="i64",
                    p_drop="fp32",
                    inv_keep="fp32",
                    **sb,
                    **rt,
                )
                consts = dict(rc, **chunk, DROPOUT=drop, MODE=SPLIT_MODE[dt], UPCAST=False)
                cases.append(
                    _case(
                        "lowrank.expand",
                        "lowrank:_expand_kernel",
                        f"{dt} R{r} {use} drop{int(drop)}",
                        types,
                        consts,
                        c,
                        dtype=dt,
                        R=r,
                    )
                )
        # "s16": S / dS already rounded to the storage dtype (backend "auto"), one tensor-core dot. dB's
        # takes it up to BLOCK_R 32 (lowrank._S16_MAX_BLOCK_R), so R 64 stands in with R 32.
        rounded = (False, True) if dt != "fp32" else (False,)
        bwd = [(r, False)]
        if dt != "fp32":
            bwd.append((32 if r == 64 else r, True))
        for c in _configs("lowrank.bwd_ds_db"):
            for split, (r_b, s16) in itertools.product(splits, bwd):
                rt_b, rc_b = rank(r_b)
                types = dict(
                    dy_ptr="*" + dt,
                    b_ptr="*" + dt,
                    s_ptr="*" + (dt if s16 else "fp32"),
                    scale_ptr="*fp32",
                    ds_ptr="*fp32",
                    db_ptr="*fp32",
                    M="i32",
                    N="i32",
                    m1="i32",
                    M_BUCKET="i32",
                    stride_dym="i32",
                    stride_dyn="1",
                    stride_bn="i32",
                    stride_br="1",
                    stride_sm="i32",
                    stride_sr="1",
                    stride_dsm="i32",
                    stride_dsr="1",
                    stride_dbg="i32",
                    stride_dbn="i32",
                    stride_dbr="1",
                    **rt_b,
                )
                consts = dict(
                    rc_b, **chunk, SPLIT_N=split, F32_DOT=f32, MODE=SPLIT_MODE[dt], UPCAST=False, S16=s16
                )
                cases.append(
                    _case(
                        "lowrank.bwd_ds_db",
                        "lowrank:_bwd_ds_db_kernel",
                        f"{dt} R{r_b} split{split}" + " s16" * s16,
                        types,
                        consts,
                        c,
                        dtype=dt,
                        R=r_b,
                    )
                )
        for c in _configs("lowrank.grad_a"):
            for drop, split, s16 in itertools.product(drops, splits, rounded):
                types = dict(
                    ds_ptr="*" + (dt if s16 else "fp32"),
                    x_ptr="*" + dt,
                    da_ptr="*fp32",
                    M="i32",
                    K="i32",
                    m1="i32",
                    M_BUCKET="i32",
                    G="i32",
                    stride_dsm="i32",
                    stride_dsr="1",
                    stride_xm="i32",
                    stride_xk="1",
                    stride_dag="i32",
                    stride_dar="i32",
                    stride_dak="1",
                    seed="i64",
                    p_drop="fp32",
                    inv_keep="fp32",
                    **rt,
                )
                consts = dict(
                    rc,
                    **chunk,
                    SPLIT_M=split,
                    DROPOUT=drop,
                    MODE=SPLIT_MODE[dt],
                    UPCAST=False,
                    DS16=s16,
                    TRANS=lowrank._grad_a_transposed(getattr(torch, TORCH_DTYPE[dt]), rc["BLOCK_R"]),
                )
                cases.append(
                    _case(
                        "lowrank.grad_a",
                        "lowrank:_grad_a_kernel",
                        f"{dt} R{r} drop{int(drop)} split{split}" + " s16" * s16,
                        types,
                        consts,
                        c,
                        dtype=dt,
                        R=r,
                    )
                )
    return cases


SCALES = dict(code_ptr="*fp32", code2_ptr="*fp32", absmax2_ptr="*fp32", offset_ptr="*fp32", blocksize2="i32")


def nf4_cases(full: bool) -> list[Case]:
    cases: list[Case] = []
    blocksizes = (64, 256, 4096) if full else (64,)
    # as launched for an aligned buffer under 2**31 values; int64 indices; byte loads (unaligned buffer)
    variants = [("", {}), (" wide", {"WIDE": True}), (" bytes", {"WORD_LOADS": False})]
    for (dt, bs, nested, select), (tag, over) in itertools.product(
        itertools.product(DTYPES, blocksizes, (False, True), (False, True)), variants
    ):
        for c in _configs("nf4.dequant"):
            types = dict(
                a_ptr="*u8",
                absmax_ptr="*u8" if nested else "*fp32",
                out_ptr="*" + dt,
                numel="i32",
                n_bytes="i32",
                **SCALES,
            )
            consts = dict(
                BS=bs,
                NESTED=nested,
                BF16_RNE=False,
                SELECT=select,
                WORD_LOADS=True,
                VEC=16 // (4 if dt == "fp32" else 2),
                WIDE=False,
            )  # what launch_dequant_4bit passes for an aligned buffer under 2**31 values
            consts.update(over)
            cases.append(
                _case(
                    "nf4.dequant",
                    "nf4:_dequant_4bit_kernel",
                    f"{dt} bs{bs} nested{int(nested)} {'select' if select else 'gather'}{tag}",
                    types,
                    consts,
                    c,
                    fusion=False,
                    dtype=dt,
                    R=0,
                )
            )
    splits = (1, 4) if full else (4,)
    for dt, nested, block_m, split in itertools.product(DTYPES, (False, True), (1, 16), splits):
        for c in _configs("nf4.matmul"):
            types = dict(
                x_ptr="*" + dt,
                a_ptr="*u8",
                absmax_ptr="*u8" if nested else "*fp32",
                part_ptr="*fp32",
                M="i32",
                N="i32",
                K="i32",
                half_k="i32",
                stride_xm="i32",
                **SCALES,
            )
            consts = dict(
                BS=64, NESTED=nested, SPLIT_K=split, UPCAST=False, IEEE=dt == "fp32", BLOCK_M=block_m
            )
            cases.append(
                _case(
                    "nf4.matmul",
                    "nf4_matmul:_matmul_4bit_kernel",
                    f"{dt} M{block_m} nested{int(nested)} split{split}",
                    types,
                    consts,
                    c,
                    fusion=False,
                    dtype=dt,
                    R=0,
                )
            )
    return cases


def align_cases(full: bool) -> list[Case]:
    cases: list[Case] = []
    codes = (0, 1, 2, -1)  # fp32, bf16, fp16 for every tensor, or mixed (read per tensor)
    for c in _configs("align.fused"):
        for g, loss_ptr in itertools.product(codes, (True, False) if full else (True,)):
            ccodes = codes if full else (g,)
            for cc in ccodes:
                name = {0: "fp32", 1: "bf16", 2: "fp16", -1: "mixed"}
                types = dict(
                    chunk_tid_ptr="*i32",
                    chunk_start_ptr="*i32",
                    t_cfirst_ptr="*i32",
                    t_nch_ptr="*i32",
                    t_numel_ptr="*i32",
                    dyn_ptr="*i64",
                    partial_ptr="*fp32",
                    tstat_ptr="*fp64",
                    coef_ptr="*fp32",
                    count_ptr="*i32",
                    out_ptr="*fp64",
                    ref_loss_ptr="*fp32" if loss_ptr else "*fp64",
                    ref_loss_val="fp32",
                    T="i32",
                    min_ref_grad_norm="fp32",
                    min_ref_loss="fp32",
                    rho="fp32",
                    mixed_ok="i32",
                    keep_cos="fp32",
                )
                consts = dict(G_CODE=g, C_CODE=cc, LOSS_FROM_PTR=loss_ptr, ALIGNED=True)
                meta = {k: v for k, v in c.items() if k != "RBLOCK"}
                label = f"g {name[g]} c {name[cc]}"
                cases.append(
                    _case(
                        "align.stats",
                        "align:_align_stats_kernel",
                        label + f" loss_ptr{int(loss_ptr)}",
                        types,
                        consts,
                        c,
                        dtype=name[g],
                        R=0,
                    )
                )
                if loss_ptr:
                    types2 = {
                        k: types[k]
                        for k in (
                            "chunk_tid_ptr",
                            "chunk_start_ptr",
                            "t_numel_ptr",
                            "dyn_ptr",
                            "coef_ptr",
                            "T",
                        )
                    }
                    cases.append(
                        _case(
                            "align.apply",
                            "align:_align_apply_kernel",
                            label,
                            types2,
                            dict(G_CODE=g, C_CODE=cc, ALIGNED=True),
                            meta,
                            dtype=name[g],
                            R=0,
                        )
                    )
    return cases


def gaussian_cases(full: bool) -> list[Case]:
    cases: list[Case] = []
    shapes = (
        ((8, 8, 8), (3, 4, 4), (1, 1, 1)) if full else ((8, 8, 8), (3, 4, 4))
    )  # (ND, C, CP): NDP * CP <= 64
    for c in _configs("gaussian_filter"):
        dts = ("bf16", "fp16") if c["tc"] else ("fp32",)
        meta = {k: v for k, v in c.items() if k not in ("tc", "min_rows")}
        for dt in dts:
            flags = dict(CENTER=not c["tc"], TC=bool(c["tc"]), UPCAST=False)
            types = dict(x_ptr="*" + dt, mu_ptr="*fp32", sq_ptr="*fp32", n="i32", d="i32", stride_x="i32")
            cases.append(
                _case(
                    "gaussian.sqnorm",
                    "gaussian_filter:_sqnorm_kernel",
                    f"{dt} rows>={c['min_rows']}",
                    types,
                    flags,
                    meta,
                    dtype=dt,
                    R=0,
                )
            )
            for nd, cols, cp in shapes:
                types = dict(
                    types,
                    ids_ptr="*i64",
                    f_ptr="*fp32",
                    s_ptr="*fp32",
                    out_ptr="*fp32",
                    stride_f="i32",
                    stride_ok="i32",
                    stride_oi="i32",
                )
                consts = dict(flags, ND=nd, NDP=1 << (nd - 1).bit_length(), C=cols, CP=cp)
                cases.append(
                    _case(
                        "gaussian.filter",
                        "gaussian_filter:_gauss_filter_kernel",
                        f"{dt} rows>={c['min_rows']} ND{nd} C{cols}",
                        types,
                        consts,
                        meta,
                        dtype=dt,
                        R=0,
                    )
                )
    return cases


def linear_cases(full: bool) -> list[Case]:
    """The fused frozen GEMM: P, Q and the output as TMA descriptors whose block shapes follow the config
    (``lowrank_linear._set_blocks``); Q as the Linear weight (N, K) rows (forward) or as given (dX)."""
    import triton.language as tl

    cases: list[Case] = []
    dts = DTYPES if full else ("bf16", "fp16")  # fp32 (IEEE dots) is not what "auto" runs on the GPU
    for dt, r, trans, c in itertools.product(dts, (16, 64), (True, False), _configs("lowrank.linear")):
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        q = [bn, bk] if trans else [bk, bn]
        types = dict(
            p_desc=f"tensordesc<{dt}[{bm}, {bk}]>",
            q_desc=f"tensordesc<{dt}[{q[0]}, {q[1]}]>",
            out_desc=f"tensordesc<{dt}[{bm}, {bn}]>",
            u_ptr="*" + dt, v_ptr="*" + dt, bias_ptr="*" + dt,
            M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32",
            stride_um="i32", stride_ur="1", stride_bias="1",
            **(dict(stride_vr="1", stride_vn="i32") if trans else dict(stride_vr="i32", stride_vn="1")),
        )  # fmt: skip
        out = getattr(tl, TORCH_DTYPE[dt])
        consts = dict(BLOCK_R=r, TRANS_Q=trans, HAS_BIAS=trans, F32_DOT=dt == "fp32", OUT_DTYPE=out)
        cases.append(
            _case(
                "lowrank.linear",
                "lowrank_linear:_linear_lowrank_kernel",
                f"{dt} R{r} {'fwd' if trans else 'dx'}",
                types,
                consts,
                c,
                dtype=dt,
                R=r,
            )
        )
    return cases


ALL = {
    "lowrank": lowrank_cases,
    "linear": linear_cases,
    "nf4": nf4_cases,
    "align": align_cases,
    "gaussian": gaussian_cases,
}

_PTXAS = re.compile(
    r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
    r".*?Used (\d+) registers",
    re.S,
)


_BAR = re.compile(r"^\s*(?:@%p\d+\s+)?bar\.sync\b", re.M)
_SHARED_OP = re.compile(r"^\s*(?:@%p\d+\s+)?(?:ld|st)\.shared\b", re.M)
_ST_V4 = re.compile(r"^\s*(?:@%p\d+\s+)?st\.global(?:\.\w+)*\.v4\.", re.M)
_WGMMA = re.compile(r"^\s*(?:@%p\d+\s+)?wgmma\.mma_async\b", re.M)  # Hopper warpgroup MMA
_MMA_SYNC = re.compile(r"^\s*(?:@%p\d+\s+)?mma\.sync\b", re.M)  # Ampere-style warp MMA
_TMA = re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.bulk\.tensor\b", re.M)  # Hopper TMA bulk copies
# Float atomics with acquire/release ordering (Triton's default sem): a partial-sum accumulation needs
# none, and the relaxed form is a fire-and-forget ``red`` (vectorised where the layout allows).
_ORDERED_FLOAT_ATOMIC = re.compile(
    r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.global(?:\.\w+)*\.(?:acq_rel|acquire|release)(?:\.\w+)*\.f(?:16|32|64)\b",
    re.M,
)


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh cache: ptxas must run (its log is the measurement)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v report printed to stdout after each compile


def compile_case(case: Case) -> dict:
    """Compile one case; return its table row (registers, spill bytes, stack, shared memory)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, attr = case["fn"].split(":")
    fn = getattr(importlib.import_module("csrc_triton." + mod), attr)
    while not isinstance(fn, triton.runtime.JITFunction):  # through autotune/heuristics wrappers
        fn = fn.fn
    types, consts = case["types"], dict(case["consts"])
    for n in fn.arg_names:
        if types.get(n) == "1":
            consts[n] = 1
    missing = [n for n in fn.arg_names if n not in consts and n not in types]
    if missing:
        raise KeyError(f"{case['fn']}: no type for {missing}")
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    # Pointers are 16-byte aligned and the integer arguments (sizes, strides) multiples of 16.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in consts
        and (types[n].startswith("*") or types[n] in ("i32", "i64"))
        and n not in ("seed", "R", "m1", "T", "mixed_ok", "G", "blocksize2")
    }
    opts = dict(num_warps=case["num_warps"], num_stages=case["num_stages"], enable_fp_fusion=case["fusion"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    if os.environ.get("COMPILE_SM90_LOG"):
        print(log.getvalue(), file=sys.stderr)
    found = [m for m in _PTXAS.finditer(log.getvalue()) if m.group(1) == fn.__name__]
    if not found:
        raise RuntimeError(
            f"no ptxas -v report for {fn.__name__} (was the compile cached?):\n{log.getvalue()}"
        )
    m = found[-1]
    ptx = k.asm["ptx"]
    return dict(
        kernel=case["kernel"], config=case["config"], label=case["label"], dtype=case["dtype"], R=case["R"],
        regs=int(m.group(5)), spill_stores=int(m.group(3)), spill_loads=int(m.group(4)),
        stack=int(m.group(2)),
        shared=int(k.metadata.shared),
        # PTX structure (static instruction counts, every branch): barriers, shared-memory accesses
        # (layout conversions and reductions go through shared memory), 16-byte global stores.
        barriers=len(_BAR.findall(ptx)), shared_ops=len(_SHARED_OP.findall(ptx)),
        st_v4=len(_ST_V4.findall(ptx)), wgmma=len(_WGMMA.findall(ptx)), mma_sync=len(_MMA_SYNC.findall(ptx)),
        tma=len(_TMA.findall(ptx)),
        ordered_float_atomics=len(_ORDERED_FLOAT_ATOMIC.findall(ptx)),
    )  # fmt: skip


def _ci(c: Case) -> bool:
    """The CI subset: every config at least once, at the variants that measured heaviest (fp16 is
    heavier than bf16 everywhere: three tensor-core dots instead of two; fp32 takes the FMA path)."""
    k, label, dt = c["kernel"], c["label"], c["dtype"]
    if k == "lowrank.linear":  # bf16 (what "auto" offers it for) at R 64, forward and dX
        return dt == "bf16" and c["R"] == 64
    if k.startswith("lowrank."):
        # R 64 in fp16 and fp32; bf16 at R 16 (warp-level MMA there) and backend "auto"'s reductions
        # with rounded S / dS ("s16")
        if label.endswith("s16"):  # at its heaviest R: 32 for dS/dB (the widest it takes), 64 for grad A
            return dt == "bf16" and c["R"] == (32 if k == "lowrank.bwd_ds_db" else 64)
        if dt == "bf16":
            return c["R"] == 16 and (k != "lowrank.expand" or "dx" in label)
        if k == "lowrank.expand" and dt == "fp16":
            return c["R"] == 64 and "dx" in label
        return c["R"] == 64
    if k == "nf4.matmul":
        return label in ("bf16 M16 nested1 split4", "fp32 M1 nested0 split4")
    if k == "nf4.dequant":
        if label in ("bf16 bs64 nested1 gather wide", "bf16 bs64 nested1 gather bytes"):
            return True
        return label == "bf16 bs64 nested1 select" or (
            label == "fp32 bs64 nested0 gather" and c["num_warps"] == 4
        )
    if k.startswith("align."):
        return dt in ("fp32", "mixed")
    if k == "gaussian.filter":
        return "ND8" in label and dt != "fp16"
    return dt != "fp16"


def cases(full: bool, kernels: list[str] | None = None, ci: bool = False) -> list[Case]:
    out = [c for make in ALL.values() for c in make(full)]
    if ci:
        out = [c for c in out if _ci(c)]
    if kernels:
        out = [c for c in out if any(c["kernel"].startswith(k) for k in kernels)]
    return out


def run(
    full: bool = False,
    jobs: int | None = None,
    kernels: list[str] | None = None,
    verbose: bool = False,
    ci: bool = False,
) -> list[dict]:
    todo = cases(full, kernels, ci)
    # Heaviest first so that the pool's tail is short.
    todo.sort(key=lambda c: -_weight(c))
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="compile_sm90_") as cache:
        if jobs == 1:
            _init_worker(cache)
            return [compile_case(c) for c in todo]  # (no progress lines: one process is for debugging)
        with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(cache,)) as pool:
            rows = []
            for i, row in enumerate(pool.map(compile_case, todo), 1):
                rows.append(row)
                if verbose:
                    print(
                        f"[{i}/{len(todo)}] {row['kernel']} {row['config']} {row['label']}: "
                        f"{row['regs']} regs, "
                        f"{row['spill_stores']} B spilled",
                        file=sys.stderr,
                        flush=True,
                    )
            return rows


def _weight(c: Case) -> int:
    consts = c["consts"]
    tile = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "WORDS", "ITERS", "BLOCK"):
        tile *= consts.get(k, 1)
    return tile * consts.get("BLOCK_R", 1) // c["num_warps"]


def table(rows: list[dict]) -> str:
    head = f"{'kernel':18} {'config':42} {'variant':36} {'regs':>4} {'spill st/ld':>11} {'stack':>5} "
    head += f"{'shared':>7} {'bar':>4} {'shm op':>6} {'st.v4':>5} {'wgmma':>5} {'mma':>4}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["label"])):
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(
            f"{r['kernel']:18} {r['config']:42} {r['label']:36} {r['regs']:>4} {spill:>11} {r['stack']:>5} "
            f"{r['shared']:>7} {r['barriers']:>4} {r['shared_ops']:>6} {r['st_v4']:>5} {r['wgmma']:>5} "
            f"{r['mma_sync']:>4}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="sweep every constexpr combination (slow)")
    p.add_argument("--ci", action="store_true", help="the CI subset: every config once, heaviest variants")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--kernels", default="", help="comma-separated kernel name prefixes")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="one progress line per compile on stderr")
    a = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    rows = run(a.full, a.jobs, [k for k in a.kernels.split(",") if k], verbose=a.verbose, ci=a.ci)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
