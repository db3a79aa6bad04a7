"""Coordinate frames and the conversions between them.  Every convention of keyreg lives here.

Frames (see ``docs/conventions.md``):

* **voxel** ``(i, j, k)``: 0-based indices of the data array as nibabel returns it; a torch
  volume ``(B, C, I, J, K)`` keeps the same axis order (tensor dims 2, 3, 4 = i, j, k).
* **normalised** ``u`` in ``[-1, 1]``, tensor-axis order ``(i, j, k)``, corner-aligned:
  index ``j`` on an axis of ``n`` voxels is ``u = 2 j / (n - 1) - 1`` (``align_corners=True``).
  Keypoints leave the network in this frame, relative to the network input grid.
* **world**: RAS+ millimetres, ``world = affine @ [i, j, k, 1]`` with the NIfTI (nibabel) affine.
  ITK-family files use LPS+ (``F = diag(-1, -1, 1)``); conversion happens only at file boundaries.

``torch.nn.functional.grid_sample`` wants normalised coordinates in *reversed* order
``(k, j, i)``; :func:`voxel_to_grid_sample` is the one place that reversal happens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "LPS_FROM_RAS",
    "apply_affine",
    "homogeneous",
    "voxel_to_normalized",
    "normalized_to_voxel",
    "voxel_to_grid_sample",
    "voxel_grid",
    "fov_center",
    "fov_half_extent",
    "ras_to_lps_matrix",
    "ras_to_lps_points",
    "voxel_sizes",
    "rotation_matrix",
    "rotation_about",
    "as_affine_tensor",
]

#: 4x4 matrix flipping x and y: RAS <-> LPS (its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def as_affine_tensor(
    affine: np.ndarray | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return a 4x4 (or batched ``(B, 4, 4)``) affine as a float64 tensor on ``device``."""
    return torch.as_tensor(np.asarray(affine) if not torch.is_tensor(affine) else affine,
                           dtype=torch.float64, device=device)


def homogeneous(points: torch.Tensor) -> torch.Tensor:
    """Append a column of ones: ``(..., N, 3) -> (..., N, 4)``."""
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points through homogeneous affines.

    Args:
        affine: ``(4, 4)`` or ``(B, 4, 4)``; maps the points' frame to the result's frame.
        points: ``(N, 3)`` or ``(B, N, 3)``.

    Returns:
        ``(..., N, 3)`` in the points' dtype, computed as ``points @ M.T + t``.

    Example:
        >>> A = torch.eye(4, dtype=torch.float64); A[:3, 3] = torch.tensor([1., 2., 3.])
        >>> apply_affine(A, torch.zeros(1, 3, dtype=torch.float64)).tolist()
        [[1.0, 2.0, 3.0]]
    """
    affine = affine.to(points.dtype)
    m = affine[..., :3, :3]
    t = affine[..., :3, 3]
    return points @ m.transpose(-1, -2) + t.unsqueeze(-2)


def voxel_to_normalized(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` on a grid of ``shape`` -> corner-aligned ``[-1, 1]`` coordinates.

    Convention: tensor-axis order (i, j, k); ``u = 2 j / (n - 1) - 1``; an axis of one voxel maps to 0.
    """
    n = torch.as_tensor(list(shape), dtype=index.dtype, device=index.device)
    denom = torch.clamp(n - 1, min=1)
    u = 2 * index / denom - 1
    return torch.where(n > 1, u, torch.zeros_like(u))


def normalized_to_voxel(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`voxel_to_normalized`: ``j = (u + 1) (n - 1) / 2``."""
    n = torch.as_tensor(list(shape), dtype=u.dtype, device=u.device)
    return (u + 1) * (n - 1) / 2


def voxel_to_grid_sample(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` (i, j, k) -> a ``grid_sample`` grid ``(..., 3)`` in (k, j, i) order.

    Use with ``align_corners=True``.  Points outside the grid get coordinates outside [-1, 1].
    """
    return voxel_to_normalized(index, shape).flip(-1)


def voxel_grid(
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Voxel indices ``(i, j, k)`` of every voxel of a grid, ``(I, J, K, 3)`` (C order when reshaped to
    ``(-1, 3)``): the one meshgrid of voxel indices."""
    axes = [torch.arange(int(n), dtype=dtype, device=device) for n in tuple(shape)[:3]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def fov_center(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World (RAS mm) position of the centre of the voxel grid, ``affine @ ((n - 1) / 2)``."""
    c = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ c + np.asarray(affine)[:3, 3]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def fov_half_extent(affine: np.ndarray, shape: Sequence[int]) -> float:
    """Half the largest physical extent (mm) of the grid, ``max(n * voxel_size) / 2``."""
    return float(np.max(np.asarray(shape[:3]) * voxel_sizes(affine)) / 2)


def ras_to_lps_matrix(matrix: np.ndarray) -> np.ndarray:
    """Express a 4x4 RAS->RAS point map in LPS: ``F @ A @ F``."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_FROM_RAS


def ras_to_lps_points(points: np.ndarray) -> np.ndarray:
    """Flip the x and y coordinates of ``(..., 3)`` points (RAS <-> LPS, either way)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., :2] *= -1
    return out


def rotation_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotations by ``angle (...)`` radians about ``axis (..., 3)`` (normalised here), right-hand
    rule (Rodrigues) -> ``(..., 3, 3)``."""
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    s, c = torch.sin(angle)[..., None, None], torch.cos(angle)[..., None, None]
    return eye + s * k + (1 - c) * (k @ k)


def rotation_about(axis: Sequence[float], degrees: float) -> np.ndarray:
    """``(3, 3)`` float64 rotation by ``degrees`` about ``axis`` (see :func:`rotation_matrix`)."""
    a = torch.as_tensor(np.asarray(axis, dtype=np.float64))
    return rotation_matrix(a, torch.tensor(np.deg2rad(degrees), dtype=torch.float64)).numpy()
