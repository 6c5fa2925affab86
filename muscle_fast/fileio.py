"""Atomic file and folder writes: a reader (or a killed run) never sees half a file or checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FileFormatError


def _public_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file made through a private temporary (mode 600/700) the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _fsync(path: str | Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk: a rename is only as durable as this."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename it over ``path``.

    The data is fsynced before the rename and the folder after it, so a power loss leaves the old
    file or the new one, never an empty or partial one under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _public_mode(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def replace_dir(directory: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then swap it in: a reader never sees half a checkpoint.

    The swap is two renames; a kill between them leaves the previous folder as ``.NAME.old-*``
    beside a missing ``NAME`` (there is no atomic exchange of two folders in POSIX)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            _public_mode(f, directory=f.is_dir())
            _fsync(f, directory=f.is_dir())
        _public_mode(tmp, directory=True)
        _fsync(tmp, directory=True)
        if directory.exists():
            # a fresh empty name (rename may replace an empty folder): a leftover of a killed run with
            # the same pid, common in containers, made os.replace fail
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory.parent, directory=True)


def read_json(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """Parse a JSON file that must hold a ``kind`` (dict or list); FileFormatError naming the file
    and ``what`` it is (e.g. "the adapter config") when it is empty, truncated or not JSON."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} ({what}) is not valid JSON: {e}") from None
    if not isinstance(obj, kind):
        raise FileFormatError(f"{path} ({what}) must hold a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str | os.PathLike, what: str, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file; FileFormatError naming the file and ``what`` it is
    when it is empty, truncated or corrupt (safetensors' own error names neither)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise FileFormatError(f"{path} ({what}) is not a readable safetensors file: {e}") from None
