"""FreeSurfer linear transform arrays (``.lta``).

Convention: an LTA maps its SRC volume to its DST volume.  keyreg writes src = the MOVING image and
dst = the FIXED image with type 1 (``LINEAR_RAS_TO_RAS``), so the stored matrix is
``fixed_from_moving`` in scanner RAS mm: the INVERSE of keyreg's ``moving_from_fixed`` matrix (the
FreeSurfer / mri_vol2vol convention).  Each geometry block describes a grid: ``volume`` (dims),
``voxelsize`` (mm), ``xras/yras/zras`` (unit RAS directions of the voxel axes i, j, k) and ``cras``
(RAS of voxel ``dims / 2``), so ``vox2ras = [Mdc diag(vs) | cras - Mdc diag(vs) dims / 2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import ImageIOError, ShapeError
from ..geometry import voxel_sizes
from ..io import check_affine, is_valid_affine
from ._common import PathLike, as_matrix, check_transform_matrix, fmt, one_line, read_text, reading

__all__ = ["write_lta", "read_lta", "read_lta_file", "LtaFile", "LtaGrid", "lta_geometry_block", "LINEAR_VOX_TO_VOX", "LINEAR_RAS_TO_RAS"]

LINEAR_VOX_TO_VOX = 0
LINEAR_RAS_TO_RAS = 1
_TYPE_NAMES = {0: "LINEAR_VOX_TO_VOX", 1: "LINEAR_RAS_TO_RAS", 2: "LINEAR_PHYSVOX_TO_PHYSVOX",
               14: "REGISTER_DAT", 21: "LINEAR_COR_TO_COR"}


def _geometry(shape: Sequence[int], affine, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dims = np.asarray([int(s) for s in tuple(shape)[:3]], dtype=np.float64)
    if dims.size != 3 or np.any(dims < 1):
        raise ShapeError(f"{name}: shape must give three positive sizes, got {tuple(shape)}")
    a = check_affine(affine, name, ShapeError)
    vs = voxel_sizes(a)
    mdc = a[:3, :3] / vs
    cras = a[:3, :3] @ (dims / 2) + a[:3, 3]
    return dims, vs, mdc, cras


def lta_geometry_block(shape: Sequence[int], affine, filename: str = "") -> str:
    """The 8-line LTA volume-info block of a grid (without the ``src/dst volume info`` title).

    Args:
        shape: ``(X, Y, Z)`` voxels.
        affine: ``(4, 4)`` RAS world-from-voxel affine (nibabel).
        filename: the volume's name, written on the ``filename`` line.

    Returns:
        Text whose ``cras`` is ``affine @ (shape / 2)`` (FreeSurfer's centre, ``N / 2``).
    """
    dims, vs, mdc, cras = _geometry(shape, affine, "geometry")
    name = one_line(filename).strip()
    return (
        "valid = 1  # volume info valid\n"
        f"filename = {name}\n"
        f"volume = {int(dims[0])} {int(dims[1])} {int(dims[2])}\n"
        f"voxelsize = {' '.join(fmt(v) for v in vs)}\n"
        f"xras   = {' '.join(fmt(v) for v in mdc[:, 0])}\n"
        f"yras   = {' '.join(fmt(v) for v in mdc[:, 1])}\n"
        f"zras   = {' '.join(fmt(v) for v in mdc[:, 2])}\n"
        f"cras   = {' '.join(fmt(v) for v in cras)}\n"
    )


def _named(name: str) -> str:
    return f" ({one_line(name)})" if name else ""


def write_lta(path: PathLike, matrix, moving_shape: Sequence[int], moving_affine,
              fixed_shape: Sequence[int], fixed_affine, moving_name: str = "",
              fixed_name: str = "") -> Path:
    """Write a keyreg matrix as a FreeSurfer LTA (type 1, ``LINEAR_RAS_TO_RAS``), atomically.

    Args:
        path: output ``.lta`` file (mri_vol2vol insists on that extension).
        matrix: ``(4, 4)`` keyreg ``moving_from_fixed``, world RAS mm (fixed point -> moving point).
        moving_shape, moving_affine: grid of the moving image (the LTA's src volume).
        fixed_shape, fixed_affine: grid of the fixed image (the LTA's dst volume).
        moving_name, fixed_name: written on the ``filename`` lines.

    Returns:
        ``path``.  The file's matrix is ``inv(matrix)``: moving RAS -> fixed RAS (src -> dst).
    """
    m = as_matrix(matrix)
    try:
        lta = np.linalg.inv(m)
    except np.linalg.LinAlgError:
        raise ShapeError("matrix is singular; an LTA stores its inverse") from None
    src = lta_geometry_block(moving_shape, moving_affine, moving_name)
    dst = lta_geometry_block(fixed_shape, fixed_affine, fixed_name)
    rows = "".join(" ".join(fmt(v) for v in row) + "\n" for row in lta)
    text = (
        f"# transform file {one_line(Path(path).name)}\n"
        f"# created by keyreg: maps src RAS mm{_named(moving_name)} to dst RAS mm{_named(fixed_name)}\n"
        f"type      = {LINEAR_RAS_TO_RAS} # LINEAR_RAS_TO_RAS\n"
        "nxforms   = 1\n"
        "mean      = 0.0000 0.0000 0.0000\n"
        "sigma     = 1.0000\n"
        "1 4 4\n"
        f"{rows}"
        "src volume info\n"
        f"{src}"
        "dst volume info\n"
        f"{dst}"
    )
    return atomic_write_text(path, text)


def _parse_block(lines: list[str], start: int) -> tuple[dict, int]:
    """Parse ``key = value`` lines of one volume-info block; returns (fields, next line index)."""
    info: dict = {}
    i = start
    keys = ("valid", "filename", "volume", "voxelsize", "xras", "yras", "zras", "cras")
    while i < len(lines):
        key, sep, value = lines[i].partition("=")
        key = key.strip()
        key = "cras" if key == "c_ras" else key
        if not sep or key not in keys:
            break
        info[key] = value.split("#", 1)[0].strip() if key != "filename" else value.strip()
        i += 1
    return info, i


def _block_affine(info: dict) -> np.ndarray | None:
    """vox2ras of a geometry block, or ``None`` when it is marked invalid or incomplete."""
    try:
        if int(info.get("valid", "0")) != 1:
            return None
        dims = np.array([float(v) for v in info["volume"].split()])
        vs = np.array([float(v) for v in info["voxelsize"].split()])
        mdc = np.array([[float(v) for v in info[k].split()] for k in ("xras", "yras", "zras")]).T
        cras = np.array([float(v) for v in info["cras"].split()])
    except (KeyError, ValueError):
        return None
    if dims.shape != (3,) or vs.shape != (3,) or mdc.shape != (3, 3) or cras.shape != (3,):
        return None
    a = np.eye(4)
    a[:3, :3] = mdc * vs
    a[:3, 3] = cras - a[:3, :3] @ (dims / 2)
    if np.any(dims < 1) or not is_valid_affine(a):
        return None
    return a


@dataclass
class LtaGrid:
    """The geometry of one volume recorded in an LTA: ``shape`` ``(I, J, K)``, RAS ``affine``, ``name``."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    name: str


@dataclass
class LtaFile:
    """An LTA read for keyreg: the ``moving_from_fixed`` matrix and the recorded grids (dst = fixed,
    src = moving; ``None`` where marked invalid or absent)."""

    matrix: np.ndarray
    fixed_grid: LtaGrid | None
    moving_grid: LtaGrid | None


def _grid(info: dict, name: str) -> LtaGrid | None:
    aff = _block_affine(info) if info else None
    if aff is None:
        return None
    try:
        dims = tuple(int(round(float(v))) for v in info["volume"].split())
    except (KeyError, ValueError):
        return None
    if len(dims) != 3 or min(dims) < 2:
        return None
    return LtaGrid(dims, aff, info.get("filename") or name)  # type: ignore[arg-type]


def read_lta(path: PathLike) -> np.ndarray:
    """Read a FreeSurfer LTA as a keyreg matrix (:func:`read_lta_file` also gives the grids).

    Handles type 1 (``LINEAR_RAS_TO_RAS``) and type 0 (``LINEAR_VOX_TO_VOX``, converted with the
    geometry blocks: ``R = A_dst V inv(A_src)``).  The LTA maps src -> dst; keyreg assumes
    src = moving and dst = fixed (FreeSurfer's convention) and returns the inverse.

    Args:
        path: the ``.lta`` file.

    Returns:
        ``(4, 4)`` float64 ``moving_from_fixed``, world RAS mm: ``inv(R)``.

    Raises:
        ImageIOError: missing or malformed file, another type, more than one transform, a singular
            matrix, or invalid src/dst geometry for a type-0 file.
    """
    return read_lta_file(path).matrix


def read_lta_file(path: PathLike) -> LtaFile:
    """Read a FreeSurfer LTA: the ``moving_from_fixed`` matrix (as :func:`read_lta`) and the grids of
    its dst (fixed) and src (moving) volumes, for ``keyreg apply`` / ``invert``.

    Raises:
        ImageIOError: as :func:`read_lta`.
    """
    p, text = read_text(path, "a FreeSurfer LTA file")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    with reading(p, "a FreeSurfer LTA file"):
        fields: dict[str, str] = {}
        matrix = None
        blocks: dict[str, dict] = {}
        i = 0
        while i < len(lines):
            ln = lines[i]
            words = ln.split("#", 1)[0].split()
            if ln.startswith(("src volume info", "dst volume info")):
                blocks[ln[:3]], i = _parse_block(lines, i + 1)
                continue
            if "=" in ln:
                key, _, value = ln.partition("=")
                fields[key.strip()] = value.split("#", 1)[0].strip()
            elif len(words) == 3 and all(w.isdigit() for w in words):
                if matrix is not None:
                    raise ImageIOError(f"{p}: LTA holds more than one matrix; keyreg reads exactly one transform")
                n, r, c = (int(w) for w in words)
                if n < 1 or (r, c) != (4, 4):
                    raise ValueError(f"unexpected matrix size line {ln!r}")
                rows = []
                for k in range(4):
                    row = lines[i + 1 + k].split() if i + 1 + k < len(lines) else []
                    try:
                        rows.append([float(v) for v in row])
                    except ValueError:
                        rows.append([])
                    if len(rows[-1]) != 4:
                        raise ImageIOError(f"{p}: LTA matrix row {k + 1} is not 4 numbers: {' '.join(row)[:80]!r}")
                matrix = np.array(rows, dtype=np.float64)
                if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
                    raise ValueError(f"matrix bottom row is {matrix[3].tolist()}, expected 0 0 0 1")
                i += 4
            i += 1
        if "type" not in fields:
            raise ImageIOError(f"{p}: not a FreeSurfer LTA file (no 'type =' line)")
        if fields.get("nxforms", "1") != "1":
            raise ImageIOError(f"{p}: LTA has nxforms = {fields['nxforms'][:40]}; keyreg reads exactly one "
                               "transform (nxforms = 1)")
        if matrix is None:
            raise ImageIOError(f"{p}: LTA has no '1 4 4' matrix")
        kind = int(fields["type"])
        if not np.all(np.isfinite(matrix)):
            raise ImageIOError(f"{p}: LTA matrix contains NaN or Inf")
        if kind == LINEAR_VOX_TO_VOX:
            a_src = _block_affine(blocks.get("src", {}))
            a_dst = _block_affine(blocks.get("dst", {}))
            if a_src is None or a_dst is None:
                bad = " and ".join(n for n, a in (("src", a_src), ("dst", a_dst)) if a is None)
                raise ImageIOError(f"{p}: type 0 (voxel to voxel) LTA needs valid src and dst geometry; "
                                   f"{bad} geometry is missing or invalid")
            ras = a_dst @ matrix @ np.linalg.inv(a_src)
        elif kind == LINEAR_RAS_TO_RAS:
            ras = matrix
        else:
            name = _TYPE_NAMES.get(kind, "unknown")
            raise ImageIOError(f"{p}: LTA type {kind} ({name}) is not supported; keyreg reads types "
                               "0 (LINEAR_VOX_TO_VOX) and 1 (LINEAR_RAS_TO_RAS)")
        check_transform_matrix(ras, f"{p}: LTA")
        out = np.linalg.inv(ras)
        out[3] = [0.0, 0.0, 0.0, 1.0]
    return LtaFile(out, _grid(blocks.get("dst", {}), "dst"), _grid(blocks.get("src", {}), "src"))
