"""Heatmaps -> keypoints (center of mass) and keypoint weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShapeError

__all__ = ["center_of_mass", "power_weights"]


def center_of_mass(heatmaps: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Center of mass of each ReLU'd heatmap.

    Args:
        heatmaps: ``(B, K, *spatial)`` with 2 or 3 spatial axes.
        eps: added to the mass (a channel with no mass lands at ``-1`` on every axis, as in the
            official code; its mass, and hence its ``power`` weight, is 0).

    Returns:
        ``(points, mass)``: ``points`` ``(B, K, D)`` in the normalised frame of the heatmap grid
        (tensor-axis order, corner-aligned: voxel ``j`` of ``n`` is ``2 j / (n - 1) - 1``), which
        keyreg reads as the same normalised position on the network *input* grid; ``mass``
        ``(B, K)`` the total activation.  Computed in float32 (float64 inputs stay float64), also
        under autocast.

    Example:
        >>> h = torch.zeros(1, 1, 3, 3, 3); h[0, 0, 2, 1, 0] = 1
        >>> center_of_mass(h)[0].tolist()
        [[[1.0, 0.0, -1.0]]]
    """
    if heatmaps.ndim not in (4, 5):
        raise ShapeError(f"heatmaps must be (B, K, H, W) or (B, K, D, H, W), got {tuple(heatmaps.shape)}")
    h = F.relu(heatmaps if heatmaps.dtype == torch.float64 else heatmaps.float())
    spatial = h.shape[2:]
    dims = tuple(range(2, h.ndim))
    mass = h.sum(dim=dims)
    coords = []
    for a, n in enumerate(spatial):
        marginal = h.sum(dim=tuple(d for d in dims if d != 2 + a))  # (B, K, n)
        lin = torch.linspace(0, 1, n, device=h.device, dtype=h.dtype)
        coords.append((marginal * lin).sum(-1) / (marginal.sum(-1) + eps))
    return torch.stack(coords, dim=-1) * 2 - 1, mass


def power_weights(mass_fixed: torch.Tensor, mass_moving: torch.Tensor) -> torch.Tensor:
    """Keypoint weights from heatmap activation: ``m_f m_m`` normalised to sum 1 over keypoints.

    Args:
        mass_fixed, mass_moving: ``(B, K)`` total ReLU'd activation of each heatmap.

    Returns:
        ``(B, K)`` weights, summing to 1 per pair (uniform if every product is 0).
    """
    p = mass_fixed.float() * mass_moving.float()
    total = p.sum(dim=1, keepdim=True)
    uniform = torch.full_like(p, 1.0 / p.shape[1])
    return torch.where(total > 0, p / total.clamp_min(1e-30), uniform)
