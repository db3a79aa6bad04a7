"""Training losses and the differentiable warp used by them (network-grid tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import apply_affine, voxel_to_grid_sample
from ..transforms import AffineTransform, ThinPlateSpline, sample_field

__all__ = ["warp_on_grid", "soft_dice_loss", "mse_loss", "keypoint_consistency_loss", "one_hot"]


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, I, J, K)`` compact ids ``0..L-1`` -> ``(B, L, I, J, K)`` float one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()


def warp_on_grid(
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed_affine: torch.Tensor,
    transform: AffineTransform | ThinPlateSpline,
    *,
    tps_stride: int = 2,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Differentiably resample ``moving`` ``(B, C, I, J, K)`` onto a fixed grid of the same shape.

    Args:
        moving_affine, fixed_affine: ``(B, 4, 4)`` world-from-voxel affines of the two grids.
        transform: ``moving_from_fixed`` (batch ``B``), world mm.
        tps_stride: a TPS is evaluated every ``tps_stride`` voxels and interpolated (training only:
            the loss needs a smooth field, not the exact one).

    Returns:
        ``(B, C, I, J, K)``; gradients flow to the transform parameters (hence to keypoints).
    """
    b, _, *shape = moving.shape
    dev = moving.device
    axes = [torch.arange(n, device=dev, dtype=torch.float32) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3).expand(b, -1, -1)
    fixed_affine = fixed_affine.to(dev, torch.float32)
    inv_moving = torch.linalg.inv(moving_affine.to(dev, torch.float64)).float()
    if isinstance(transform, AffineTransform):
        mat = inv_moving @ transform.matrix.float() @ fixed_affine  # fixed voxel -> moving voxel
        src = apply_affine(mat, idx)
    else:
        world = apply_affine(fixed_affine, idx)
        if tps_stride > 1:
            disp = torch.stack([
                sample_field(transform[i], shape, fixed_affine[i].double(), stride=tps_stride, device=dev)
                .upsample(shape, fixed_affine[i].double()).displacement[0]
                for i in range(b)])  # (B, 3, I, J, K)
            moved = world + disp.flatten(2).transpose(1, 2)
        else:
            moved = transform.map_points(world)
        src = apply_affine(inv_moving, moved.float())
    grid = voxel_to_grid_sample(src, shape).reshape(b, *shape, 3)
    return F.grid_sample(moving, grid.to(moving.dtype), mode=mode, padding_mode="zeros", align_corners=True)


def soft_dice_loss(warped: torch.Tensor, fixed: torch.Tensor, *, include_background: bool = False,
                   eps: float = 1e-6) -> torch.Tensor:
    """``1 - mean Dice`` over labels present in either map.

    Args:
        warped: ``(B, L, ...)`` soft label probabilities (warped one-hot).
        fixed: ``(B, L, ...)`` one-hot.
        include_background: count channel 0 (default: no; background dominates the volume).

    Background handling: channel 0 is excluded; labels absent from both maps of a pair are not
    averaged in (they would otherwise count as Dice 1).
    """
    start = 0 if include_background else 1
    w, f = warped[:, start:].flatten(2), fixed[:, start:].flatten(2)
    inter = (w * f).sum(-1)
    denom = w.sum(-1) + f.sum(-1)
    present = (denom > eps).float()
    dice = (2 * inter + eps) / (denom + eps)
    per_pair = (dice * present).sum(1) / present.sum(1).clamp_min(1)
    return 1 - per_pair.mean()


def mse_loss(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference (unsupervised, same-contrast pairs)."""
    return (warped - fixed).pow(2).mean()


def keypoint_consistency_loss(points_a: torch.Tensor, points_b: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm^2) between keypoints ``(B, K, 3)`` of two contrasts of one subject."""
    return (points_a - points_b).pow(2).sum(-1).mean()
