"""Closed-form rigid and affine fits between corresponding keypoints, and the affine transform type.

All functions are batched (``B >= 1``), differentiable, and work in world coordinates (RAS mm),
so a rigid fit stays rigid whatever the voxel sizes and orientations of the images.

Convention: a fit returns ``moving_from_fixed`` — the map from a point of the FIXED image to the
matching point of the MOVING image (the resampling or "pull" direction used by ITK and ANTs):
``warped(p) = moving(T(p))`` for every point ``p`` of the fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DegenerateFitError, ShapeError
from ..geometry import apply_affine

__all__ = [
    "AffineTransform",
    "fit_rigid",
    "fit_affine",
    "check_points",
    "normalize_weights",
    "check_spread",
]

# Relative size of the smallest principal spread of a point set below which it counts as flat.
_FLAT_TOLERANCE = 1e-4


def check_points(points_fixed: torch.Tensor, points_moving: torch.Tensor,
                 weights: torch.Tensor | None = None) -> None:
    """Validate the shapes ``(B, N, 3)``, ``(B, N, 3)`` and ``(B, N)`` of a fit's inputs."""
    if points_fixed.ndim != 3 or points_fixed.shape[-1] != 3:
        raise ShapeError(f"points_fixed must be (B, N, 3), got {tuple(points_fixed.shape)}")
    if points_moving.shape != points_fixed.shape:
        raise ShapeError(f"points_moving must match points_fixed {tuple(points_fixed.shape)}, "
                         f"got {tuple(points_moving.shape)}")
    if weights is not None and weights.shape != points_fixed.shape[:2]:
        raise ShapeError(f"weights must be (B, N) = {tuple(points_fixed.shape[:2])}, got {tuple(weights.shape)}")


