"""Numerical inverse of a transform at given points (for TPS and displacement fields)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .field import SpatialTransform

__all__ = ["invert_points", "map_to_fixed", "invert_on_grid", "voxel_indices"]


def invert_points(
    transform: SpatialTransform,
    points_moving: torch.Tensor,
    *,
    iterations: int = 30,
    tolerance: float = 1e-4,
    step: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``T(p) = q`` for ``p`` by Newton's method with a finite-difference Jacobian.

    Args:
        transform: ``moving_from_fixed``, mapping ``(B, M, 3)`` world points.
        points_moving: ``q``, ``(B, M, 3)`` world mm.
        iterations: at most this many Newton steps.
        tolerance: stop once every residual ``|T(p) - q|`` is below this (mm).
        step: finite-difference step (mm).

    Returns:
        ``(p, residual)``: fixed-space points ``(B, M, 3)`` and ``|T(p) - q|`` ``(B, M)`` in mm.
        The residual is the honest accuracy of the inverse; callers report it.
    """
    q = points_moving.to(torch.float64)
    eye = torch.eye(3, dtype=q.dtype, device=q.device)
    p = q.clone()  # start from identity; the first Newton step absorbs the affine part
    for _ in range(iterations):
        tp = transform.map_points(p).to(q.dtype)
        r = tp - q
        if float(r.norm(dim=-1).max()) < tolerance:
            break
        cols = [(transform.map_points(p + step * eye[a]).to(q.dtype) - tp) / step for a in range(3)]
        jac = torch.stack(cols, dim=-1)  # (B, M, 3, 3): d T_i / d p_a
        delta = torch.linalg.solve(jac, r.unsqueeze(-1)).squeeze(-1)
        p = p - delta
    residual = (transform.map_points(p).to(q.dtype) - q).norm(dim=-1)
    return p.to(points_moving.dtype), residual.to(points_moving.dtype)


def map_to_fixed(
    transform: SpatialTransform,
    points_moving: torch.Tensor,
    *,
    iterations: int = 30,
    tolerance: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map moving-space points into the fixed space through ``T^-1``: the one way keyreg does it.

    Exact (float64 matrix inverse) for an :class:`~keyreg.transforms.AffineTransform`, Newton's
    method (:func:`invert_points`) otherwise.

    Args:
        transform: ``moving_from_fixed``.
        points_moving: ``(B, M, 3)`` world mm.

    Returns:
        ``(p, residual)``: ``(B, M, 3)`` float64 fixed-space points and ``(B, M)`` ``|T(p) - q|`` mm.
    """
    from ..errors import ImageContentError
    from ..geometry import apply_affine
    from .linear import AffineTransform

    q = points_moving.to(torch.float64)
    if isinstance(transform, AffineTransform):
        m = transform.matrix.detach().to(q.device).double()
        if float(torch.linalg.det(m[:, :3, :3]).abs().min()) < 1e-12:
            raise ImageContentError("the transform's matrix is singular, it has no inverse")
        p = apply_affine(torch.linalg.inv(m), q)
    else:
        p, _ = invert_points(transform, q, iterations=iterations, tolerance=tolerance)
        p = p.double()
    residual = (transform.map_points(p).double() - q).norm(dim=-1)
    return p, residual


def _linear_part(t: Any) -> torch.Tensor | None:
    from .linear import AffineTransform
    from .tps import ThinPlateSpline

    if isinstance(t, AffineTransform):
        return t.matrix[0, :3, :3].double()
    if isinstance(t, ThinPlateSpline):
        return t.affine_part()[0, :3, :3].double()
    return None


def voxel_indices(shape: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """``(stop - start, 3)`` float64 voxel indices ``(i, j, k)`` of the C-order voxels ``start:stop``."""
    lin = torch.arange(start, stop, dtype=torch.int64)
    j_k = int(shape[1]) * int(shape[2])
    return torch.stack([lin // j_k, (lin // int(shape[2])) % int(shape[1]), lin % int(shape[2])], dim=-1).double()


def invert_on_grid(
    transform: Any,
    shape: Sequence[int],
    affine: Any,
    *,
    iterations: int = 50,
    tolerance: float = 1e-3,
    slab_points: int = 1 << 18,
    track_domain: bool = False,
) -> tuple[Any, np.ndarray] | tuple[Any, np.ndarray, np.ndarray]:
    """Numerical inverse of ``T`` as a displacement field on a grid of the MOVING space (``shape``,
    world-from-voxel ``affine``).

    For every voxel centre ``q`` of the grid it solves ``T(p) = q`` by the fixed-point iteration
    ``p <- p - L^-1 (T(p) - q)`` from ``p = q``, with ``L`` the linear part of ``T`` (identity for
    a displacement field).  It converges where ``T``'s nonlinear part is a contraction
    (``|L^-1 grad u| < 1``: no folding); the residual says where it did.

    Returns:
        ``(inverse, residual)``: a batch-1 :class:`DisplacementField` ``(1, 3, I, J, K)`` float32 on
        ``grid`` (``T^-1(q) = q + v(q)``, world RAS mm) and ``|T(q + v(q)) - q|`` ``(I, J, K)`` mm;
        with ``track_domain`` also ``(I, J, K)`` bools, where ``q`` has no inverse on a displacement
        field ``T`` (:meth:`DisplacementField.interior`): the inverse point off the field's interior, or
        an iteration that went there and did not converge (all ``False`` for other transforms).
    """
    from ..geometry import apply_affine, as_affine_tensor
    from .field import DisplacementField

    shape, aff = tuple(int(n) for n in tuple(shape)[:3]), as_affine_tensor(affine)
    lin = _linear_part(transform)
    pre = torch.eye(3, dtype=torch.float64) if lin is None else torch.linalg.inv(lin)
    total = int(np.prod(shape))
    disp = torch.empty(total, 3, dtype=torch.float32)
    residual = torch.empty(total, dtype=torch.float64)
    track = track_domain and isinstance(transform, DisplacementField)
    off_field = torch.zeros(total, dtype=torch.bool)
    for start in range(0, total, slab_points):  # memory: a few (slab_points, 3) arrays
        stop = min(total, start + slab_points)
        q = apply_affine(aff, voxel_indices(shape, start, stop)).unsqueeze(0)
        p = q.clone()
        edge = torch.zeros(stop - start, dtype=torch.bool)
        for _ in range(iterations):
            if track:
                edge |= ~transform.interior(p[0])
            r = transform.map_points(p).double() - q
            if float(r.norm(dim=-1).max()) < tolerance:
                break
            p = p - r @ pre.T
        residual[start:stop] = (transform.map_points(p).double() - q).norm(dim=-1)[0]
        disp[start:stop] = (p - q)[0].float()
        if track:
            off_field[start:stop] = ~transform.interior(p[0]) | (edge & (residual[start:stop] >= tolerance))
    field_t = disp.T.reshape(1, 3, *shape).contiguous()
    out = DisplacementField(field_t, aff), residual.reshape(shape).numpy()
    return (*out, off_field.reshape(shape).numpy()) if track_domain else out
