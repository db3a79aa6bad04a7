"""Saved transforms: read one from any supported file (or an align output directory of
``keyreg register``) with the image grids recorded next to it, and compose several into one map."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError, ImageIOError
from ..formats import field_from_displacement, load_transform, read_displacement_field, transform_format
from ..formats._common import reading
from ..formats.lta import read_lta_file
from ..formats.tps import read_tps_json
from ..io import Volume, grid_volume, is_nifti_path, read_grid
from ..transforms import AffineTransform, DisplacementField, ThinPlateSpline
from ..transforms.compose import ComposedTransform, compose_transforms

__all__ = ["TransformFormat", "Transform", "ALIGN_DIR_FILES", "SavedTransform", "load_saved_transform", "as_saved",
           "compose", "resolve_reference"]

TransformFormat = Literal["matrix", "itk", "ants", "lta", "field", "tps"]
Transform = AffineTransform | ThinPlateSpline | DisplacementField

#: Files looked for, in this order, in an align output directory (``keyreg register`` outputs).
ALIGN_DIR_FILES = ("tps.json", "transform_matrix.txt", "transform.tfm", "transform_0GenericAffine.mat",
                   "transform.lta", "warp.nii.gz")


@dataclass
class SavedTransform:
    """A transform read from disk, with the grids recorded next to it.

    Attributes:
        transform: ``moving_from_fixed``, batch 1, on the CPU (matrices float64).
        path: the file (or align directory) it was read from.
        format: ``matrix`` / ``itk`` / ``ants`` / ``lta`` (linear), ``field`` or ``tps``.
        fixed_grid: the fixed image's grid when the file records it (a field's own grid, an LTA's
            dst volume, the ``fixed_grid`` of a ``tps.json``, the warped image of an align
            directory): the default output grid.  Geometry-only :class:`Volume`.
        moving_grid: the moving image's grid when recorded (LTA src, ``tps.json``).
        tps: the ``tps.json`` document of a TPS (keypoint pairs, lambda, normalisation).
        inverse_path: the stored inverse of a refined align directory (``inverse_warp.nii.gz``, a
            displacement field on the moving grid), used by :func:`~keyreg.apply.invert_saved_transform`.
    """

    transform: Transform
    path: Path
    format: TransformFormat
    fixed_grid: Volume | None = None
    moving_grid: Volume | None = None
    tps: dict[str, Any] | None = field(default=None, repr=False)
    inverse_path: Path | None = None

    @property
    def is_linear(self) -> bool:
        return isinstance(self.transform, AffineTransform)

    @property
    def matrix(self) -> np.ndarray | None:
        """``(4, 4)`` float64 RAS matrix (fixed -> moving) of a linear transform, else ``None``."""
        if isinstance(self.transform, AffineTransform):
            return self.transform.matrix[0].detach().cpu().double().numpy()
        return None



def _grid_from_doc(doc: Any, name: str) -> Volume | None:
    if not isinstance(doc, dict) or "shape" not in doc or "affine" not in doc:
        return None
    return grid_volume(doc["shape"], np.asarray(doc["affine"], dtype=np.float64), str(doc.get("name") or name))


def _load_tps_json(p: Path) -> SavedTransform:
    tps, doc = read_tps_json(p)
    with reading(p, "a keyreg tps.json file"):
        grids = (_grid_from_doc(doc.get("fixed_grid"), "fixed"), _grid_from_doc(doc.get("moving_grid"), "moving"))
    return SavedTransform(tps, p, "tps", *grids, tps=doc)


def _lta_grids(p: Path) -> tuple[Volume | None, Volume | None]:
    """``(fixed, moving)`` = (dst, src) grids of an LTA file, ``None`` where invalid or absent."""
    lta = read_lta_file(p)
    return tuple(None if g is None else grid_volume(g.shape, g.affine, g.name)  # type: ignore[return-value]
                 for g in (lta.fixed_grid, lta.moving_grid))


def _load_align_dir(d: Path) -> SavedTransform:
    found = next((d / n for n in ALIGN_DIR_FILES if (d / n).is_file()), None)
    if found is None:
        raise ImageIOError(f"{d}: not a keyreg align output directory (it has none of {', '.join(ALIGN_DIR_FILES)})")
    st = load_saved_transform(found)
    if (d / "transform.lta").is_file() and (st.fixed_grid is None or st.moving_grid is None):
        f, m = _lta_grids(d / "transform.lta")
        st.fixed_grid, st.moving_grid = st.fixed_grid or f, st.moving_grid or m
    for name in ("warped.nii.gz", "warp.nii.gz"):
        if st.fixed_grid is None and (d / name).is_file():
            st.fixed_grid = read_grid(d / name, name="fixed")
    if (d / "inverse_warp.nii.gz").is_file():  # a refined align (keyreg.refine): its inverse, on the moving grid
        st.inverse_path = d / "inverse_warp.nii.gz"
    return st


def load_saved_transform(path: str | os.PathLike) -> SavedTransform:
    """Read a transform saved by keyreg or another tool.

    Args:
        path: a 4x4 matrix ``.txt``, an ITK ``.tfm`` / ``.txt``, an ANTs ``.mat``, a FreeSurfer
            ``.lta``, an ITK/ANTs displacement field ``.nii[.gz]``, a keyreg ``tps.json``, or an
            align output directory of ``keyreg register`` (its ``tps.json`` or matrix is used).

    Returns:
        A :class:`SavedTransform` (``moving_from_fixed``, world RAS mm).

    Raises:
        ImageIOError: missing, unreadable or malformed file.  ConfigError: unknown file type.
    """
    p = Path(path)
    if not p.exists():
        raise ImageIOError(f"{p}: transform file does not exist")
    if p.is_dir():
        return _load_align_dir(p)
    if p.name.lower().endswith(".json"):
        return _load_tps_json(p)
    if is_nifti_path(p):
        u, aff = read_displacement_field(p)
        return SavedTransform(field_from_displacement(u, aff), p, "field",
                              fixed_grid=grid_volume(u.shape[:3], aff, "fixed"))
    try:
        fmt = transform_format(p, for_reading=True)
    except ConfigError:
        raise ConfigError(f"{p}: unknown transform file type (use a 4x4 matrix .txt, ITK .tfm/.txt, ANTs .mat, "
                          "FreeSurfer .lta, a displacement field .nii.gz, a tps.json or an align directory)") from None
    if fmt == "lta":  # one read: the matrix and both recorded grids
        lta = read_lta_file(p)
        st = SavedTransform(AffineTransform(torch.from_numpy(lta.matrix)[None]), p, "lta")
        st.fixed_grid, st.moving_grid = (None if g is None else grid_volume(g.shape, g.affine, g.name)
                                         for g in (lta.fixed_grid, lta.moving_grid))
        return st
    matrix = load_transform(p, fmt=fmt)
    return SavedTransform(AffineTransform(torch.from_numpy(matrix)[None]), p, fmt)  # type: ignore[arg-type]


def as_saved(t: Any) -> SavedTransform:
    if isinstance(t, SavedTransform):
        return t
    if isinstance(t, (str, os.PathLike)):
        return load_saved_transform(t)
    if isinstance(t, (AffineTransform, ThinPlateSpline, DisplacementField)):
        return SavedTransform(t, Path("<memory>"), "tps" if isinstance(t, ThinPlateSpline) else
                              "field" if isinstance(t, DisplacementField) else "matrix")
    raise ConfigError(f"not a transform: {type(t).__name__}")


# -------------------------------------------------------------------------------------- composition

def compose(transforms: Sequence[Any]) -> Transform | ComposedTransform:
    """One map from ``[T1, ..., Tn]`` (saved transforms, paths or transform objects): ``T1 o ... o Tn``.

    Consecutive linear transforms are multiplied (float64) so a chain of matrices stays one exact
    matrix; a single transform is returned as is.
    """
    parts = [as_saved(t).transform for t in transforms]
    if not parts:
        raise ConfigError("no transform given")
    return compose_transforms(parts)


def resolve_reference(reference: Any, transforms: Sequence[SavedTransform]) -> Volume:
    """The output grid: ``reference`` (a NIfTI path or a :class:`Volume`) or, by default, the fixed
    grid recorded with the LAST transform (the one a reference point meets first)."""
    if reference is not None:
        return read_grid(reference)
    last = transforms[-1]
    if last.fixed_grid is None:
        raise ConfigError(f"{last.path}: this transform file does not record the fixed image's grid; "
                          "pass --reference (an image on the output grid)")
    return last.fixed_grid
