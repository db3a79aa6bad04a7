"""Apply and invert saved transforms: the Python API behind ``keyreg apply`` and ``keyreg invert``.

Direction (``docs/conventions.md``): every stored transform is ``moving_from_fixed``: it maps a point
``p`` of the FIXED space (world RAS mm) to the matching point ``T(p)`` of the MOVING space.

* Images and label maps are *pulled*: ``out(p) = x(T(p))`` for every voxel centre ``p`` of the
  reference (fixed) grid; ``x`` lives in the moving space.
* Points go the other way: a point ``q`` of the moving space lands in the fixed space at ``T^-1(q)``
  (exact for linear transforms, Newton iterations otherwise, with the residual ``|T(p) - q|``
  returned).  That is what keeps a landmark on the same anatomy as the warped image.
  ``direction="fixed_to_moving"`` applies ``T`` itself.

Several transforms ``[T1, T2, ..., Tn]`` are composed into one map ``T = T1 o T2 o ... o Tn``: a
reference point goes through ``Tn`` first and ``T1`` last, and the input is resampled once,
``out(p) = x(T1(T2(...Tn(p))))``.  This is the order of ``antsApplyTransforms -t T1 -t T2`` and of
SimpleITK's ``CompositeTransform([T1, T2])``: list the transform nearest the moving image first,
e.g. ``[affine, field]`` for an affine registration followed by a deformable one computed from the
affinely aligned image.  Consecutive linear transforms are multiplied into one matrix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import ConfigError, ImageContentError, ImageIOError, ShapeError
from .formats import (field_from_displacement, load_transform, read_displacement_field, save_transform,
                      transform_format, write_displacement_field)
from .formats._common import as_points, reading
from .formats.lta import read_lta_file
from .formats.tps import read_tps_json, tps_from_dict
from .geometry import apply_affine, as_affine_tensor, voxel_grid
from .io import Volume, atomic_write_text, grid_volume, is_nifti_path, load_volume, read_grid
from .transforms import AffineTransform, DisplacementField, ThinPlateSpline, map_to_fixed
from .transforms.compose import ComposedTransform, compose_transforms
from .transforms.invert import invert_on_grid as _invert_on_grid
from .transforms.invert import voxel_indices as _voxel_indices
from .transforms.field import coarse_grid_affine

__all__ = [
    "SavedTransform",
    "ComposedTransform",
    "InverseResult",
    "load_saved_transform",
    "tps_from_dict",
    "compose",
    "resolve_reference",
    "apply_transform",
    "transform_points",
    "invert_on_grid",
    "invert_saved_transform",
    "save_inverse",
]

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
    """

    transform: Transform
    path: Path
    format: TransformFormat
    fixed_grid: Volume | None = None
    moving_grid: Volume | None = None
    tps: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.transform, AffineTransform)

    @property
    def matrix(self) -> np.ndarray | None:
        """``(4, 4)`` float64 RAS matrix (fixed -> moving) of a linear transform, else ``None``."""
        if isinstance(self.transform, AffineTransform):
            return self.transform.matrix[0].detach().cpu().double().numpy()
        return None


# ------------------------------------------------------------------------------------------ loading

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


def _as_saved(t: Any) -> SavedTransform:
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
    parts = [_as_saved(t).transform for t in transforms]
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


# ------------------------------------------------------------------------------------------- apply

def apply_transform(
    source: Any,
    transforms: Sequence[Any],
    *,
    kind: Literal["image", "labels"] = "image",
    interp: str | None = None,
    reference: Any = None,
    device: torch.device | str | None = None,
    pad_value: float | None = None,
) -> Volume:
    """Resample an image or label map of the moving space onto a reference grid, in one pass.

    Args:
        source: the image or label map, in the MOVING space of ``transforms[0]`` (path, nibabel
            image, :class:`Volume`, ``(array, affine)``); any grid.
        transforms: ``[T1, ..., Tn]`` (:class:`SavedTransform`, paths or transform objects, each
            ``moving_from_fixed``), composed as ``T1 o ... o Tn`` (see the module docstring).
        kind: ``"image"`` or ``"labels"`` (integer ids, never blended; any size of id is exact).
        interp: images ``linear`` (default) / ``cubic`` / ``nearest``; labels ``nearest``
            (default) / ``labelwise``.
        reference: output grid (NIfTI path or :class:`Volume`); default: the fixed grid recorded
            with ``transforms[-1]``.
        device: where to resample (default CPU).
        pad_value: image intensity outside the source (default: 0, or the source's minimum when
            it is negative, e.g. CT air); label maps get 0.

    Returns:
        A :class:`Volume` ``(I, J, K)`` on the reference grid (float32 image or int64 labels),
        carrying the reference's header: ``out(p) = source(T(p))``, 0 outside the source.
    """
    from .pipeline import resolve_device
    from .results import image_interp, label_interp, warp_volume

    mode = label_interp(interp) if kind == "labels" else image_interp(interp)
    dev = resolve_device(device or "cpu")
    saved = [_as_saved(t) for t in transforms]
    if not saved:
        raise ConfigError("no transform given")
    ref = resolve_reference(reference, saved)
    vol = load_volume(source, kind=kind)
    t = compose(saved).to(dev)
    return warp_volume(vol, ref, t, kind=kind, interp=mode, pad_value=pad_value, device=dev)


