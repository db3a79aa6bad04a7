"""Helpers shared by the format modules: argument checks, safe file reading, number formatting.

Nothing here is public API.  Readers use :func:`reading` so that any unexpected low-level
exception (``ValueError`` from a parser, ``UnicodeDecodeError``, ...) reaches the caller as one
:class:`~keyreg.errors.ImageIOError` line naming the file, never as a foreign traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ImageIOError, KeyregError, OutputError, ShapeError, first_line

PathLike = str | os.PathLike

#: Exceptions that a reader may turn into ImageIOError (anything else is a bug and keeps its traceback).
_READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, OSError, EOFError, UnicodeError,
                json.JSONDecodeError, zlib.error, AttributeError, OverflowError)


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn low-level parsing errors inside the block into one-line :class:`ImageIOError`."""
    try:
        yield
    except KeyregError:
        raise
    except _READ_ERRORS as e:
        raise ImageIOError(f"{path}: cannot read as {what} ({first_line(e)})") from None


def existing_file(path: PathLike, what: str) -> Path:
    """``path`` as a :class:`Path`; :class:`ImageIOError` if it is missing or a directory."""
    p = Path(path)
    if not p.exists():
        raise ImageIOError(f"{p}: file does not exist (expected {what})")
    if p.is_dir():
        raise ImageIOError(f"{p}: is a directory, expected {what}")
    return p


def read_text(path: PathLike, what: str) -> tuple[Path, str]:
    """Read a UTF-8 (or Latin-1) text file; :class:`ImageIOError` for missing or binary files."""
    p = existing_file(path, what)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ImageIOError(f"{p}: cannot read ({first_line(e)})") from None
    if b"\x00" in raw:
        raise ImageIOError(f"{p}: binary content, expected {what} (a text file)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if not text.strip():
        raise ImageIOError(f"{p}: empty file, expected {what}")
    return p, text


def as_matrix(matrix, name: str = "matrix") -> np.ndarray:
    """A finite ``(4, 4)`` float64 affine (bottom row ``0 0 0 1``) from an array or tensor.

    Accepts ``(4, 4)``, a batch of one ``(1, 4, 4)`` and torch tensors.

    Raises:
        ShapeError: wrong shape, non-finite values, or a bottom row other than ``0 0 0 1``.
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().double().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (4, 4):
        raise ShapeError(f"{name} must be a (4, 4) affine, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ShapeError(f"{name} contains NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ShapeError(f"{name} must have bottom row 0 0 0 1, got {m[3].tolist()}")
    out = m.copy()
    out[3] = [0.0, 0.0, 0.0, 1.0]
    return out


#: the largest factor by which a transform between two head images may scale lengths (and 1 / it the
#: smallest): a file beyond it is in other units, a voxel matrix or damaged, and would resample silently
#: to a blank or smeared image
MAX_TRANSFORM_SCALE = 100.0
#: the largest translation (mm) of a plausible transform: 100 m
MAX_TRANSLATION_MM = 1e5


def check_transform_matrix(matrix: np.ndarray, where: str) -> np.ndarray:
    """``matrix`` (a ``(4, 4)`` world-to-world transform read from a file) unless it is implausible:
    :class:`ImageIOError` when its linear part is singular, scales lengths by more than
    ``MAX_TRANSFORM_SCALE`` or less than its inverse, or it translates by more than ``MAX_TRANSLATION_MM``."""
    s = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    if not s[-1] > 1e-12 * max(float(s[0]), 1.0):
        raise ImageIOError(f"{where}: the matrix is singular, it has no inverse")
    if s[0] > MAX_TRANSFORM_SCALE or s[-1] < 1 / MAX_TRANSFORM_SCALE:
        raise ImageIOError(f"{where}: the matrix scales lengths by {s[-1]:.3g} to {s[0]:.3g}; a transform between "
                           f"two images in mm scales them by less than {MAX_TRANSFORM_SCALE:g} either way "
                           "(is it in other units, or a voxel-to-world matrix?)")
    shift = float(np.linalg.norm(matrix[:3, 3]))
    if shift > MAX_TRANSLATION_MM:
        raise ImageIOError(f"{where}: the matrix translates by {shift:.3g} mm (more than {MAX_TRANSLATION_MM:g} mm; "
                           "is it in other units?)")
    return matrix


def as_points(points, name: str = "points") -> np.ndarray:
    """Finite ``(N, 3)`` float64 points from an array or tensor; :class:`ShapeError` otherwise."""
    if hasattr(points, "detach"):
        points = points.detach().cpu().double().numpy()
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, 3)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ShapeError(f"{name} must be (N, 3), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ShapeError(f"{name} contain NaN or Inf")
    return p


def as_labels(labels, n: int, name: str = "labels") -> list[str]:
    """``n`` label strings; ``None`` gives ``K-1 .. K-n``.  Labels must be single-line."""
    if labels is None:
        return [f"K-{i + 1}" for i in range(n)]
    out = [str(x) for x in labels]
    if len(out) != n:
        raise ShapeError(f"{name}: got {len(out)} labels for {n} points")
    for lab in out:
        if "\n" in lab or "\r" in lab:
            raise ShapeError(f"{name}: label {lab!r} contains a line break")
    return out


def fmt(x: float) -> str:
    """Shortest text that reads back as exactly the same float64 (Python's repr)."""
    v = float(x)
    if v == 0.0:
        return "0"  # also turns -0.0 into 0
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def check_suffix(path: PathLike, suffixes: tuple[str, ...], what: str) -> Path:
    """:class:`OutputError` unless ``path`` ends with one of ``suffixes`` (case-sensitive)."""
    p = Path(path)
    if not str(p).endswith(suffixes):
        raise OutputError(f"{p}: {what} file name must end in {' or '.join(suffixes)}")
    return p


def one_line(text: str) -> str:
    """``text`` with line breaks replaced by spaces (for names written into headers)."""
    return " ".join(str(text).split("\n")).replace("\r", " ")
