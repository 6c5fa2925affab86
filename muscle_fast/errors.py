"""The errors muscle_fast raises for bad input or a run that cannot go on.

Library code raises these and never ends the process; the ``muscle-fast`` command line alone
turns them into a one-line ``muscle-fast: ...`` message and an exit status. Every message is
one line that names what is wrong (the flag, key, file or folder), so it can be printed as is.
"""

from __future__ import annotations

__all__ = ["ConfigError", "FileFormatError", "MuscleFastError", "ResultsError", "RunError", "first_line"]


class MuscleFastError(Exception):
    """Base of the errors a caller can report to a user as they are (one line, no traceback)."""


class ConfigError(MuscleFastError, ValueError):
    """Bad settings: an unknown method, a broken preset, a hyperparameter out of range, a device
    that does not exist, or flags that do not go together."""


class FileFormatError(MuscleFastError, ValueError):
    """A file that exists but cannot be read as what it should be: a truncated or corrupt
    ``.safetensors``, a JSON file that does not parse or holds the wrong kind of value."""


class RunError(MuscleFastError):
    """A run cannot start or go on: a model or checkpoint that cannot be loaded, a missing
    optional package."""


class ResultsError(MuscleFastError, ValueError):
    """A results file (``results.json``) that is missing, not JSON, or not a list of records."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a KeyError without its quotes), or its type name."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = str(msg).strip().splitlines()
    return lines[0] if lines else type(e).__name__
