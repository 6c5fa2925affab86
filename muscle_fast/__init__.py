"""muscle_fast: MuScleLoRA fine-tuning on possibly backdoor-poisoned data, with fused Triton kernels.

``patch_model(model)`` turns a Hugging Face model into a MuScleLoRA model (SPEC §2-3);
adapters save and load through safetensors and export to peft.
"""

from .adapter import export_peft, load_adapter, merge_and_unload, save_adapter
from .config import FAMILIES, MuScleConfig, family_defaults
from .layers import MuScleLinear
from .patch import DecoderScoreHead, patch_model

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "DecoderScoreHead",
    "MuScleConfig",
    "MuScleLinear",
    "export_peft",
    "family_defaults",
    "load_adapter",
    "merge_and_unload",
    "patch_model",
    "save_adapter",
]
