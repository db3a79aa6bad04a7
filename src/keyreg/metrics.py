"""Registration metrics, evaluated on the fixed image's original grid.

All functions take numpy arrays on one grid (``(I, J, K)``, nibabel voxel order) and are pure.
Label conventions (both Dice and Hausdorff):

* label ``0`` is background and never counted;
* Dice is averaged over the labels present in **either** map (a label missing from one map
  scores 0, a label missing from both is not counted — it is not a free Dice of 1);
* Hausdorff distances need a surface in both maps: labels missing from one map are reported as
  ``nan`` per label and left out of the mean.

Jacobian statistics are those of the physical-space map ``x_fixed (mm) -> x_moving (mm)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .errors import ConfigError, ShapeError
from .transforms import AffineTransform, DisplacementField

__all__ = [
    "METRICS",
    "parse_metrics",
    "mse",
    "ncc",
    "dice_per_label",
    "mean_dice",
    "soft_dice_per_label",
    "hausdorff95_per_label",
    "jacobian_determinant",
    "jacobian_determinant_stats",
    "compute_metrics",
]

#: metric name -> what it needs (``image``: warped and fixed images; ``seg``: segmentations;
#: ``transform``: the dense transform).
METRICS: dict[str, str] = {
    "mse": "image",
    "ncc": "image",
    "harddice": "seg",
    "softdice": "seg",
    "hausd": "seg",
    "jdstd": "transform",
    "jdlessthan0": "transform",
}


def parse_metrics(names: Sequence[str] | str) -> list[str]:
    """Validate metric names (order kept, duplicates dropped); unknown names raise :class:`ConfigError`."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out: list[str] = []
    for n in names:
        key = str(n).strip().lower()
        if key not in METRICS:
            raise ConfigError(f"unknown metric {n!r}; use one of: {', '.join(METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError(f"no metric given; use one or more of: {', '.join(METRICS)}")
    return out


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(f"{what}: shapes {a.shape} and {b.shape} differ (both must be on the fixed grid)")


def mse(warped: np.ndarray, fixed: np.ndarray) -> float:
    """Mean squared intensity difference (images expected min-max normalised to [0, 1])."""
    _same_shape(warped, fixed, "mse")
    d = warped.astype(np.float64) - fixed.astype(np.float64)
    return float(np.mean(d * d))


def ncc(warped: np.ndarray, fixed: np.ndarray) -> float:
    """Global normalised cross-correlation (Pearson's r) over the whole grid, in [-1, 1].

    A constant image has no defined correlation: returns ``nan``.
    """
    _same_shape(warped, fixed, "ncc")
    a = warped.astype(np.float64).ravel()
    b = fixed.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denom) if denom > 0 else float("nan")


def _labels_in_either(a: np.ndarray, b: np.ndarray) -> list[int]:
    ids = np.union1d(np.unique(a), np.unique(b))
    return [int(i) for i in ids if i != 0]


def dice_per_label(warped_seg: np.ndarray, fixed_seg: np.ndarray) -> dict[int, float]:
    """Hard Dice ``2|A∩B| / (|A|+|B|)`` per label present in either map (background excluded)."""
    _same_shape(warped_seg, fixed_seg, "harddice")
    a = warped_seg.ravel()
    b = fixed_seg.ravel()
    out = {}
    for lab in _labels_in_either(a, b):
        ma, mb = a == lab, b == lab
        out[lab] = float(2.0 * np.count_nonzero(ma & mb) / (np.count_nonzero(ma) + np.count_nonzero(mb)))
    return out


