"""Estimated peak GPU memory of MuScleLoRA training of Llama-2-7B in 4-bit (NF4), by component.

    python benchmarks/estimate_memory.py [--batch 1] [--ref-batch N] [--seqs 512 2048]

An analytic count, not a measurement: 4-bit linear weights with double-quantized absmax, bf16
embeddings and norms, fp32 adapters with their gradient and two AdamW moments, and the
activations autograd keeps for backward (bf16, SDPA attention, no gradient checkpointing, and
with checkpointing per decoder layer). A MuScleLoRA step runs the training batch and a reference
batch of the same size through one forward and backward (single-pass gradient alignment), so its
activations are those of ``batch + ref_batch`` sequences; ``--ref-batch 0`` is a LoRA-only step.
Measured peaks: benchmarks/bench_memory.py on a GPU (it records this estimate beside them).
"""

from __future__ import annotations

import argparse

GiB = 1024**3

# Llama-2-7B
H, INTER, L, V, HEADS = 4096, 11008, 32, 32000, 32
LINEAR_PARAMS = L * (4 * H * H + 3 * H * INTER)
OTHER_PARAMS = V * H + (2 * L + 1) * H  # embeddings and RMSNorm weights (bf16; no LM head in a classifier)


def weights_bytes() -> float:
    nf4 = LINEAR_PARAMS / 2
    absmax = LINEAR_PARAMS / 64 * 1 + LINEAR_PARAMS / 64 / 256 * 4  # uint8 codes + fp32 per 256 blocks
    return nf4 + absmax + OTHER_PARAMS * 2


def adapter_bytes(r: int = 2, targets: int = 2, head_hidden: int = 16, scales: int = 4) -> float:
    lora = L * targets * r * (H + H)  # q_proj, v_proj: A (r, H) + B (H, r)
    mslr = scales * (H + head_hidden)  # score.dense, rank 1 per scale
    return (lora + mslr) * 4 * 4  # fp32 weight, grad, exp_avg, exp_avg_sq


def activation_bytes(batch: int, seq: int, checkpointing: bool) -> float:
    bsh, bsi = batch * seq * H, batch * seq * INTER
    per_layer = (10 * bsh + 4 * bsi) * 2  # norms, q/k/v, attention out, o_proj in, MLP gate/up/act/product
    per_layer += batch * HEADS * seq * 4  # SDPA log-sum-exp (fp32)
    if checkpointing:
        return L * bsh * 2 + per_layer  # layer inputs + one layer recomputed at a time
    return L * per_layer


def workspace_bytes() -> float:
    return H * INTER * 2  # the largest dequantized weight (bf16), one reused buffer


def components(batch: int, seq: int, checkpointing: bool, ref_batch: int | None = None) -> dict[str, float]:
    """Bytes per component of one training step; ``ref_batch`` defaults to ``batch`` (MuScleLoRA)."""
    rows = batch + (batch if ref_batch is None else ref_batch)
    parts = {
        "weights": weights_bytes(),
        "adapters": adapter_bytes(),
        "activations": activation_bytes(rows, seq, checkpointing),
        "dequant_buffer": workspace_bytes(),
    }
    parts["total"] = sum(parts.values())
    return parts


def table(batch: int, seqs: list[int], ref_batch: int | None = None) -> str:
    rows = [
        "| sequence | checkpointing | weights (NF4) | adapters + AdamW | activations | dequant buffer "
        "| total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in seqs:
        for ck in (False, True):
            parts = components(batch, s, ck, ref_batch)
            rows.append(
                f"| {s} | {'yes' if ck else 'no'} | "
                + " | ".join(f"{p / GiB:.2f} GiB" for p in parts.values())
                + " |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--ref-batch", type=int, default=None, help="reference rows per step (default: --batch; 0: LoRA only)"
    )
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    args = p.parse_args()
    ref = args.batch if args.ref_batch is None else args.ref_batch
    print(
        f"Llama-2-7B, 4-bit NF4 (double quant), batch {args.batch} + reference batch {ref}, "
        f"r=2 on q_proj/v_proj (estimate, not measured)"
    )
    print(table(args.batch, args.seqs, ref))


if __name__ == "__main__":
    main()
