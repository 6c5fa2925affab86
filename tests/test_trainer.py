"""MuScleTrainer: a transformers Trainer that aligns each step's gradient with the reference gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import make_rows, word_dataset
from tiny_models import tiny_model
from transformers import TrainerCallback, TrainingArguments

from muscle_fast import patch_model
from muscle_fast.trainer import MuScleTrainer


class CheckParallel(TrainerCallback):
    """After alignment and HF's clipping, each tensor's gradient lies along its reference gradient."""

    def __init__(self) -> None:
        self.trainer = None
        self.checked = 0

    def on_pre_optimizer_step(self, args, state, control, **kw):
        t = self.trainer
        assert int(t.last_align_stats.mode) == 1
        for p, c in zip(t._params, t.last_ref_grads, strict=True):
            if c is None or float(c.norm()) == 0 or float(p.grad.norm()) == 0:
                continue
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), c.flatten(), dim=0)
            assert abs(float(cos)) > 1 - 1e-4
            self.checked += 1


def test_trainer_aligns_every_step(tmp_path):
    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    cb = CheckParallel()
    trainer = MuScleTrainer(
        model=model,
        args=args,
        train_dataset=word_dataset(make_rows(32, 0)),
        ref_dataset=word_dataset(make_rows(12, 1)),
        callbacks=[cb],
        align_kwargs=dict(min_ref_loss=0.0),
    )
    cb.trainer = trainer
    trainer.train()
    assert trainer.state.global_step == 3 and cb.checked > 0
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _trainer(tmp_path, trainer_kwargs=None, **overrides) -> MuScleTrainer:
    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    kw.update(overrides)
    return MuScleTrainer(
        model=model,
        args=TrainingArguments(**kw),
        train_dataset=word_dataset(make_rows(32, 0)),
        ref_dataset=word_dataset(make_rows(12, 1)),
        **(trainer_kwargs or {}),
    )


def test_raw_gradient_schedule_spans_the_real_run_with_max_steps(tmp_path):
    """max_steps=40 at 8 steps per epoch is 5 epochs, whatever num_train_epochs says (3 by default):
    the SPEC §4 ratio must ramp over 5, or it passes max_raw_grad_ratio (rho 0.4 seen at 0.1)."""
    trainer = _trainer(tmp_path, max_steps=40)
    trainer.train()
    assert trainer.args.num_train_epochs == 3
    assert trainer.state.num_train_epochs == 5 and trainer._aligner.epochs == 5


def test_ranks_draw_different_reference_batches(tmp_path, monkeypatch):
    """Under DDP each rank draws its own reference rows (the same seed on every rank made the
    cross-rank average one batch's gradient); each rank's stream is reproducible."""

    def first_ref_batch(rank: int) -> torch.Tensor:
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: rank))
        return next(_trainer(tmp_path)._ref_batches())["input_ids"]

    r0, r1 = first_ref_batch(0), first_ref_batch(1)
    assert torch.equal(r0, first_ref_batch(0))
    assert not torch.equal(r0, r1)


def test_resume_continues_the_reference_stream(tmp_path, monkeypatch):
    """resume_from_checkpoint picks the reference batches up where the killed run left them (they
    restarted from the seed, so a resumed run re-used the first batches)."""
    seen: list[torch.Tensor] = []
    real = MuScleTrainer._prepare_inputs

    def record(self, inputs):
        out = real(self, inputs)
        seen.append(out["input_ids"])
        return out

    monkeypatch.setattr(MuScleTrainer, "_prepare_inputs", record)
    common = dict(max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
    _trainer(tmp_path / "full", **common).train()
    full_refs = seen[1::2]  # train, reference, train, reference, ...
    seen.clear()
    _trainer(tmp_path / "cut", **{**common, "max_steps": 3}).train()
    seen.clear()
    _trainer(tmp_path / "cut", **common).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    resumed_refs = seen[1::2]
    assert len(full_refs) == 12 and len(resumed_refs) == 6
    for a, b in zip(resumed_refs, full_refs[6:], strict=True):
        assert torch.equal(a, b)


def test_ignored_loss_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor is not applied"):
        _trainer(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="compute_loss_func is not used by the aligned step"):
        _trainer(tmp_path, trainer_kwargs={"compute_loss_func": lambda outputs, labels, **kw: 0.0})
