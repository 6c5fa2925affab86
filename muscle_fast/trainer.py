"""MuScleTrainer: the Hugging Face Trainer with gradient alignment against a reference dataset."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler
from transformers import Trainer

from .config import model_family
from .distributed import average_across_ranks
from .dual import default_loss, dual_gradients, trainable_params


class MuScleTrainer(Trainer):
    """``Trainer`` whose every optimizer step aligns the gradient with a clean reference batch (SPEC §4).

    ``ref_dataset`` is formatted like the training dataset (one reference batch of the
    training batch size is drawn per micro-batch). Gradients of the micro-batches of one
    optimizer step are accumulated, reference gradients too (averaged across ranks under
    DDP), and the alignment runs once on the last micro-batch, before HF's own clipping.
    ``align_kwargs`` override the family's GA defaults (min_ref_loss, max_raw_grad_ratio,
    ga_epoch, min_ref_grad_norm, backend).
    """

    def __init__(
        self, *args: Any, ref_dataset: Any = None, align_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if ref_dataset is None or len(ref_dataset) == 0:
            raise ValueError(
                "MuScleTrainer: ref_dataset must be a non-empty dataset of clean reference samples"
            )
        if self.args.fp16:
            raise ValueError("MuScleTrainer: fp16 with a loss scaler is not supported; use bf16")
        # the aligned step computes both losses itself (dual_gradients): refuse what it would ignore
        if self.args.label_smoothing_factor:
            raise ValueError(
                "MuScleTrainer: label_smoothing_factor is not applied by the aligned loss; pass "
                "align_kwargs={'loss_fn': ...} with a smoothed cross-entropy instead"
            )
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                "MuScleTrainer: compute_loss_func is not used by the aligned step; pass "
                "align_kwargs={'loss_fn': fn(logits, labels)} instead"
            )
        self.ref_dataset = ref_dataset
        self.align_kwargs = dict(align_kwargs or {})
        self.loss_fn = self.align_kwargs.pop("loss_fn", None) or default_loss
        self._ref_iter: Iterator[Any] | None = None
        self._aligner: Any = None
        self._params: list[nn.Parameter] = []
        self._ref_acc: list[torch.Tensor | None] | None = None
        self._ref_loss_acc: torch.Tensor | None = None
        self.last_align_stats: Any = None
        self.last_ref_grads: list[torch.Tensor | None] | None = None

    def _ref_batches(self, skip_batches: int = 0) -> Iterator[Any]:
        """The reference batches of this rank, from the first or (resuming) after ``skip_batches``."""
        ds = self.ref_dataset
        if self.args.remove_unused_columns and hasattr(ds, "column_names"):
            ds = self._remove_unused_columns(ds, description="reference")
        # one stream per rank: with the same seed everywhere, every rank would draw the same reference
        # rows and the cross-rank average would be one batch's gradient, not world_size batches'
        gen = torch.Generator().manual_seed(self.args.seed + 1 + 7919 * self.args.process_index)
        bs = self.args.per_device_train_batch_size
        sampler = RandomSampler(ds, replacement=True, num_samples=10**9, generator=gen)
        loader = DataLoader(
            ds, batch_size=bs, collate_fn=self.data_collator, sampler=_Skip(sampler, skip_batches * bs)
        )
        yield from loader

    def _setup_aligner(self, model: nn.Module) -> None:
        from .align import GradientAligner

        core = self.accelerator.unwrap_model(model)
        self._params = trainable_params(core)
        fam = model_family(core)
        kw: dict[str, Any] = fam.align_kwargs() if fam is not None else {}
        kw.update(self.align_kwargs)
        # the run's real length: with max_steps set, args.num_train_epochs is not it (the raw-gradient
        # ratio schedule of SPEC §4 ramps over these epochs)
        epochs = self.state.num_train_epochs or self.args.num_train_epochs
        self._aligner = GradientAligner(self._params, epochs=math.ceil(epochs), **kw)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if self._aligner is None:
            self._setup_aligner(model)
        if self._ref_iter is None:
            # resuming from a checkpoint: continue the reference stream where the run left it (HF
            # resumes at optimizer-step boundaries, one reference batch per micro-batch; exact when
            # no epoch ended inside an accumulation group)
            done = self.state.global_step * self.args.gradient_accumulation_steps
            self._ref_iter = self._ref_batches(skip_batches=done)
        model.train()
        inputs = self._prepare_inputs(inputs)
        ref_inputs = self._prepare_inputs(next(self._ref_iter))
        # older transformers have no current_gradient_accumulation_steps: the configured count
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        steps = max(1, int(steps or self.args.gradient_accumulation_steps))

        def scaled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(logits, labels) / steps

        loss, ref_loss, ref_grads = dual_gradients(
            model, inputs, ref_inputs, loss_fn=scaled, params=self._params, accumulate=True
        )
        if self._ref_acc is None:
            self._ref_acc, self._ref_loss_acc = list(ref_grads), ref_loss
        else:
            self._ref_acc = [
                a if b is None else (b if a is None else a + b)
                for a, b in zip(self._ref_acc, ref_grads, strict=True)
            ]
            self._ref_loss_acc = self._ref_loss_acc + ref_loss
        if self.accelerator.sync_gradients:
            *refs, rl = average_across_ranks([*self._ref_acc, self._ref_loss_acc])
            epoch = int(math.floor(self.state.epoch or 0.0))
            self.last_align_stats = self._aligner.align(refs, rl, epoch)
            self.last_ref_grads = refs
            self._ref_acc, self._ref_loss_acc = None, None
        return loss.detach()


class _Skip(Sampler):
    """``sampler`` without its first ``n`` indices (drawn and dropped: the RNG stream is the same)."""

    def __init__(self, sampler: Sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)
