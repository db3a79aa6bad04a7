"""Quality-control figures (PNG): orthogonal slices of images with their keypoints.

Slices are shown in the closest canonical (RAS) orientation with the true voxel aspect ratio:
axial and coronal slices in neurological convention (the subject's right on the figure's right),
sagittal with anterior to the right. Keypoints are given
in world RAS mm and drawn on a slice when they lie within ``slab_mm`` of its plane.
The figures use matplotlib's non-interactive ``Agg`` backend and are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_path
from .geometry import fov_center
from .io import Volume

__all__ = ["canonical_view", "save_qc_figure", "save_keypoint_figure"]

_PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # plane name, canonical axis held fixed


def canonical_view(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` reoriented to the closest RAS axes.

    Returns:
        ``(data, affine)``: the reoriented array and its world-from-voxel affine (exact for
        oblique images: keypoints mapped with its inverse land on the displayed voxels).
    """
    ornt = nib.orientations.io_orientation(volume.affine)
    data = nib.orientations.apply_orientation(np.asarray(volume.data), ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.data.shape[:3])
    return data, affine


def _slice(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    s = np.moveaxis(data, axis, 0)[index]  # a view: no copy of the (reoriented, strided) volume
    return s.T  # rows = second remaining axis (displayed upwards with origin="lower")


def _display_range(data: np.ndarray) -> tuple[float, float]:
    """Grey levels shown: the 1st to 99.5th percentile, over a regular subsample of about 2 M voxels."""
    step = max(1, round((data.size / 2e6) ** (1 / max(data.ndim, 1))))
    sample = data[(slice(None, None, step),) * data.ndim]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _draw_row(axes, view: tuple[np.ndarray, np.ndarray, tuple[float, float]], center_world: np.ndarray,
              keypoint_sets: Sequence[tuple[np.ndarray, str, str]], slab_mm: float, label: str) -> None:
    """One row of orthogonal slices through ``center_world`` of a ``(data, affine, display range)``
    view (:func:`_view`), with the keypoint sets ``(points, colour, marker)`` near each slice."""
    data, affine, (vmin, vmax) = view
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    center_vox = np.linalg.inv(affine) @ np.append(center_world, 1.0)
    for ax, (plane, axis) in zip(axes, _PLANES):
        index = int(np.clip(round(center_vox[axis]), 0, data.shape[axis] - 1))
        other = [a for a in range(3) if a != axis]
        ax.imshow(_slice(data, axis, index), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
        for points, color, marker in keypoint_sets:
            if points is None or len(points) == 0:
                continue
            vox = (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
            near = np.abs(vox[:, axis] - index) * spacing[axis] <= slab_mm
            ax.scatter(vox[near, other[0]], vox[near, other[1]], s=14, c=color, marker=marker,
                       linewidths=0.8, edgecolors="black" if marker == "o" else None)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{label} — {plane}", fontsize=8)


def _view(volume: Volume) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """:func:`canonical_view` and the display range of a volume, computed once per figure."""
    data, affine = canonical_view(volume)
    return data, affine, _display_range(data)


def _figure(rows: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def save_qc_figure(
    path: str | Path,
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    *,
    fixed_keypoints: np.ndarray | None = None,
    moving_keypoints: np.ndarray | None = None,
    aligned_keypoints: np.ndarray | None = None,
    title: str = "",
    slab_mm: float = 6.0,
) -> Path:
    """Five rows of orthogonal slices: fixed, moving, warped (on the fixed grid), a checkerboard of
    fixed and warped, and a colour overlay of fixed (green) and warped (magenta) — grey where they agree.

    Keypoints (world RAS mm, ``(K, 3)``): fixed (red dots) on the fixed and warped rows, moving
    (cyan dots) on the moving row, and the moving keypoints carried into fixed space (yellow
    crosses) on the warped row: after a good registration crosses sit on the dots.
    """
    path = Path(path)
    plt, fig, axes = _figure(5)
    c_fixed = affine_center(fixed)
    f_view, w_view = _view(fixed), _view(warped)
    _draw_row(axes[0], f_view, c_fixed, [(fixed_keypoints, "red", "o")], slab_mm, "fixed")
    _draw_row(axes[1], _view(moving), affine_center(moving), [(moving_keypoints, "cyan", "o")], slab_mm, "moving")
    _draw_row(axes[2], w_view, c_fixed,
              [(fixed_keypoints, "red", "o"), (aligned_keypoints, "yellow", "x")], slab_mm, "warped")
    (f_data, f_aff, (f_lo, f_hi)), (w_data, _, (w_lo, w_hi)) = f_view, w_view
    spacing = np.sqrt((f_aff[:3, :3] ** 2).sum(0))
    center_vox = np.linalg.inv(f_aff) @ np.append(c_fixed, 1.0)
    for row, kind in ((3, "checkerboard"), (4, "overlay")):
        for ax, (plane, axis) in zip(axes[row], _PLANES):
            index = int(np.clip(round(center_vox[axis]), 0, f_data.shape[axis] - 1))
            other = [a for a in range(3) if a != axis]
            g = np.clip((_slice(f_data, axis, index) - f_lo) / (f_hi - f_lo), 0, 1)
            m = np.clip((_slice(w_data, axis, index) - w_lo) / (w_hi - w_lo), 0, 1)
            if kind == "checkerboard":  # squares of about 16 mm alternate fixed / warped
                rows = (np.arange(g.shape[0]) * spacing[other[1]] // 16).astype(int)
                cols = (np.arange(g.shape[1]) * spacing[other[0]] // 16).astype(int)
                board = (rows[:, None] + cols[None, :]) % 2 == 0
                ax.imshow(np.where(board, g, m), cmap="gray", vmin=0, vmax=1, origin="lower",
                          aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
                ax.set_title(f"checkerboard fixed / warped — {plane}", fontsize=8)
            else:
                ax.imshow(np.stack([m, g, m], axis=-1), origin="lower",
                          aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
                ax.set_title(f"fixed (green) / warped (magenta) — {plane}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    return _save(plt, fig, path)


def save_keypoint_figure(path: str | Path, volume: Volume, keypoints: np.ndarray, *,
                         title: str = "", slab_mm: float = 6.0) -> Path:
    """One row of orthogonal slices of ``volume`` with its keypoints (world RAS mm)."""
    path = Path(path)
    plt, fig, axes = _figure(1)
    _draw_row(axes[0], _view(volume), affine_center(volume), [(keypoints, "red", "o")], slab_mm, volume.name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    return _save(plt, fig, path)


def affine_center(volume: Volume) -> np.ndarray:
    """World coordinates (mm) of the centre of the volume's voxel grid."""
    return np.asarray(fov_center(volume.affine, volume.shape), dtype=np.float64)
