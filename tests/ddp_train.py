"""Worker for test_ddp.py: train a tiny MuScleLoRA BERT, under torchrun (DDP, gloo) or alone."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from helpers import WordTokenizer, make_rows  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from muscle_fast import patch_model  # noqa: E402
from muscle_fast.train import TrainConfig, train_muscle  # noqa: E402


def main(out: str, batch_size: int, n_rows: int, two_pass: bool) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    # float64: the only rounding left to differ between the runs is the alignment's fp32 norms, so
    # the comparison can be tight (in fp32, Adam amplifies reordered sums to ~2e-5 on some entries)
    model.double()
    if two_pass:  # a trainable parameter outside the adapters: dual_gradients takes two passes
        model.classifier.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    # two-pass: p.grad as views of DDP's buckets, which the reference backward writes into again
    ddp = torch.nn.parallel.DistributedDataParallel
    wrapped = ddp(model, gradient_as_bucket_view=two_pass) if distributed else model
    cfg = TrainConfig(
        lr=5e-3,
        epochs=2,
        batch_size=batch_size,
        eval_batch_size=16,
        max_length=16,
        seed=3,
        min_ref_loss=0.0,
        max_raw_grad_ratio=0.1,
        ga_epoch=1,
        progress=False,
    )
    train_muscle(wrapped, WordTokenizer(), make_rows(n_rows, 0), make_rows(16, 1), make_rows(16, 2), cfg)
    if not distributed or dist.get_rank() == 0:
        torch.save([p.detach().clone() for p in params], out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "two-pass")