def transform_points(
    points: Any,
    transforms: Sequence[Any],
    *,
    direction: Literal["moving_to_fixed", "fixed_to_moving"] = "moving_to_fixed",
    iterations: int = 50,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Map world points through the composition ``T = T1 o ... o Tn`` (``moving_from_fixed``).

    Args:
        points: ``(N, 3)`` world RAS mm.
        transforms: as in :func:`apply_transform`.
        direction: ``"moving_to_fixed"`` (default): points of the moving space go to the fixed space
            through ``T^-1`` — the *inverse* of the direction images are pulled in, so a landmark
            follows its anatomy into the warped image.  ``"fixed_to_moving"``: ``T`` itself.
        iterations, tolerance: Newton iterations and stopping residual (mm) of the numerical
            inverse (nonlinear transforms only; linear ones are inverted exactly).

    Returns:
        ``(mapped, residual)``: ``(N, 3)`` float64 world RAS mm and ``(N,)`` mm; the residual is
        ``|T(mapped) - points|`` for ``moving_to_fixed`` (the accuracy of the inverse; rounding
        only for linear transforms) and zeros for ``fixed_to_moving``.
    """
    pts = torch.from_numpy(as_points(points)).unsqueeze(0)
    t = compose(transforms)
    if direction == "fixed_to_moving":
        return t.map_points(pts)[0].double().numpy(), np.zeros(len(pts[0]))
    if direction != "moving_to_fixed":
        raise ConfigError(f"direction must be moving_to_fixed or fixed_to_moving, got {direction!r}")
    if len(pts[0]) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    if isinstance(t, AffineTransform):
        _inverse_matrix(t.matrix, "the composed transform")  # singular: one line naming the transform
    p, residual = map_to_fixed(t, pts, iterations=iterations, tolerance=tolerance)
    return p[0].double().numpy(), residual[0].numpy()


# ------------------------------------------------------------------------------------------- invert

def _inverse_matrix(matrix: torch.Tensor, where: str) -> torch.Tensor:
    """Inverse of ``(1, 4, 4)`` matrices; :class:`ImageContentError` if singular."""
    m = matrix.double()
    if float(torch.linalg.det(m[:, :3, :3]).abs().min()) < 1e-12:
        raise ImageContentError(f"{where}: the matrix is singular, it has no inverse")
    return torch.linalg.inv(m)


def invert_on_grid(
    transform: Any,
    grid: Volume,
    *,
    iterations: int = 50,
    tolerance: float = 1e-3,
    slab_points: int = 1 << 18,
) -> tuple[DisplacementField, np.ndarray]:
    """Numerical inverse of ``T`` as a displacement field on ``grid`` (a grid of the MOVING space):
    :func:`keyreg.transforms.invert.invert_on_grid` on the grid's shape and affine."""
    return _invert_on_grid(transform, grid.shape, grid.affine, iterations=iterations, tolerance=tolerance,
                           slab_points=slab_points)


@dataclass
class InverseResult:
    """An inverse transform (``moving_from_fixed`` of the swapped pair: it maps points of the original
    MOVING space to the original FIXED space) and how good it is.

    Attributes:
        transform: the inverse.
        method: ``exact`` (linear), ``swapped_keypoints`` (TPS refit from moving to fixed keypoints:
            approximate) or ``fixed_point`` (numerical inverse sampled on a grid).
        residual_max_mm, residual_mean_mm: ``|T(S(q)) - q|`` over the evaluation points ``q``
            (0 for ``exact``).  For a displacement field, points whose inverse falls within one
            voxel of the field's border or beyond (where ``u`` drops to 0 and no inverse exists)
            are counted apart, in ``excluded`` and ``excluded_max_mm``.
        points: number of evaluation points.
        fixed_grid, moving_grid: grids of the inverse (the original moving and fixed grids).
        tps: the ``tps.json`` document of a swapped-keypoint TPS.
    """

    transform: Transform
    method: Literal["exact", "swapped_keypoints", "fixed_point"]
    residual_max_mm: float = 0.0
    residual_mean_mm: float = 0.0
    points: int = 0
    fixed_grid: Volume | None = None
    moving_grid: Volume | None = None
    tps: dict[str, Any] | None = field(default=None, repr=False)
    excluded: int = 0
    excluded_max_mm: float = 0.0

    @property
    def exact(self) -> bool:
        return self.method == "exact"


def _lattice(grid: Volume | None, points: np.ndarray, max_side: int = 24) -> torch.Tensor:
    """``(1, M, 3)`` world points on which to measure an inverse: ``grid`` sub-sampled to at most
    ``max_side`` points per axis, else a ``max_side``^3 lattice over the points' bounding box."""
    if grid is not None:
        stride = max(1, math.ceil((max(grid.shape) - 1) / (max_side - 1)))
        coarse, aff = coarse_grid_affine(grid.shape, grid.affine, stride)
        return apply_affine(aff, voxel_grid(coarse).reshape(1, -1, 3))
    lo, hi = points.min(0), points.max(0)
    axes = [torch.linspace(a, b, max_side, dtype=torch.float64) for a, b in zip(lo, hi)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)


def invert_saved_transform(
    saved: SavedTransform | str | os.PathLike,
    *,
    method: Literal["auto", "swap", "field"] = "auto",
    grid: Any = None,
    iterations: int = 50,
    tolerance: float = 1e-3,
) -> InverseResult:
    """Invert a saved transform.

    * rigid / affine: the exact inverse matrix (any ``method``).
    * TPS, ``method="swap"`` (default for TPS): refit the TPS with fixed and moving keypoints
      swapped (same lambda, weights and normalisation).  This is only approximately ``T^-1``
      (exact at the keypoints for lambda 0); the residual ``|T(S(q)) - q|`` is measured on the
      moving grid (sub-sampled) or, without one, on a lattice over the moving keypoints.
    * displacement field (or TPS with ``method="field"``): :func:`invert_on_grid`, on ``grid``
      (default: the recorded moving grid, else the field's own grid); residual over every voxel.

    Args:
        grid: grid of the original MOVING space for the numerical inverse (path or Volume).
        iterations, tolerance: of the fixed-point iteration (tolerance in mm).
    """
    st = _as_saved(saved)
    if method not in ("auto", "swap", "field"):
        raise ConfigError(f"unknown inversion method {method!r}: use auto, swap or field")
    moving_grid = read_grid(grid) if grid is not None else st.moving_grid
    if isinstance(st.transform, AffineTransform):
        inv = AffineTransform(_inverse_matrix(st.transform.matrix, str(st.path)))
        return InverseResult(inv, "exact", fixed_grid=moving_grid, moving_grid=st.fixed_grid)
    if isinstance(st.transform, ThinPlateSpline) and method in ("auto", "swap"):
        if st.tps is None:
            raise ConfigError("a swapped-keypoint inverse needs the TPS keypoints (a tps.json)")
        doc = dict(st.tps)
        doc["fixed_keypoints_ras"], doc["moving_keypoints_ras"] = st.tps["moving_keypoints_ras"], st.tps["fixed_keypoints_ras"]
        doc["fixed_grid"], doc["moving_grid"] = st.tps.get("moving_grid"), st.tps.get("fixed_grid")
        if grid is not None:
            doc["fixed_grid"] = {"name": moving_grid.name, "shape": list(moving_grid.shape),
                                 "affine": np.asarray(moving_grid.affine).tolist()}
        inv_tps = tps_from_dict(doc)
        q = _lattice(moving_grid, np.asarray(st.tps["moving_keypoints_ras"], dtype=np.float64))
        res = (st.transform.map_points(inv_tps.map_points(q)) - q).norm(dim=-1)[0]
        doc["approximate_inverse_of"] = str(st.path)
        doc["inverse_residual_mm"] = {"max": float(res.max()), "mean": float(res.mean()), "points": int(res.numel())}
        return InverseResult(inv_tps, "swapped_keypoints", float(res.max()), float(res.mean()), int(res.numel()),
                             fixed_grid=moving_grid, moving_grid=st.fixed_grid, tps=doc)
    target = moving_grid if moving_grid is not None else st.fixed_grid if st.format == "field" else None
    if target is None:
        raise ConfigError(f"{st.path}: a numerical inverse needs the grid of the moving image; pass --moving")
    inv_field, residual = invert_on_grid(st.transform, target, iterations=iterations, tolerance=tolerance)
    inside = _in_domain(st.transform, inv_field, target)
    kept, out = residual[inside], residual[~inside]
    return InverseResult(inv_field, "fixed_point", float(kept.max(initial=0.0)), float(kept.mean()) if kept.size else 0.0,
                         int(kept.size), fixed_grid=target, moving_grid=st.fixed_grid,
                         excluded=int(out.size), excluded_max_mm=float(out.max(initial=0.0)))


def _in_domain(transform: Any, inverse: DisplacementField, grid: Volume) -> np.ndarray:
    """``(I, J, K)``: where the inverse point ``q + v(q)`` lies at least one voxel inside the field's
    grid (everywhere for transforms defined in all of space)."""
    if not isinstance(transform, DisplacementField):
        return np.ones(grid.shape, dtype=bool)
    f = transform
    idx = _voxel_indices(grid.shape, 0, int(np.prod(grid.shape)))
    p = apply_affine(as_affine_tensor(grid.affine), idx) + inverse.displacement[0].reshape(3, -1).T.double()
    vox = apply_affine(torch.linalg.inv(f.grid_affine.double()), p)
    hi = torch.tensor(f.shape, dtype=torch.float64) - 2
    return ((vox >= 1) & (vox <= hi)).all(-1).reshape(grid.shape).numpy()


def _default_inverse_path(st: SavedTransform, inv: InverseResult) -> Path:
    if st.path.is_dir() or not st.path.exists():
        raise ConfigError(f"{st.path}: give the output file with -o")
    name = st.path.name
    if inv.method == "fixed_point":
        suffix = ".nii.gz"
    elif inv.method == "swapped_keypoints":
        suffix = ".json"
    else:
        suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else st.path.suffix
    stem = name[: -len(suffix)] if name.lower().endswith(suffix) else st.path.stem
    return st.path.with_name(f"{stem}_inverse{suffix}")


def save_inverse(inv: InverseResult, saved: SavedTransform, path: str | os.PathLike | None = None) -> Path:
    """Write an inverse; the file type follows ``path`` (default: ``<name>_inverse`` next to the input,
    in the input's format).

    * linear: ``.txt`` (the input's plain-matrix or ITK flavour; ITK for other inputs), ``.tfm``,
      ``.mat``, ``.lta`` (needs both grids) or ``.nii[.gz]`` (sampled as a displacement field);
    * swapped-keypoint TPS: ``.json`` (a ``tps.json`` with the residual) or ``.nii[.gz]``;
    * numerical inverse: ``.nii[.gz]`` (ITK/ANTs displacement field on its grid).

    Raises:
        ConfigError: a file type the inverse cannot be written as, or missing grids.
    """
    out = Path(path) if path is not None else _default_inverse_path(saved, inv)
    name = out.name.lower()
    if is_nifti_path(out):
        grid = inv.fixed_grid
        if grid is None:
            raise ConfigError(f"{out}: writing the inverse as a displacement field needs the moving image's grid; "
                              "pass --moving")
        t = inv.transform
        if not isinstance(t, DisplacementField) or t.shape != grid.shape:
            from .transforms import sample_field
            t = sample_field(t, grid.shape, grid.affine, stride=1, dtype=torch.float64)
        disp = t.displacement[0].permute(1, 2, 3, 0).float().numpy()
        return write_displacement_field(out, disp, grid.affine, header=grid.header)
    if inv.method == "swapped_keypoints":
        if not name.endswith(".json"):
            raise ConfigError(f"{out}: a TPS inverse is written as .json (tps.json) or .nii.gz (displacement field)")
        return atomic_write_text(out, json.dumps(inv.tps, indent=1) + "\n")
    if inv.method == "fixed_point":
        raise ConfigError(f"{out}: a numerical inverse is a displacement field: use a .nii.gz name")
    try:
        fmt = transform_format(out)
    except ConfigError:
        raise ConfigError(f"{out}: unknown output type (use .txt, .tfm, .mat, .lta or .nii.gz)") from None
    if name.endswith(".txt") and saved.format in ("matrix", "itk"):
        fmt = saved.format
    matrix = inv.transform.matrix[0].double().numpy()  # type: ignore[union-attr]
    if fmt == "lta":
        if inv.fixed_grid is None or inv.moving_grid is None:
            raise ConfigError(f"{out}: an LTA needs both image grids; pass --fixed and --moving")
        return save_transform(out, matrix, fmt="lta", moving_shape=inv.moving_grid.shape,
                              moving_affine=inv.moving_grid.affine, fixed_shape=inv.fixed_grid.shape,
                              fixed_affine=inv.fixed_grid.affine, moving_name=inv.moving_grid.name,
                              fixed_name=inv.fixed_grid.name)
    if fmt not in ("matrix", "itk", "ants"):
        raise ShapeError(f"unexpected format {fmt!r}")
    return save_transform(out, matrix, fmt=fmt)