def mean_dice(per_label: dict[int, float]) -> float:
    """Mean of the finite per-label values (``nan`` when there is none)."""
    vals = [v for v in per_label.values() if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def soft_dice_per_label(
    moving_seg: np.ndarray,
    moving_affine: np.ndarray,
    fixed_seg: np.ndarray,
    fixed_affine: np.ndarray,
    transform: Any,
) -> dict[int, float]:
    """Soft Dice: each moving label's indicator is warped with trilinear interpolation (values in
    [0, 1], as in training) and compared with the fixed label's indicator.

    Args:
        moving_seg: ``(I', J', K')`` moving label map on its own grid.
        moving_affine, fixed_affine: world-from-voxel ``(4, 4)``.
        fixed_seg: ``(I, J, K)`` fixed label map.
        transform: ``moving_from_fixed`` (world mm): affine or displacement field, batch 1.
    """
    from .warp import warp_image

    out = {}
    fixed_flat = fixed_seg.ravel()
    for lab in _labels_in_either(moving_seg, fixed_seg):
        ind = torch.from_numpy((moving_seg == lab).astype(np.float32))[None, None]
        w = warp_image(ind, moving_affine, fixed_seg.shape, fixed_affine, transform)[0, 0].numpy().ravel()
        f = fixed_flat == lab
        denom = float(w.sum(dtype=np.float64)) + float(np.count_nonzero(f))
        out[lab] = float(2.0 * w[f].sum(dtype=np.float64) / denom) if denom > 0 else float("nan")
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95_per_label(warped_seg: np.ndarray, fixed_seg: np.ndarray,
                          spacing: Sequence[float]) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm) between label surfaces.

    For each label, the distances from every surface voxel of one map to the nearest surface voxel
    of the other, in both directions, are pooled and their 95th percentile returned. Distances use
    the voxel ``spacing`` (mm). Each label is computed on the bounding box of its two masks, which
    is exact (the nearest surface voxel always lies inside it).
    """
    _same_shape(warped_seg, fixed_seg, "hausd")
    spacing = tuple(float(s) for s in spacing)
    out = {}
    for lab in _labels_in_either(warped_seg, fixed_seg):
        ma, mb = warped_seg == lab, fixed_seg == lab
        if not ma.any() or not mb.any():
            out[lab] = float("nan")
            continue
        nz = np.argwhere(ma | mb)
        lo = np.maximum(nz.min(0) - 1, 0)
        hi = nz.max(0) + 2
        box = tuple(slice(l, h) for l, h in zip(lo, hi))
        sa, sb = _surface(ma[box]), _surface(mb[box])
        dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
        dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
        pooled = np.concatenate([dist_to_b[sa], dist_to_a[sb]])
        out[lab] = float(np.percentile(pooled, 95))
    return out


def jacobian_determinant(field: DisplacementField, *, slab: int = 32) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` in world mm, per voxel of the field's grid.

    Derivatives are central differences (one-sided at the edges) along voxel axes, converted to
    world derivatives with the grid's inverse affine. Computed in slabs along the first axis
    (memory: a few copies of one slab).

    Returns:
        ``(I, J, K)`` float64.
    """
    if field.batch_size != 1:
        raise ShapeError("jacobian_determinant expects a batch-1 displacement field")
    disp = field.displacement[0].detach().cpu().numpy()  # (3, I, J, K)
    affine = field.grid_affine.detach().cpu().double().numpy().reshape(-1, 4, 4)[0]
    vox_from_world = np.linalg.inv(affine[:3, :3])  # d(voxel)/d(world)
    n = disp.shape[1]
    det = np.empty(disp.shape[1:], dtype=np.float64)
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        lo, hi = max(start - 1, 0), min(stop + 1, n)
        block = disp[:, lo:hi].astype(np.float64)
        # grad[c][a] = d u_c / d voxel_a; axes of length 1 have no derivative
        grads = np.zeros((3, 3, *block.shape[1:]))
        for a in range(3):
            if block.shape[1 + a] > 1:
                grads[:, a] = np.gradient(block, axis=1 + a)
        jac = np.einsum("ca...,aw->...cw", grads, vox_from_world) + np.eye(3)
        det[start:stop] = np.linalg.det(jac)[start - lo:start - lo + stop - start]
    return det


def jacobian_determinant_stats(transform: Any) -> dict[str, float]:
    """``jdstd`` (standard deviation of the Jacobian determinant) and ``jdlessthan0`` (fraction of
    voxels with determinant <= 0) of a ``moving_from_fixed`` transform in world mm.

    An affine transform has a constant determinant: ``jdstd`` is 0 and ``jdlessthan0`` is 0 or 1.
    """
    if isinstance(transform, AffineTransform):
        d = float(np.linalg.det(transform.matrix[0, :3, :3].detach().cpu().double().numpy()))
        return {"jdstd": 0.0, "jdlessthan0": float(d <= 0)}
    if isinstance(transform, DisplacementField):
        det = jacobian_determinant(transform)
        return {"jdstd": float(det.std()), "jdlessthan0": float(np.mean(det <= 0))}
    raise ConfigError(f"Jacobian statistics need an affine or a displacement field, got {type(transform).__name__}")


def compute_metrics(
    names: Sequence[str],
    *,
    warped_image: np.ndarray | None = None,
    fixed_image: np.ndarray | None = None,
    warped_seg: np.ndarray | None = None,
    fixed_seg: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    transform: Any = None,
    fixed_shape: Sequence[int] | None = None,
    fixed_affine: np.ndarray | None = None,
    moving_seg: np.ndarray | None = None,
    moving_affine: np.ndarray | None = None,
) -> dict[str, Any]:
    """Evaluate ``names`` (see :data:`METRICS`); metrics whose inputs are missing raise.

    Returns:
        Scalars under each metric name; Dice and Hausdorff also give ``<name>_per_label``
        (label id -> value).
    """
    out: dict[str, Any] = {}
    names = parse_metrics(list(names))
    for name in names:
        need = METRICS[name]
        if need == "image" and (warped_image is None or fixed_image is None):
            raise ConfigError(f"metric {name!r} needs the warped and the fixed image")
        if need == "seg" and (warped_seg is None or fixed_seg is None):
            raise ConfigError(f"metric {name!r} needs --moving_seg and --fixed_seg")
        if need == "transform" and transform is None:
            raise ConfigError(f"metric {name!r} needs the transform")
        if name == "mse":
            out["mse"] = mse(warped_image, fixed_image)
        elif name == "ncc":
            out["ncc"] = ncc(warped_image, fixed_image)
        elif name == "harddice":
            per = dice_per_label(warped_seg, fixed_seg)
            out["harddice"], out["harddice_per_label"] = mean_dice(per), per
        elif name == "softdice":
            if moving_seg is None or moving_affine is None or fixed_affine is None:
                raise ConfigError("metric 'softdice' needs the moving segmentation and both affines")
            per = soft_dice_per_label(moving_seg, moving_affine, fixed_seg, fixed_affine, transform)
            out["softdice"], out["softdice_per_label"] = mean_dice(per), per
        elif name == "hausd":
            per = hausdorff95_per_label(warped_seg, fixed_seg, spacing)
            out["hausd"], out["hausd_per_label"] = mean_dice(per), per
        elif name in ("jdstd", "jdlessthan0"):
            if "jdstd" not in out:
                out.update(jacobian_determinant_stats(transform))
    # keep only what was asked for among the Jacobian pair
    for k in ("jdstd", "jdlessthan0"):
        if k in out and k not in names:
            del out[k]
    return out
