"""ITK text transform files (``.tfm`` / ``.txt``): linear transforms, LPS, fixed -> moving.

Convention: the file holds the same transform ``T`` as keyreg's ``moving_from_fixed`` matrix ``A``
(fixed point -> moving point, the resampling direction of ITK), expressed in LPS millimetres:
``A_LPS = F A F`` with ``F = diag(-1, -1, 1, 1)``.  ITK parameters are the 3x3 matrix ``M`` in
row-major order followed by the translation ``t``; fixed parameters are the centre ``c``, and
``T(x) = M (x - c) + t + c``, i.e. offset ``= t + c - M c``.  keyreg writes ``c = 0``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import ImageIOError
from ..geometry import LPS_FROM_RAS
from ._common import PathLike, as_matrix, fmt, read_text, reading

__all__ = ["write_itk_affine", "read_itk_affine", "itk_linear_to_matrix", "ITK_HEADER"]

#: First line of every ITK text transform file.
ITK_HEADER = "#Insight Transform File V1.0"

_SUFFIX = re.compile(r"_(double|float)_3_3$")


def write_itk_affine(path: PathLike, matrix) -> Path:
    """Write a keyreg matrix as an ITK ``AffineTransform_double_3_3`` text file, atomically.

    Args:
        path: output file (``.tfm`` or ``.txt``; ITK chooses the reader by content for both).
        matrix: ``(4, 4)`` (or ``(1, 4, 4)``, numpy or torch) ``moving_from_fixed``, world RAS mm:
            maps a FIXED-image point to the matching MOVING-image point.

    Returns:
        ``path``.  The file holds ``F A F`` (LPS, same direction), centre ``0 0 0``, and every
        number in round-trip (shortest exact) double precision.

    Example (a 10 mm shift to the subject's Right, fixed -> moving): ``Parameters: 1 0 0 0 1 0 0 0 1 -10 0 0``.
    """
    a_lps = LPS_FROM_RAS @ as_matrix(matrix) @ LPS_FROM_RAS
    params = [*a_lps[:3, :3].ravel(), *a_lps[:3, 3]]
    text = (f"{ITK_HEADER}\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(fmt(v) for v in params)}\nFixedParameters: 0 0 0\n")
    return atomic_write_text(path, text)


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _versor_matrix(v: np.ndarray) -> np.ndarray:
    """Rotation of the unit quaternion with vector part ``v`` and scalar part ``sqrt(1 - |v|^2)``."""
    n2 = float(v @ v)
    if n2 > 1.0 + 1e-9:
        raise ValueError(f"versor vector part has norm {np.sqrt(n2):.6g} > 1")
    x, y, z = v
    w = np.sqrt(max(0.0, 1.0 - n2))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def itk_linear_to_matrix(transform_type: str, parameters: Sequence[float],
                         fixed_parameters: Sequence[float]) -> np.ndarray:
    """The 4x4 LPS point map (fixed -> moving) of one linear ITK transform.

    Args:
        transform_type: ITK class name with its suffix, e.g. ``AffineTransform_double_3_3``.
            Supported: ``AffineTransform``, ``MatrixOffsetTransformBase`` (12 parameters),
            ``Euler3DTransform`` (angles ``rx ry rz`` in radians + translation; fixed parameters
            centre and an optional ComputeZYX flag: ``R = Rz Rx Ry``, or ``Rz Ry Rx`` when set),
            ``VersorRigid3DTransform`` (versor vector part + translation) and
            ``TranslationTransform``; ``double`` or ``float``.
        parameters, fixed_parameters: the numbers of the file.

    Returns:
        ``(4, 4)`` float64 ``[M | t + c - M c]`` in LPS mm.

    Raises:
        ValueError: unsupported type or wrong number of parameters (readers turn it into
            :class:`ImageIOError`).
    """
    m = _SUFFIX.search(transform_type)
    if m is None:
        raise ValueError(f"unsupported transform type {transform_type!r} (need a 3-D *_double_3_3 "
                         "or *_float_3_3 transform)")
    base = transform_type[: m.start()]
    p = np.asarray(parameters, dtype=np.float64).ravel()
    fp = np.asarray(fixed_parameters, dtype=np.float64).ravel()

    def need(n_p: int, n_fp: Sequence[int]) -> None:
        if p.size != n_p or fp.size not in n_fp:
            raise ValueError(f"{transform_type} needs {n_p} parameters and "
                             f"{' or '.join(map(str, n_fp))} fixed parameters, got {p.size} and {fp.size}")

    if base in ("AffineTransform", "MatrixOffsetTransformBase"):
        need(12, (3,))
        mat, t, c = p[:9].reshape(3, 3), p[9:], fp
    elif base == "Euler3DTransform":
        need(6, (3, 4))
        rx, ry, rz = p[:3]
        zyx = fp.size == 4 and fp[3] != 0
        mat = _rot_z(rz) @ _rot_y(ry) @ _rot_x(rx) if zyx else _rot_z(rz) @ _rot_x(rx) @ _rot_y(ry)
        t, c = p[3:], fp[:3]
    elif base == "VersorRigid3DTransform":
        need(6, (3,))
        mat, t, c = _versor_matrix(p[:3]), p[3:], fp
    elif base == "TranslationTransform":
        need(3, (0,))
        mat, t, c = np.eye(3), p, np.zeros(3)
    else:
        raise ValueError(f"unsupported transform type {transform_type!r} (keyreg reads linear "
                         "Affine, MatrixOffsetTransformBase, Euler3D, VersorRigid3D and Translation transforms)")
    if not (np.all(np.isfinite(mat)) and np.all(np.isfinite(t)) and np.all(np.isfinite(c))):
        raise ValueError("parameters contain NaN or Inf")
    out = np.eye(4)
    out[:3, :3] = mat
    out[:3, 3] = t + c - mat @ c
    if abs(np.linalg.det(mat)) < 1e-12:
        raise ValueError("the transform's matrix is singular")
    return out


def _parse_itk_text(path: Path, text: str) -> list[dict]:
    lines = [ln.strip() for ln in text.splitlines()]
    first = next((ln for ln in lines if ln), "")
    if not first.startswith("#Insight Transform File"):
        raise ImageIOError(f"{path}: not an ITK transform file (first line should be '{ITK_HEADER}')")
    transforms: list[dict] = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if ":" not in ln:
            raise ValueError(f"unexpected line {ln[:60]!r}")
        key, _, value = ln.partition(":")
        key = key.strip()
        if key == "Transform":
            transforms.append({"type": value.strip(), "Parameters": None, "FixedParameters": None})
        elif key in ("Parameters", "FixedParameters"):
            if not transforms:
                raise ValueError(f"'{key}' before any 'Transform:' line")
            transforms[-1][key] = [float(v) for v in value.split()]
        else:
            raise ValueError(f"unexpected key {key[:40]!r}")
    return transforms


def read_itk_affine(path: PathLike) -> np.ndarray:
    """Read a linear ITK text transform as a keyreg matrix.

    Accepts ``.tfm`` / ``.txt`` files holding one linear transform (see
    :func:`itk_linear_to_matrix` for the types), or a ``CompositeTransform`` holding exactly one.
    Non-zero centres are honoured (offset ``= t + c - M c``).

    Args:
        path: the ITK text file.

    Returns:
        ``(4, 4)`` float64 ``moving_from_fixed`` in world RAS mm (``F A_LPS F``): maps a FIXED
        point to the MOVING point, as ITK resampling uses it.

    Raises:
        ImageIOError: missing file, not an ITK transform file, unsupported or several transforms,
            malformed numbers.
    """
    p, text = read_text(path, "an ITK transform file (.tfm/.txt)")
    with reading(p, "an ITK transform file"):
        transforms = _parse_itk_text(p, text)
        if transforms and transforms[0]["type"].startswith("CompositeTransform"):
            if transforms[0]["Parameters"]:
                raise ValueError("composite transform with parameters of its own")
            transforms = transforms[1:]
            if len(transforms) != 1:
                raise ImageIOError(f"{p}: composite transform holds {len(transforms)} transforms; "
                                   "keyreg reads exactly one linear transform")
        if len(transforms) != 1:
            raise ImageIOError(f"{p}: holds {len(transforms)} transforms; keyreg reads exactly one "
                               "linear transform")
        tr = transforms[0]
        if tr["Parameters"] is None:
            raise ValueError(f"{tr['type']} has no 'Parameters:' line")
        a_lps = itk_linear_to_matrix(tr["type"], tr["Parameters"], tr["FixedParameters"] or [])
    return LPS_FROM_RAS @ a_lps @ LPS_FROM_RAS
