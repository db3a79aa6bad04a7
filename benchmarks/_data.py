"""Synthetic test volumes for the benchmarks (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["centered_affine", "head_image", "random_model_config"]


def centered_affine(size: int, voxel_mm: float) -> np.ndarray:
    """An RAS grid of ``size``^3 voxels of ``voxel_mm`` centred on the world origin."""
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = -voxel_mm * (size - 1) / 2
    return aff


def head_image(size: int, voxel_mm: float, seed: int, *, shift_mm=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A head-like float32 image in [0, 1]: an ellipsoid (semi-axes 70, 85, 65 mm) holding 24
    Gaussian blobs of random intensity and size, plus noise.  ``shift_mm`` moves the content.

    Built slab by slab so that 256^3 costs little memory beyond the output.
    """
    rng = np.random.default_rng(seed)
    aff = centered_affine(size, voxel_mm)
    centers = rng.uniform(-1, 1, (24, 3)) * np.array([45.0, 55.0, 40.0])
    sigmas = rng.uniform(6.0, 15.0, 24)
    amps = rng.uniform(0.2, 0.6, 24)
    axis = (np.arange(size) * voxel_mm + aff[0, 3]).astype(np.float32)
    y, z = np.meshgrid(axis - shift_mm[1], axis - shift_mm[2], indexing="ij")
    out = np.empty((size, size, size), dtype=np.float32)
    for i, x in enumerate(axis - shift_mm[0]):
        inside = (x / 70.0) ** 2 + (y / 85.0) ** 2 + (z / 65.0) ** 2 <= 1
        sl = 0.3 * inside.astype(np.float32)
        for c, s, a in zip(centers, sigmas, amps):
            d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
            sl += (a * np.exp(-d2 / (2 * s * s))).astype(np.float32) * inside
        out[i] = sl
    out += 0.02 * rng.standard_normal(out.shape, dtype=np.float32)
    np.clip(out, 0, 1, out=out)
    return out, aff


def random_model_config(arch: str, num_keypoints: int) -> dict:
    """Architecture + network grid of the benchmark models (plain dict, no keyreg import).

    * ``keyreg``: keyreg's training defaults (``keyreg train``): truncated U-Net, 4 levels, 2
      truncated, 16 feature maps, 64^3 grid of 3.5 mm.
    * ``brainmorph-s``: the official BrainMorph foundation "S" shape: truncated U-Net, 4 levels,
      1 truncated, 32 feature maps, 256^3 grid of 1 mm.
    * ``brainmorph-s-half``: the same network on a 128^3 grid of 2 mm (``--half_resolution``).
    """
    presets = {
        "keyreg": dict(num_levels=4, num_truncated=2, f_maps=16, grid=64, voxel=3.5),
        "brainmorph-s": dict(num_levels=4, num_truncated=1, f_maps=32, grid=256, voxel=1.0),
        "brainmorph-s-half": dict(num_levels=4, num_truncated=1, f_maps=32, grid=128, voxel=2.0),
    }
    if arch not in presets:
        raise SystemExit(f"unknown --arch {arch!r}: use {', '.join(presets)}")
    return {"backbone": "truncatedunet", "num_keypoints": num_keypoints, **presets[arch]}
