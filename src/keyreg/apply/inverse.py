"""Inverting saved transforms: exact for matrices, a swapped-keypoint refit for a TPS, a numerical
inverse sampled on a grid otherwise, each with how good it is."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError, ImageContentError
from ..formats.tps import tps_from_dict
from ..geometry import apply_affine, voxel_grid
from ..io import Volume, read_grid
from ..transforms import AffineTransform, DisplacementField, ThinPlateSpline
from ..transforms.field import coarse_grid_affine
from ..transforms.invert import invert_on_grid as _invert_on_grid
from .saved import SavedTransform, Transform, as_saved

__all__ = ["InverseResult", "inverse_matrix", "invert_on_grid", "invert_saved_transform"]


def inverse_matrix(matrix: torch.Tensor, where: str) -> torch.Tensor:
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
            approximate), ``fixed_point`` (numerical inverse sampled on a grid) or ``stored`` (the
            ``inverse_warp.nii.gz`` of a refined align: ``exp(-v)`` integrated with the refinement).
        residual_max_mm, residual_mean_mm: ``|T(S(q)) - q|`` over the evaluation points ``q``
            (0 for ``exact``).  For a displacement field, points whose inverse falls within one
            voxel of the field's border or beyond (where ``u`` drops to 0 and no inverse exists),
            or whose iteration went there and did not converge, are counted apart, in ``excluded``
            and ``excluded_max_mm``.
        points: number of evaluation points.
        fixed_grid, moving_grid: grids of the inverse (the original moving and fixed grids).
        tps: the ``tps.json`` document of a swapped-keypoint TPS.
    """

    transform: Transform
    method: Literal["exact", "swapped_keypoints", "fixed_point", "stored"]
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
    * a refined align directory (``keyreg.refine``; not linear): its stored ``inverse_warp.nii.gz``
      (unless ``method="field"`` or another ``grid`` is asked for), with the residual measured on its
      grid (sub-sampled; points whose inverse leaves the forward field's grid counted apart).

    Args:
        grid: grid of the original MOVING space for the numerical inverse (path or Volume).
        iterations, tolerance: of the fixed-point iteration (tolerance in mm).
    """
    st = as_saved(saved)
    if method not in ("auto", "swap", "field"):
        raise ConfigError(f"unknown inversion method {method!r}: use auto, swap or field")
    moving_grid = read_grid(grid) if grid is not None else st.moving_grid
    if isinstance(st.transform, AffineTransform):
        inv = AffineTransform(inverse_matrix(st.transform.matrix, str(st.path)))
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
    if st.inverse_path is not None and method != "field" and grid is None:
        return _stored_inverse(st)
    target = moving_grid if moving_grid is not None else st.fixed_grid if st.format == "field" else None
    if target is None:
        raise ConfigError(f"{st.path}: a numerical inverse needs the grid of the moving image; pass --moving")
    inv_field, residual, off_field = _invert_on_grid(st.transform, target.shape, target.affine,
                                                     iterations=iterations, tolerance=tolerance, track_domain=True)
    inside = ~off_field
    kept, out = residual[inside], residual[~inside]
    return InverseResult(inv_field, "fixed_point", float(kept.max(initial=0.0)), float(kept.mean()) if kept.size else 0.0,
                         int(kept.size), fixed_grid=target, moving_grid=st.fixed_grid,
                         excluded=int(out.size), excluded_max_mm=float(out.max(initial=0.0)))


def _stored_inverse(st: SavedTransform) -> InverseResult:
    """The stored inverse of a refined align and its residual ``|T(S(q)) - q|`` on its grid (at most
    24 points per axis)."""
    from ..formats import field_from_displacement, read_displacement_field
    from ..io import grid_volume

    assert st.inverse_path is not None
    u, aff = read_displacement_field(st.inverse_path)
    inv = field_from_displacement(u, aff)
    grid = grid_volume(u.shape[:3], aff, "moving")
    q = _lattice(grid, np.zeros((0, 3)))
    p = inv.map_points(q.to(inv.displacement.dtype)).double()
    residual = (st.transform.map_points(p.to(torch.float32)).double() - q).norm(dim=-1)[0].numpy()
    inside = np.ones(residual.shape, dtype=bool)
    if isinstance(st.transform, DisplacementField):  # no inverse where p leaves the forward field's grid
        inside = st.transform.interior(p)[0].numpy()
    kept, out = residual[inside], residual[~inside]
    return InverseResult(inv, "stored", float(kept.max(initial=0.0)), float(kept.mean()) if kept.size else 0.0,
                         int(kept.size), fixed_grid=grid, moving_grid=st.fixed_grid, excluded=int(out.size),
                         excluded_max_mm=float(out.max(initial=0.0)))

