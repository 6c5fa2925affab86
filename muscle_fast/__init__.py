"""muscle_fast: MuScleLoRA fine-tuning on possibly backdoor-poisoned data, with fused Triton kernels.

``patch_model(model)`` turns a Hugging Face model into a MuScleLoRA model (SPEC §2-3);
``dual_gradients`` + ``GradientAligner`` are the gradient alignment (SPEC §4); adapters
save and load through safetensors and export to peft.
"""

from typing import Any

from .adapter import export_peft, load_adapter, merge_and_unload, save_adapter
from .align import AlignStats, GradientAligner, align_loop_reference
from .config import FAMILIES, MuScleConfig, family_defaults
from .dual import dual_gradients
from .errors import ConfigError, FileFormatError, MuscleFastError, RunError
from .layers import MuScleLinear
from .ops.nf4 import dequantize_4bit, free_4bit_workspaces, matmul_4bit
from .patch import DecoderScoreHead, patch_model
from .train import TrainConfig, TrainResult, train_muscle

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "AlignStats",
    "ConfigError",
    "FileFormatError",
    "DecoderScoreHead",
    "GradientAligner",
    "MuScleConfig",
    "MuScleLinear",
    "MuScleTrainer",
    "MuscleFastError",
    "RunError",
    "RunSpec",
    "TrainConfig",
    "TrainResult",
    "align_loop_reference",
    "dequantize_4bit",
    "dual_gradients",
    "export_peft",
    "family_defaults",
    "free_4bit_workspaces",
    "load_adapter",
    "matmul_4bit",
    "merge_and_unload",
    "patch_model",
    "run_defend",
    "save_adapter",
    "train_muscle",
]


def __getattr__(name: str) -> Any:
    # transformers' Trainer is heavy to import and needs accelerate: load it on first use only
    if name == "MuScleTrainer":
        from .trainer import MuScleTrainer

        return MuScleTrainer
    if name in ("RunSpec", "run_defend"):  # the experiment layer: loaded on first use
        from . import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'muscle_fast' has no attribute {name!r}")
