"""The keyreg error tree.

Every error that bad *input* can cause derives from :class:`KeyregError`; the CLI turns it
into one line on stderr and a non-zero exit.  Anything else is a bug and keeps its traceback.
Each class also derives from the matching built-in, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "KeyregError",
    "ImageIOError",
    "ImageContentError",
    "ShapeError",
    "DegenerateFitError",
    "CheckpointError",
    "ConfigError",
    "OutputError",
    "failure_message",
]


class KeyregError(Exception):
    """Base class: an error caused by the user's input, reported in one line."""


class ImageIOError(KeyregError, OSError):
    """A file is missing, unreadable, corrupt or not of the expected format."""


class ImageContentError(KeyregError, ValueError):
    """An image was read but cannot be registered (NaN/Inf, constant, wrong dimensionality, ...)."""


class ShapeError(KeyregError, ValueError):
    """Tensor or array shapes do not match what a function documents."""


class DegenerateFitError(KeyregError, ValueError):
    """Keypoints do not determine the requested transform (too few, collinear, coplanar)."""


class CheckpointError(KeyregError, ValueError):
    """A model file is unreadable, unsafe, or incompatible with the requested architecture."""


class ConfigError(KeyregError, ValueError):
    """An option has an invalid value (unknown align or metric name, bad range, ...)."""


class OutputError(KeyregError, OSError):
    """An output file or directory cannot be written."""


def failure_message(e: BaseException) -> str:
    """How a failed item of a batch (a pair, an evaluation task) is reported: a keyreg error's
    message, else ``internal error <type>: <first line>``."""
    if isinstance(e, KeyregError):
        return str(e)
    return f"internal error {type(e).__name__}: {first_line(e, None) if str(e).strip() else ''}"


def first_line(e: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (its type name if empty), cut at ``limit`` characters:
    the reason quoted in keyreg's one-line errors."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if limit is None else line[:limit]
