"""Shared test fixtures: oblique, anisotropic, non-cubic grids; tiny models; shared-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from keyreg.io import Volume

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LABELMAPS = SHARED / "data" / "labelmaps"
FIXTURES = SHARED / "fixtures" / "official-keymorph"


def need_shared(path: Path = SHARED) -> Path:
    """Skip the calling test when ../shared (real data, official fixtures) is not present."""
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data; absent in this checkout)")
    return path


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def grid_affine(spacing, rot: np.ndarray, flip=(1, 1, 1), center_world=(0.0, 0.0, 0.0), shape=(10, 10, 10)):
    """World-from-voxel affine: ``rot @ diag(flip * spacing)``, with the grid centre at ``center_world``."""
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.asarray(flip, float) * np.asarray(spacing, float))
    a[:3, 3] = np.asarray(center_world) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


@pytest.fixture
def oblique_fixed_grid():
    """An LIA-like, oblique, anisotropic, non-cubic grid: (shape, affine)."""
    shape = (36, 44, 30)
    lia = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)  # i->L, j->I, k->A
    rot = rotation([1, 2, 0.5], 17) @ lia
    return shape, grid_affine((1.5, 1.1, 2.0), rot, center_world=(3.0, -8.0, 12.0), shape=shape)


@pytest.fixture
def oblique_moving_grid():
    shape = (40, 34, 38)
    rot = rotation([0.3, -1, 1], -25)
    return shape, grid_affine((1.2, 1.8, 1.4), rot, center_world=(-4.0, 6.0, 2.0), shape=shape)


def world_points(shape, affine) -> np.ndarray:
    """``(I, J, K, 3)`` world coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def blob_image(shape, affine, centers, radius=6.0, levels=None) -> np.ndarray:
    """Balls of distinct intensities (smooth edges) at world ``centers`` sampled on a grid."""
    p = world_points(shape, affine)
    img = np.zeros(shape, dtype=np.float32)
    levels = levels if levels is not None else np.linspace(0.3, 1.0, len(centers))
    for c, lev in zip(centers, levels):
        d = np.linalg.norm(p - np.asarray(c), axis=-1)
        img = np.maximum(img, lev * np.clip(radius + 0.5 - d, 0, 1))
    return img.astype(np.float32)


def make_volume(data: np.ndarray, affine: np.ndarray, name: str = "vol", kind: str = "image") -> Volume:
    return Volume(np.asarray(data), np.asarray(affine, dtype=np.float64), None, name, kind)  # type: ignore[arg-type]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def tiny_model(num_keypoints: int = 12, grid_shape=(24, 24, 24), voxel_size=8.0, seed: int = 0):
    """A small random truncated U-Net with a coarse RAS input grid (fast on CPU)."""
    from keyreg.models import ArchitectureConfig, KeypointDetector, ModelConfig
    from keyreg.preprocess import GridSpec, PreprocessConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="tiny-test",
        architecture=ArchitectureConfig("truncatedunet", num_keypoints, num_levels=3, num_truncated=1, f_maps=8),
        preprocessing=PreprocessConfig(GridSpec("ras", grid_shape, (voxel_size,) * 3)),
        description="random weights, for tests",
    )
    return KeypointDetector(cfg).eval()


@pytest.fixture
def tiny_model_files(tmp_path):
    """A saved tiny model (keyreg format): returns the .safetensors path."""
    from keyreg.models import save_model

    weights, _ = save_model(tiny_model(), tmp_path / "tiny")
    return weights


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
