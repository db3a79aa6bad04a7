"""keyreg's plain-text 4x4 matrix files (``*_matrix.txt``).

Convention: four rows of four numbers, the ``moving_from_fixed`` matrix in world RAS mm (maps a
FIXED point to the MOVING point), preceded by ``#`` comment lines that say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import ImageIOError
from ._common import PathLike, as_matrix, fmt, read_text, reading

__all__ = ["write_matrix_txt", "read_matrix_txt", "MATRIX_HEADER"]

#: First line of keyreg matrix files.
MATRIX_HEADER = "# keyreg moving_from_fixed RAS"


def write_matrix_txt(path: PathLike, matrix) -> Path:
    """Write a keyreg matrix as plain text, atomically.

    Args:
        path: output file (keyreg names it ``*_matrix.txt``).
        matrix: ``(4, 4)`` (or ``(1, 4, 4)``) ``moving_from_fixed``, world RAS mm.

    Returns:
        ``path``: a ``# keyreg moving_from_fixed RAS`` header, a comment on the direction, then 4
        rows of 4 round-trip-precision numbers.
    """
    m = as_matrix(matrix)
    rows = "".join(" ".join(fmt(v) for v in row) + "\n" for row in m)
    text = (f"{MATRIX_HEADER}\n"
            "# 4x4 world (RAS mm) matrix mapping a FIXED-image point to the MOVING-image point\n"
            f"{rows}")
    return atomic_write_text(path, text)


def read_matrix_txt(path: PathLike) -> np.ndarray:
    """Read a plain-text 4x4 (or 3x4) matrix as a keyreg ``moving_from_fixed`` RAS matrix.

    Lines starting with ``#`` and blank lines are ignored; numbers may be separated by spaces,
    tabs or commas.  The file is assumed to hold keyreg's convention (fixed RAS -> moving RAS).

    Args:
        path: the text file.

    Returns:
        ``(4, 4)`` float64.

    Raises:
        ImageIOError: missing file, an ITK transform file, or not 3-4 rows of 4 numbers with a
            ``0 0 0 1`` bottom row.
    """
    p, text = read_text(path, "a 4x4 matrix text file")
    if text.lstrip().startswith("#Insight Transform File"):
        raise ImageIOError(f"{p}: is an ITK transform file, not a plain matrix (use read_itk_affine)")
    with reading(p, "a 4x4 matrix text file"):
        rows = []
        for ln in text.splitlines():
            s = ln.strip()
            if not s or s.startswith("#"):
                continue
            rows.append([float(v) for v in s.replace(",", " ").split()])
        if len(rows) not in (3, 4) or any(len(r) != 4 for r in rows):
            raise ImageIOError(f"{p}: expected 4 rows of 4 numbers, got {len(rows)} rows "
                               f"of {sorted({len(r) for r in rows})} numbers")
        m = np.asarray(rows, dtype=np.float64)
        if len(rows) == 3:
            m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
        if not np.all(np.isfinite(m)):
            raise ImageIOError(f"{p}: matrix contains NaN or Inf")
        if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
            raise ImageIOError(f"{p}: bottom row must be 0 0 0 1, got {m[3].tolist()}")
    return m
