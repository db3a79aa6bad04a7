"""Reading and writing transform and point files of other tools (ITK, ANTs, FreeSurfer, Slicer).

Every function takes and returns keyreg's conventions: transforms are ``moving_from_fixed``
``(4, 4)`` matrices in world RAS mm (fixed point -> moving point, ITK's resampling direction),
displacement fields are ``u(p)`` RAS mm on the fixed grid with ``T(p) = p + u(p)``, points are
``(N, 3)`` RAS mm.  Conversions to LPS (``F = diag(-1, -1, 1)``) and to FreeSurfer's inverse
direction happen only inside this package.  Writers are atomic (temporary file + rename); readers
raise :class:`~keyreg.errors.ImageIOError` with a one-line message naming the file.

| module | files |
|---|---|
| :mod:`.itk` | ITK text transforms ``.tfm`` / ``.txt`` |
| :mod:`.ants` | ANTs/ITK MATLAB affines ``.mat`` |
| :mod:`.displacement` | ITK/ANTs displacement-field NIfTI ``(X, Y, Z, 1, 3)`` |
| :mod:`.lta` | FreeSurfer ``.lta`` |
| :mod:`.matrix` | keyreg plain-text 4x4 ``*_matrix.txt`` |
| :mod:`.points` | keypoint CSV, ANTs point CSV, Slicer ``.mrk.json`` / ``.fcsv`` |
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ._common import check_transform_matrix, read_text
from .ants import read_ants_mat, write_ants_mat
from .displacement import (
    displacement_from_field,
    field_from_displacement,
    read_displacement_field,
    write_displacement_field,
)
from .itk import read_itk_affine, write_itk_affine
from .lta import read_lta, write_lta
from .matrix import read_matrix_txt, write_matrix_txt
from .points import (
    read_markups,
    PointSet,
    read_point_set,
    read_points_csv,
    write_markups_fcsv,
    write_markups_json,
    write_points_csv,
)

__all__ = [
    "write_itk_affine", "read_itk_affine",
    "write_ants_mat", "read_ants_mat",
    "write_displacement_field", "read_displacement_field",
    "field_from_displacement", "displacement_from_field",
    "write_lta", "read_lta",
    "write_matrix_txt", "read_matrix_txt",
    "write_points_csv", "read_points_csv", "read_point_set", "PointSet",
    "write_markups_json", "write_markups_fcsv", "read_markups",
    "save_transform", "load_transform", "transform_format",
]

_GEOMETRY_KEYS = ("moving_shape", "moving_affine", "fixed_shape", "fixed_affine", "moving_name", "fixed_name")
_FORMATS = ("itk", "ants", "lta", "matrix")


def transform_format(path: str | os.PathLike, *, for_reading: bool = False) -> str:
    """The format keyreg uses for a transform file name: ``'itk'``, ``'ants'``, ``'lta'`` or ``'matrix'``.

    ``.tfm`` -> ITK; ``.mat`` -> ANTs; ``.lta`` -> FreeSurfer; ``.txt`` -> the keyreg plain matrix
    when the name ends in ``matrix.txt``, else ITK.  When reading, a ``.txt`` file is classified by
    its content instead (``#Insight Transform File`` -> ITK, anything else -> plain matrix).

    Raises:
        ConfigError: any other extension.
    """
    name = Path(path).name.lower()
    if name.endswith(".tfm"):
        return "itk"
    if name.endswith(".mat"):
        return "ants"
    if name.endswith(".lta"):
        return "lta"
    if name.endswith(".txt"):
        if for_reading:
            _, text = read_text(path, "a transform text file")
            return "itk" if text.lstrip().startswith("#Insight Transform File") else "matrix"
        return "matrix" if name.endswith("matrix.txt") else "itk"
    raise ConfigError(f"{path}: unknown transform file extension (use .tfm, .txt, .mat or .lta)")


def save_transform(path: str | os.PathLike, matrix, *, fmt: str | None = None, **geometry) -> Path:
    """Write a keyreg matrix in the format chosen by the file name (or ``fmt``), atomically.

    Args:
        path: ``.tfm`` (ITK), ``*matrix.txt`` (keyreg plain text), other ``.txt`` (ITK), ``.mat``
            (ANTs) or ``.lta`` (FreeSurfer).
        matrix: ``(4, 4)`` ``moving_from_fixed``, world RAS mm.
        fmt: force ``'itk'``, ``'ants'``, ``'lta'`` or ``'matrix'``.
        **geometry: for ``.lta``: ``moving_shape``, ``moving_affine``, ``fixed_shape``,
            ``fixed_affine`` (required) and ``moving_name``, ``fixed_name`` (optional); ignored by
            the other formats.

    Returns:
        ``path``.

    Raises:
        ConfigError: unknown extension or ``fmt``, unknown keyword, or missing LTA geometry.
    """
    unknown = sorted(set(geometry) - set(_GEOMETRY_KEYS))
    if unknown:
        raise ConfigError(f"save_transform: unknown argument(s) {', '.join(unknown)} "
                          f"(geometry keys are {', '.join(_GEOMETRY_KEYS)})")
    if fmt is not None and fmt not in _FORMATS:
        raise ConfigError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    kind = fmt or transform_format(path)
    if kind == "itk":
        return write_itk_affine(path, matrix)
    if kind == "ants":
        return write_ants_mat(path, matrix)
    if kind == "matrix":
        return write_matrix_txt(path, matrix)
    missing = [k for k in _GEOMETRY_KEYS[:4] if geometry.get(k) is None]
    if missing:
        raise ConfigError(f"{path}: an LTA needs the image geometry; missing {', '.join(missing)}")
    return write_lta(path, matrix, **geometry)


def load_transform(path: str | os.PathLike, *, fmt: str | None = None) -> np.ndarray:
    """Read a linear transform file as a keyreg matrix.

    Args:
        path: ``.tfm`` / ``.txt`` (ITK, or keyreg plain matrix when the text does not start with
            ``#Insight Transform File``), ``.mat`` (ANTs/ITK) or ``.lta`` (FreeSurfer).
        fmt: force ``'itk'``, ``'ants'``, ``'lta'`` or ``'matrix'``.

    Returns:
        ``(4, 4)`` float64 ``moving_from_fixed``, world RAS mm.

    Raises:
        ConfigError: unknown extension or ``fmt``.  ImageIOError: missing or unreadable file, or an
            implausible matrix (:func:`~keyreg.formats._common.check_transform_matrix`).
    """
    if fmt is not None and fmt not in _FORMATS:
        raise ConfigError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    kind = fmt or transform_format(path, for_reading=True)
    reader = {"itk": read_itk_affine, "ants": read_ants_mat, "lta": read_lta, "matrix": read_matrix_txt}[kind]
    return check_transform_matrix(reader(path), str(path))
