"""Dense displacement fields: the memory-bounded way to evaluate a nonlinear transform on a grid.

A :class:`DisplacementField` stores ``u(p)`` (world mm, RAS) on a regular grid so that
``T(p) = p + u(p)``; between grid points ``u`` is trilinear, outside the grid it is 0 (the ITK
convention).  :func:`sample_field` evaluates any transform on a uniform sub-grid of the fixed grid
(every ``stride``-th voxel, both ends included), which is how keyreg warps with a TPS without
ever forming a (voxels x keypoints) array: the TPS is evaluated on the coarse grid in chunks and
the field is interpolated to the full grid.  The default stride is 2 (:data:`DEFAULT_FIELD_STRIDE`);
its interpolation error is measured in ``docs/benchmarks.md``; stride 1 is exact at every voxel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ShapeError
from ..geometry import apply_affine, as_affine_tensor, voxel_to_grid_sample

__all__ = ["SpatialTransform", "DisplacementField", "sample_field", "coarse_grid_affine", "check_field_stride",
           "DEFAULT_FIELD_STRIDE"]

#: Default sub-sampling of the fixed grid on which nonlinear transforms are evaluated: every 2nd
#: voxel, trilinear in between (8x fewer TPS kernel evaluations than 1 = exact at every voxel).  Its
#: error on a real 1 mm pair (docs/benchmarks.md, ``benchmarks/speed_field_stride.py``): under 0.1 mm
#: everywhere, 99th percentile under 0.01 mm, no label's Dice changed by 0.001.
DEFAULT_FIELD_STRIDE = 2


class SpatialTransform(Protocol):
    """Anything that maps fixed world points ``(B, M, 3)`` to moving world points ``(B, M, 3)``."""

    def map_points(self, points: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DisplacementField:
    """Displacements ``u`` on a grid: ``T(p) = p + u(p)``.

    Attributes:
        displacement: ``(B, 3, I, J, K)`` world mm (RAS components).
        grid_affine: ``(4, 4)`` float64 tensor, world from voxel of the field's grid.
    """

    displacement: torch.Tensor
    grid_affine: torch.Tensor

    def __post_init__(self) -> None:
        if self.displacement.ndim != 5 or self.displacement.shape[1] != 3:
            raise ShapeError(f"displacement must be (B, 3, I, J, K), got {tuple(self.displacement.shape)}")
        self.grid_affine = as_affine_tensor(self.grid_affine, self.displacement.device)

    @property
    def batch_size(self) -> int:
        return self.displacement.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.displacement.shape[2:])  # type: ignore[return-value]

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed world points ``(B, M, 3)`` -> ``p + u(p)``; ``u`` trilinear, 0 outside the grid."""
        idx = apply_affine(torch.linalg.inv(self.grid_affine), points)
        grid = voxel_to_grid_sample(idx, self.shape).to(self.displacement.dtype)
        u = F.grid_sample(self.displacement, grid[:, :, None, None, :], mode="bilinear",
                          padding_mode="zeros", align_corners=True)  # (B, 3, M, 1, 1)
        return points + u[..., 0, 0].transpose(1, 2).to(points.dtype)

    def interior(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` bools for world points ``(..., N, 3)``: at least one voxel inside the field's grid,
        where ``u`` is interpolated (at the border and beyond it drops to 0: no inverse reaches there)."""
        vox = apply_affine(torch.linalg.inv(self.grid_affine.double()).to(points.device), points.double())
        hi = torch.tensor(self.shape, dtype=torch.float64, device=vox.device) - 2
        return ((vox >= 1) & (vox <= hi)).all(-1)

    def upsample(self, shape: Sequence[int], affine: np.ndarray | torch.Tensor) -> "DisplacementField":
        """The same field on a finer grid that shares its corners (e.g. the full fixed grid)."""
        up = F.interpolate(self.displacement, size=tuple(shape), mode="trilinear", align_corners=True)
        return DisplacementField(up, as_affine_tensor(affine, up.device))

    def to(self, device: torch.device | str) -> "DisplacementField":
        return DisplacementField(self.displacement.to(device), self.grid_affine.to(device))


#: The coarsest sub-grid allowed: on the real 1 mm pair of ``benchmarks/speed_field_stride.py`` the
#: field errs by up to 0.33 mm at stride 4, 0.85 mm at 8, 1.06 mm at 16 and 2.0 mm at 32
#: (docs/benchmarks.md); a coarser field is not the transform the run reports.
MAX_FIELD_STRIDE = 8


def check_field_stride(stride: object, limit: int | None = MAX_FIELD_STRIDE) -> int:
    """The field stride as an int in ``1 .. limit`` (:class:`~keyreg.errors.ConfigError` otherwise);
    ``limit=None`` for internal sub-grids (e.g. the lattice on which an inverse is measured)."""
    from ..errors import ConfigError

    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"the field stride must be an integer >= 1, got {stride!r}")
    if limit is not None and stride > limit:
        raise ConfigError(f"the field stride must be at most {limit} voxels, got {stride} (the dense "
                          f"field errs by up to 0.85 mm at stride 8 on a 1 mm grid, more beyond)")
    return int(stride)


def coarse_grid_affine(shape: Sequence[int], affine: np.ndarray | torch.Tensor,
                       stride: int) -> tuple[tuple[int, int, int], torch.Tensor]:
    """Shape and world-from-voxel affine of the uniform sub-grid of stride ``<= stride``.

    Along an axis of ``n`` voxels the sub-grid has ``m = ceil((n - 1) / stride) + 1`` points at
    fine indices ``o (n - 1) / (m - 1)``: both end voxels are on it, spacing is uniform.
    """
    check_field_stride(stride, limit=None)
    shape = tuple(int(s) for s in shape[:3])
    coarse = tuple(math.ceil((n - 1) / stride) + 1 for n in shape)
    steps = [(n - 1) / (m - 1) for n, m in zip(shape, coarse)]
    scale = torch.diag(torch.tensor([*steps, 1.0], dtype=torch.float64))
    a = as_affine_tensor(affine)
    return coarse, a @ scale.to(a.device)  # type: ignore[return-value]


def sample_field(
    transform: SpatialTransform,
    shape: Sequence[int],
    affine: np.ndarray | torch.Tensor,
    *,
    stride: int = DEFAULT_FIELD_STRIDE,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    slab_points: int = 1 << 20,
    full_grid: bool = False,
) -> DisplacementField:
    """Evaluate ``transform`` on the stride-``stride`` sub-grid of a grid and store ``T(p) - p``.

    Args:
        transform: maps fixed world points ``(B, M, 3)`` to moving world points.
        shape, affine: the fixed grid ``(I, J, K)`` and its world-from-voxel affine.
        stride: sub-sampling (1 = every voxel).
        batch_size: ``B`` of the transform.
        dtype: precision of evaluation and storage (float32: fast; TPS error ~1e-6 of the field of view).
        slab_points: points evaluated per call of ``transform.map_points``.
        full_grid: return the field on the full grid (``shape``, ``affine``): the sub-grid values
            trilinearly interpolated in between (:meth:`DisplacementField.upsample`), which is what
            warping with the sub-grid field gives, in the form the warp reads fastest.

    Returns:
        A :class:`DisplacementField` on the coarse grid, or with ``full_grid`` on the full grid
        (``dtype``, on ``device``).
    """
    coarse, grid_aff = coarse_grid_affine(shape, affine, stride)
    grid_aff = grid_aff.to(device)
    disp = torch.empty(batch_size, 3, *coarse, dtype=dtype, device=device)
    per_i = coarse[1] * coarse[2]
    step = max(1, slab_points // per_i)
    j = torch.arange(coarse[1], dtype=torch.float64, device=device)
    k = torch.arange(coarse[2], dtype=torch.float64, device=device)
    for start in range(0, coarse[0], step):  # slabs of i-planes: no full-grid index array
        stop = min(coarse[0], start + step)
        i = torch.arange(start, stop, dtype=torch.float64, device=device)
        idx = torch.stack(torch.meshgrid(i, j, k, indexing="ij"), dim=-1).reshape(-1, 3)
        world = apply_affine(grid_aff, idx).to(dtype)
        world_b = world.unsqueeze(0).expand(batch_size, -1, -1)
        if callable(getattr(transform, "displacement", None)):  # a TPS evaluates u directly, without cancellation
            u = transform.displacement(world_b)
        else:
            u = transform.map_points(world_b) - world_b
        disp[:, :, start:stop] = u.transpose(1, 2).reshape(batch_size, 3, stop - start, *coarse[1:])
    field = DisplacementField(disp, grid_aff)
    if full_grid and tuple(coarse) != tuple(int(n) for n in shape[:3]):
        field = field.upsample(shape[:3], as_affine_tensor(affine, grid_aff.device))
    return field
