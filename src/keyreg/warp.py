"""Resampling volumes through transforms, slab by slab (memory-bounded).

Convention: every function *pulls*: for each voxel ``p`` of the output (fixed) grid it looks up
the source (moving) volume at ``T(p)``, with ``T = moving_from_fixed`` in world mm.  The source is
sampled once, from its original voxels, whatever chain of frames lies between.

Interpolation: ``"linear"`` (trilinear, ``align_corners=True`` on voxel centres), ``"nearest"``,
``"cubic"`` (cubic B-spline through :func:`scipy.ndimage.map_coordinates`, CPU) for images;
label maps use ``"nearest"`` (ids gathered as integers, never blended, exact for any id) or
``"labelwise"`` (each label's indicator interpolated trilinearly, the highest wins).
Outside the source grid images read 0 and labels read 0 (background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .geometry import apply_affine, as_affine_tensor, voxel_to_grid_sample
from .transforms.field import SpatialTransform
from .transforms.linear import AffineTransform

__all__ = [
    "ImageInterp",
    "LabelInterp",
    "sample_image",
    "sample_labels",
    "warp_image",
    "warp_labels",
    "resample_affine",
    "source_index_fn",
    "SLAB_VOXELS",
]

ImageInterp = Literal["linear", "nearest", "cubic"]
LabelInterp = Literal["nearest", "labelwise"]

#: Output voxels processed per slab.
SLAB_VOXELS = 1 << 21


def _gather(flat: torch.Tensor, index: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of ``flat`` ``(B, C, I*J*K)`` at integer voxels ``(B, M, 3)``; 0 (and False) outside."""
    n = torch.as_tensor(list(shape), device=index.device)
    inside = ((index >= 0) & (index < n)).all(-1)
    index = torch.where(inside.unsqueeze(-1), index, torch.zeros_like(index))
    lin = (index[..., 0] * int(shape[1]) + index[..., 1]) * int(shape[2]) + index[..., 2]
    vals = flat.gather(2, lin.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return torch.where(inside.unsqueeze(1), vals, torch.zeros_like(vals)), inside


def sample_image(volume: torch.Tensor, index: torch.Tensor, mode: ImageInterp = "linear") -> torch.Tensor:
    """Sample an image at continuous voxel positions.

    Trilinear weights are computed directly from voxel indices (no ``[-1, 1]`` round trip), so an
    integer position returns the stored value exactly and the identity warp is exact.

    Args:
        volume: ``(B, C, I, J, K)`` float.
        index: ``(B, M, 3)`` voxel coordinates (i, j, k) in ``volume``'s grid.
        mode: ``"linear"``, ``"nearest"`` or ``"cubic"``.

    Returns:
        ``(B, C, M)``; 0 outside the grid (each missing corner counts 0).
    """
    if mode == "cubic":
        return _sample_cubic(volume, index)
    shape = volume.shape[2:]
    flat = volume.reshape(*volume.shape[:2], -1)
    if mode == "nearest":
        return _gather(flat, torch.round(index).long(), shape)[0]
    if mode != "linear":
        raise ConfigError(f"unknown image interpolation {mode!r}: use linear, nearest or cubic")
    return _trilinear(flat, index, shape)


def _trilinear(flat: torch.Tensor, index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear interpolation of ``flat`` ``(B, C, I*J*K)`` at ``(B, M, 3)`` voxel positions.

    Per axis, the two neighbours' weights are ``1 - f`` and ``f``, set to 0 for a neighbour outside
    the grid (whose index is clamped, so every gather is in bounds). At an integer position the
    weights are exactly 1 and 0: the stored value comes back unchanged.
    """
    base = torch.floor(index)
    frac = (index - base).to(flat.dtype)
    base = base.long()
    idx, wts = [], []
    for a in range(3):
        n = int(shape[a])
        b0, b1 = base[..., a], base[..., a] + 1
        w0 = (1 - frac[..., a]) * ((b0 >= 0) & (b0 < n))
        w1 = frac[..., a] * ((b1 >= 0) & (b1 < n))
        idx.append((b0.clamp(0, n - 1), b1.clamp(0, n - 1)))
        wts.append((w0, w1))
    s1, s2 = int(shape[1]), int(shape[2])
    out = None
    for ci in range(2):
        row_i = idx[0][ci] * s1
        for cj in range(2):
            row_ij = (row_i + idx[1][cj]) * s2
            w_ij = wts[0][ci] * wts[1][cj]
            for ck in range(2):
                lin = (row_ij + idx[2][ck]).unsqueeze(1).expand(-1, flat.shape[1], -1)
                term = flat.gather(2, lin) * (w_ij * wts[2][ck]).unsqueeze(1)
                out = term if out is None else out + term
    return out


def _sample_cubic(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    from scipy import ndimage

    vol = volume.detach().cpu().numpy()
    idx = index.detach().cpu().numpy().astype(np.float64)
    out = np.empty(vol.shape[:2] + idx.shape[1:2], dtype=np.float32)
    for b in range(vol.shape[0]):
        for c in range(vol.shape[1]):
            out[b, c] = ndimage.map_coordinates(vol[b, c], idx[b].T, order=3, mode="constant", cval=0.0)
    return torch.from_numpy(out).to(volume.device)


def sample_labels(labels: torch.Tensor, index: torch.Tensor, mode: LabelInterp = "nearest",
                  label_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Sample a label map at continuous voxel positions without ever blending ids.

    Args:
        labels: ``(B, I, J, K)`` integer ids.
        index: ``(B, M, 3)`` voxel coordinates in ``labels``' grid.
        mode: ``"nearest"`` (round, gather) or ``"labelwise"`` (per-label trilinear indicator,
            argmax; smoother boundaries).
        label_ids: ids to consider for ``"labelwise"`` (default: all ids present).

    Returns:
        ``(B, M)`` int64 ids; 0 outside the grid.
    """
    if mode == "nearest":
        flat = labels.reshape(labels.shape[0], 1, -1)
        return _gather(flat, torch.round(index).long(), labels.shape[1:])[0][:, 0]
    if mode != "labelwise":
        raise ConfigError(f"unknown label interpolation {mode!r}: use nearest or labelwise")
    ids = torch.unique(labels).tolist() if label_ids is None else list(label_ids)
    best = torch.zeros(index.shape[:2], dtype=torch.float32, device=index.device)
    out = torch.zeros(index.shape[:2], dtype=torch.long, device=index.device)
    grid = voxel_to_grid_sample(index, labels.shape[1:]).float()[:, :, None, None, :]
    for lab in ids:
        ind = (labels == lab).float().unsqueeze(1)
        p = F.grid_sample(ind, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0, :, 0, 0]
        take = p > best
        best = torch.where(take, p, best)
        out = torch.where(take, torch.full_like(out, int(lab)), out)
    return out


def source_index_fn(
    transform: SpatialTransform | None,
    fixed_affine: np.ndarray | torch.Tensor,
    moving_affine: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping fixed-grid voxel indices ``(B, M, 3)`` to moving-grid voxel indices.

    For affine transforms (and ``None`` = identity) the chain voxel -> world -> T -> world -> voxel
    is folded into one float64 matrix, so identical grids with the identity give exact indices.
    """
    a_f = as_affine_tensor(fixed_affine, device)
    inv_m = torch.linalg.inv(as_affine_tensor(moving_affine, device))
    if transform is None or isinstance(transform, AffineTransform):
        mat = inv_m @ (a_f if transform is None else transform.matrix.to(device, torch.float64) @ a_f)

        def linear(index: torch.Tensor) -> torch.Tensor:
            return apply_affine(mat.to(torch.float64), index.to(torch.float64)).to(index.dtype)

        return linear

    def general(index: torch.Tensor) -> torch.Tensor:
        world = apply_affine(a_f, index.to(torch.float64))
        return apply_affine(inv_m, transform.map_points(world).to(torch.float64)).to(index.dtype)

    return general


def _slabs(shape: Sequence[int], slab_voxels: int):
    per_i = int(shape[1]) * int(shape[2])
    step = max(1, slab_voxels // per_i)
    for start in range(0, int(shape[0]), step):
        yield start, min(int(shape[0]), start + step)


def _slab_index(shape: Sequence[int], start: int, stop: int, batch: int, device) -> torch.Tensor:
    axes = [torch.arange(start, stop, device=device, dtype=torch.float32),
            torch.arange(shape[1], device=device, dtype=torch.float32),
            torch.arange(shape[2], device=device, dtype=torch.float32)]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)
    return g.expand(batch, -1, -1)


def warp_image(
    moving: torch.Tensor,
    moving_affine: np.ndarray | torch.Tensor,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray | torch.Tensor,
    transform: SpatialTransform | None = None,
    *,
    mode: ImageInterp = "linear",
    slab_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """Resample ``moving`` onto the fixed grid: ``out(p) = moving(T(p))``.

    Args:
        moving: ``(B, C, I, J, K)`` float image on its own grid.
        moving_affine, fixed_affine: ``(4, 4)`` world-from-voxel affines.
        fixed_shape: ``(I', J', K')`` of the output grid.
        transform: ``moving_from_fixed`` with batch ``B`` (``None`` = identity).

    Returns:
        ``(B, C, I', J', K')`` on ``moving``'s device.
    """
    b, c = moving.shape[:2]
    to_src = source_index_fn(transform, fixed_affine, moving_affine, moving.device)
    out = torch.empty((b, c, *fixed_shape), dtype=moving.dtype, device=moving.device)
    for start, stop in _slabs(fixed_shape, slab_voxels):
        idx = to_src(_slab_index(fixed_shape, start, stop, b, moving.device))
        out[:, :, start:stop] = sample_image(moving, idx, mode).reshape(b, c, stop - start, *fixed_shape[1:])
    return out


def warp_labels(
    moving: torch.Tensor,
    moving_affine: np.ndarray | torch.Tensor,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray | torch.Tensor,
    transform: SpatialTransform | None = None,
    *,
    mode: LabelInterp = "nearest",
    slab_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """Resample a label map ``(B, I, J, K)`` onto the fixed grid; ids are never blended.

    Returns:
        ``(B, I', J', K')`` int64.
    """
    b = moving.shape[0]
    to_src = source_index_fn(transform, fixed_affine, moving_affine, moving.device)
    ids = torch.unique(moving).tolist() if mode == "labelwise" else None
    out = torch.empty((b, *fixed_shape), dtype=torch.long, device=moving.device)
    for start, stop in _slabs(fixed_shape, slab_voxels):
        idx = to_src(_slab_index(fixed_shape, start, stop, b, moving.device))
        out[:, start:stop] = sample_labels(moving, idx, mode, ids).reshape(b, stop - start, *fixed_shape[1:])
    return out


def resample_affine(
    volume: torch.Tensor,
    source_from_output: torch.Tensor,
    output_shape: Sequence[int],
    *,
    mode: ImageInterp = "linear",
    slab_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """Resample ``(B, C, I, J, K)`` onto a grid given by a voxel-to-voxel affine.

    Args:
        source_from_output: ``(4, 4)`` or ``(B, 4, 4)`` float64: output voxel -> source voxel.
    """
    b, c = volume.shape[:2]
    mat = source_from_output.to(volume.device, torch.float64)
    out = torch.empty((b, c, *output_shape), dtype=volume.dtype, device=volume.device)
    for start, stop in _slabs(output_shape, slab_voxels):
        idx = apply_affine(mat, _slab_index(output_shape, start, stop, b, volume.device).double()).float()
        out[:, :, start:stop] = sample_image(volume, idx, mode).reshape(b, c, stop - start, *output_shape[1:])
    return out