def normalize_weights(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Weights ``(B, N)`` scaled to mean 1 per batch item (uniform when ``None``)."""
    if weights is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
    w = weights.to(like.dtype).clamp_min(0)
    total = w.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise DegenerateFitError("keypoint weights are all zero for at least one pair")
    return w * (w.shape[1] / total)


def _weighted_centroid(points: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (points * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)


def check_spread(points: torch.Tensor, w: torch.Tensor, rank: int, what: str, role: str) -> None:
    """Raise :class:`DegenerateFitError` unless the weighted point set spans ``rank`` dimensions.

    ``rank`` 2 rejects collinear sets, 3 rejects coplanar ones.  The test is scale-free: the
    ``rank``-th principal spread must exceed ``1e-4`` of the largest.
    """
    n_used = int((w > 0).sum(dim=1).min())
    need = rank + 1
    if n_used < need:
        raise DegenerateFitError(
            f"{what} fit needs at least {need} keypoints with non-zero weight, got {n_used}")
    with torch.no_grad():
        c = points - _weighted_centroid(points, w).unsqueeze(1)
        cov = (c * w.unsqueeze(-1)).transpose(1, 2) @ c
        ev = torch.linalg.eigvalsh(cov.double()).clamp_min(0).sqrt()  # ascending spreads
        ratio = ev[:, 3 - rank] / ev[:, 2].clamp_min(1e-300)
    if bool((ratio < _FLAT_TOLERANCE).any()):
        shape = {2: "collinear", 3: "coplanar"}[rank]
        raise DegenerateFitError(
            f"{what} fit is undetermined: the {role} keypoints are {shape} (or coincide)")


def fit_rigid(
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted least-squares rigid transform (rotation + translation), Kabsch/Umeyama.

    Minimises ``sum_n w_n |R x_n + t - y_n|^2`` with ``x`` fixed and ``y`` moving points; the
    reflection case is fixed by flipping the singular vector of the smallest singular value,
    so ``det(R) = +1`` always.

    Args:
        points_fixed: ``(B, N, 3)`` world mm.
        points_moving: ``(B, N, 3)`` world mm, corresponding to ``points_fixed``.
        weights: optional ``(B, N)`` non-negative weights.

    Returns:
        ``(B, 4, 4)`` homogeneous ``moving_from_fixed`` matrices.

    Raises:
        DegenerateFitError: fewer than 3 keypoints, or collinear keypoints.

    Example:
        >>> x = torch.randn(1, 10, 3, dtype=torch.float64)
        >>> torch.allclose(fit_rigid(x, x + 5)[0, :3, 3], torch.full((3,), 5.0, dtype=torch.float64))
        True
    """
    check_points(points_fixed, points_moving, weights)
    w = normalize_weights(weights, points_fixed)
    check_spread(points_fixed, w, 2, "rigid", "fixed")
    check_spread(points_moving, w, 2, "rigid", "moving")
    cx = _weighted_centroid(points_fixed, w)
    cy = _weighted_centroid(points_moving, w)
    x = points_fixed - cx.unsqueeze(1)
    y = points_moving - cy.unsqueeze(1)
    h = (x * w.unsqueeze(-1)).transpose(1, 2) @ y  # (B, 3, 3) = sum w x y^T
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(1, 2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    ones = torch.ones_like(d)
    fix = torch.diag_embed(torch.stack([ones, ones, d], dim=-1))
    r = v @ fix @ u.transpose(1, 2)
    t = cy - (r @ cx.unsqueeze(-1)).squeeze(-1)
    return _homogeneous_matrix(r, t)


def fit_affine(
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted least-squares affine transform.

    Minimises ``sum_n w_n |A x_n + t - y_n|^2``.  Points are centred and scaled before the
    4x4 normal equations are solved (``torch.linalg.solve``), then the result is mapped back,
    which keeps the system well conditioned for coordinates of hundreds of millimetres.

    Args:
        points_fixed: ``(B, N, 3)`` world mm.
        points_moving: ``(B, N, 3)`` world mm.
        weights: optional ``(B, N)`` non-negative weights.

    Returns:
        ``(B, 4, 4)`` homogeneous ``moving_from_fixed`` matrices.

    Raises:
        DegenerateFitError: fewer than 4 keypoints, or coplanar fixed or moving keypoints.
    """
    check_points(points_fixed, points_moving, weights)
    w = normalize_weights(weights, points_fixed)
    check_spread(points_fixed, w, 3, "affine", "fixed")
    check_spread(points_moving, w, 3, "affine", "moving")
    mu = _weighted_centroid(points_fixed, w)
    xc = points_fixed - mu.unsqueeze(1)
    sigma = (xc.pow(2).sum(-1) * w).sum(1).div(w.sum(1)).sqrt().clamp_min(1e-12)  # (B,)
    xn = torch.cat([xc / sigma[:, None, None], torch.ones_like(xc[..., :1])], dim=-1)  # (B, N, 4)
    xtw = (xn * w.unsqueeze(-1)).transpose(1, 2)  # (B, 4, N)
    theta = torch.linalg.solve(xtw @ xn, xtw @ points_moving)  # (B, 4, 3)
    m = theta[:, :3, :].transpose(1, 2) / sigma[:, None, None]  # (B, 3, 3)
    t = theta[:, 3, :] - (m @ mu.unsqueeze(-1)).squeeze(-1)
    return _homogeneous_matrix(m, t)


def _homogeneous_matrix(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    top = torch.cat([m, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[:, :1, :])
    bottom[..., 3] = 1
    return torch.cat([top, bottom], dim=1)


@dataclass
class AffineTransform:
    """A batch of world-space affine transforms ``moving_from_fixed`` (rigid ones included).

    Attributes:
        matrix: ``(B, 4, 4)``; maps fixed world (RAS mm) points to moving world points.
    """

    matrix: torch.Tensor

    def __post_init__(self) -> None:
        if self.matrix.ndim == 2:
            self.matrix = self.matrix.unsqueeze(0)
        if self.matrix.shape[-2:] != (4, 4):
            raise ShapeError(f"matrix must be (B, 4, 4), got {tuple(self.matrix.shape)}")

    @property
    def batch_size(self) -> int:
        return self.matrix.shape[0]

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed-space points ``(B, M, 3)`` -> moving-space points ``(B, M, 3)`` (world mm)."""
        return apply_affine(self.matrix, points)

    def inverse(self) -> "AffineTransform":
        """The exact inverse, ``fixed_from_moving``."""
        return AffineTransform(torch.linalg.inv(self.matrix))

    def to(self, device: torch.device | str) -> "AffineTransform":
        return AffineTransform(self.matrix.to(device))

    def __getitem__(self, b: int) -> "AffineTransform":
        return AffineTransform(self.matrix[b : b + 1])
