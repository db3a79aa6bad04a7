"""ANTs / ITK MATLAB affine files (``.mat``, e.g. ``<prefix>0GenericAffine.mat``).

Convention: a MATLAB Level-4 file with two variables, the transform (``AffineTransform_double_3_3``,
12x1: row-major ``M`` then ``t``, exactly the ITK parameters) and ``fixed`` (3x1 centre ``c``).
LPS mm, fixed -> moving (the same ``T`` as keyreg's ``moving_from_fixed``), ``T(x) = M (x - c) + t + c``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import ImageIOError, first_line
from ..geometry import LPS_FROM_RAS
from ._common import PathLike, as_matrix, check_suffix, existing_file, reading
from .itk import itk_linear_to_matrix

__all__ = ["write_ants_mat", "read_ants_mat"]


def write_ants_mat(path: PathLike, matrix) -> Path:
    """Write a keyreg matrix as an ANTs/ITK MATLAB v4 affine file, atomically.

    Args:
        path: output file; must end in ``.mat`` (ITK picks its MATLAB reader by extension).
        matrix: ``(4, 4)`` (or ``(1, 4, 4)``) ``moving_from_fixed``, world RAS mm.

    Returns:
        ``path``.  Variables ``AffineTransform_double_3_3`` (12, 1) float64 = ``F A F`` parameters
        (LPS, same direction) and ``fixed`` (3, 1) = 0.

    Raises:
        OutputError: the name does not end in ``.mat``, or the file cannot be written.
    """
    from scipy.io import savemat

    path = check_suffix(path, (".mat",), "ANTs affine")
    a_lps = LPS_FROM_RAS @ as_matrix(matrix) @ LPS_FROM_RAS
    params = np.concatenate([a_lps[:3, :3].ravel(), a_lps[:3, 3]]).reshape(12, 1)
    with atomic_path(path) as tmp:
        savemat(str(tmp), {"AffineTransform_double_3_3": params.astype(np.float64),
                           "fixed": np.zeros((3, 1), dtype=np.float64)},
                format="4", appendmat=False)
    return path


def read_ants_mat(path: PathLike) -> np.ndarray:
    """Read an ANTs/ITK MATLAB transform file as a keyreg matrix.

    Accepts ``AffineTransform_double_3_3`` / ``_float_3_3`` (float64 or float32 data),
    ``MatrixOffsetTransformBase_*`` and the other linear types of
    :func:`~keyreg.formats.itk.itk_linear_to_matrix`, with any centre ``fixed``.

    Args:
        path: the ``.mat`` file.

    Returns:
        ``(4, 4)`` float64 ``moving_from_fixed`` in world RAS mm.

    Raises:
        ImageIOError: missing, not a MATLAB file, no or several transform variables, bad shapes.
    """
    from scipy.io import loadmat

    p = existing_file(path, "an ANTs .mat transform")
    with reading(p, "an ANTs/ITK .mat transform"):
        with p.open("rb") as f:
            head = f.read(128)
        if b"\x00" not in head:  # every MATLAB v4/v5 header holds zero bytes; text files none
            what = ("an ITK text transform (read it as .tfm/.txt)" if head.lstrip().startswith(b"#Insight")
                    else "a text file" if head.strip() else "empty")
            raise ImageIOError(f"{p}: not a MATLAB v4/v5 .mat file ({what})")
        try:
            data = loadmat(str(p), appendmat=False)
        except OSError:
            raise
        except Exception as e:  # MatReadError, NotImplementedError (v7.3 files), struct errors, ...
            raise ValueError(f"not a MATLAB v4/v5 file: {first_line(e)}") from None
        names = [k for k in data if not k.startswith("__") and k != "fixed"]
        if len(names) != 1:
            raise ImageIOError(f"{p}: expected one transform variable and 'fixed', found {sorted(data)}"
                               if names else f"{p}: no transform variable (e.g. AffineTransform_double_3_3)")
        params = _real(p, names[0], data[names[0]])
        fixed = _real(p, "fixed", data.get("fixed", np.zeros(0)))
        a_lps = itk_linear_to_matrix(names[0], params, fixed)
    return LPS_FROM_RAS @ a_lps @ LPS_FROM_RAS


def _real(p: Path, name: str, value) -> np.ndarray:
    """The numbers of MATLAB variable ``name`` as a flat float64 array; :class:`ImageIOError` for
    complex, text, cell or struct data."""
    a = np.asarray(value)
    if np.iscomplexobj(a):
        raise ImageIOError(f"{p}: variable {name!r} holds complex numbers; transform parameters must be real")
    if a.dtype.kind not in "fiu":
        raise ImageIOError(f"{p}: variable {name!r} is not a numeric array (text, cell or struct data)")
    return a.astype(np.float64).ravel()
