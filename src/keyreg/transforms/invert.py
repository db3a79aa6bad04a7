"""Numerical inverse of a transform at given points (for TPS and displacement fields)."""

from __future__ import annotations

import torch

from .field import SpatialTransform

__all__ = ["invert_points", "map_to_fixed"]


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
