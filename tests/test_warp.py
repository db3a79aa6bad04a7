"""The fast warping paths (grid_sample, one pass for image + labels) against exact references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_image, rotation, world_points

from keyreg.transforms import AffineTransform, DisplacementField, fit_tps, sample_field
from keyreg.warp import (
    SNAP_VOXELS,
    _trilinear,
    resample_affine,
    source_index_fn,
    warp_image,
    warp_image_and_labels,
    warp_labels,
)


def _grid_index(shape) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)


def _exact_trilinear(moving: np.ndarray, ma, fs, fa, transform) -> np.ndarray:
    """Trilinear interpolation at float64 positions, in float64 (the reference)."""
    src = source_index_fn(transform, fa, ma)(_grid_index(fs))
    flat = torch.from_numpy(moving.astype(np.float64)).reshape(1, 1, -1)
    return _trilinear(flat, src, moving.shape).reshape(fs).numpy()


def _exact_nearest(seg: np.ndarray, ma, fs, fa, transform) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ids at float64 positions, and how far each position is from a rounding tie."""
    src = source_index_fn(transform, fa, ma)(_grid_index(fs))[0].numpy()
    r = np.rint(src).astype(np.int64)
    inside = np.all((r >= 0) & (r < np.asarray(seg.shape)), axis=1)
    out = np.zeros(len(src), dtype=seg.dtype)
    out[inside] = seg[tuple(r[inside].T)]
    tie = np.abs(np.abs(src - np.floor(src)) - 0.5).min(axis=1)
    return out.reshape(fs), tie.reshape(fs)


def _scene(oblique_fixed_grid, oblique_moving_grid):
    (fs, fa), (ms, ma) = oblique_fixed_grid, oblique_moving_grid
    centres = [(0, 0, 0), (8, -5, 4), (-7, 6, -3)]
    p = world_points(ms, ma)
    moving = (blob_image(ms, ma, centres, radius=6.0) + 0.01 * (p[..., 0] + 2 * p[..., 1] - p[..., 2] + 60)
              ).astype(np.float32)
    ids = np.array([0, 3, 70_000, 2**31 + 11, 2**40 + 5], dtype=np.int64)
    seg = ids[np.clip(((p[..., 0] + 40) // 16).astype(int), 0, 4)]
    m = np.eye(4)
    m[:3, :3] = rotation([0.3, -1.0, 0.6], 12)
    m[:3, 3] = [2.5, -1.3, 0.7]
    return (fs, fa), (ms, ma), moving, seg, AffineTransform(torch.from_numpy(m))


def test_affine_warp_within_float32_bound_of_exact_trilinear(oblique_fixed_grid, oblique_moving_grid):
    (fs, fa), (ms, ma), moving, _, t = _scene(oblique_fixed_grid, oblique_moving_grid)
    out = warp_image(torch.from_numpy(moving)[None, None], ma, fs, fa, t)[0, 0].numpy()
    ref = _exact_trilinear(moving, ma, fs, fa, t)
    assert np.abs(ref).max() > 0.5 and (ref > 0).mean() > 0.2  # the comparison covers real content
    # documented bound: positions within ~3e-5 voxel; the largest step between neighbours is <= 1
    step = max(np.abs(np.diff(moving, axis=a)).max() for a in range(3))
    assert np.abs(out - ref).max() <= 5e-5 * max(step, float(np.abs(moving).max()))


def test_field_warp_within_bound_of_exact(oblique_fixed_grid, oblique_moving_grid):
    (fs, fa), (ms, ma), moving, _, _ = _scene(oblique_fixed_grid, oblique_moving_grid)
    rng = np.random.default_rng(0)
    pf = world_points(fs, fa).reshape(-1, 3)[rng.choice(np.prod(fs), 20, replace=False)]
    tps = fit_tps(torch.from_numpy(pf)[None], torch.from_numpy(pf + rng.normal(0, 2, pf.shape))[None], 0.0)
    field = sample_field(tps, fs, fa, stride=1)
    out = warp_image(torch.from_numpy(moving)[None, None], ma, fs, fa, field)[0, 0].numpy()
    # reference: the same field, through the general float64 path and exact trilinear interpolation
    src = source_index_fn(tps, fa, ma)(_grid_index(fs))
    ref = _trilinear(torch.from_numpy(moving.astype(np.float64)).reshape(1, 1, -1), src, ms).reshape(fs).numpy()
    assert np.abs(out - ref).max() < 2e-4 * float(np.abs(moving).max())


def test_identity_and_integer_shift_copy_exactly(oblique_fixed_grid):
    fs, fa = oblique_fixed_grid
    img = np.random.default_rng(1).random(fs).astype(np.float32)
    vol = torch.from_numpy(img)[None, None]
    np.testing.assert_array_equal(warp_image(vol, fa, fs, fa)[0, 0].numpy(), img)
    shift = np.eye(4)
    shift[:3, 3] = fa[:3, :3] @ np.array([2.0, -1.0, 0.0])  # two voxels along i, one back along j
    out = warp_image(vol, fa, fs, fa, AffineTransform(torch.from_numpy(shift)))[0, 0].numpy()
    np.testing.assert_array_equal(out[:-2, 1:], img[2:, :-1])
    assert (out[-2:] == 0).all() and (out[:, :1] == 0).all()
    assert SNAP_VOXELS <= 1e-3


@pytest.mark.parametrize("mode", ["nearest", "labelwise"])
def test_labels_exact_for_any_id_and_one_pass_matches(oblique_fixed_grid, oblique_moving_grid, mode):
    (fs, fa), (ms, ma), moving, seg, t = _scene(oblique_fixed_grid, oblique_moving_grid)
    seg_t = torch.from_numpy(seg)[None]
    lab = warp_labels(seg_t, ma, fs, fa, t, mode=mode)[0].numpy()
    assert lab.dtype == np.int64 and set(np.unique(lab)) <= set(np.unique(seg).tolist()) | {0}
    img2, lab2 = warp_image_and_labels(torch.from_numpy(moving)[None, None], seg_t, ma, fs, fa, t,
                                       label_mode=mode)
    np.testing.assert_array_equal(lab2[0].numpy(), lab)
    np.testing.assert_array_equal(img2.numpy(), warp_image(torch.from_numpy(moving)[None, None], ma, fs, fa, t).numpy())
    if mode == "nearest":
        ref, tie = _exact_nearest(seg, ma, fs, fa, t)
        differ = lab != ref
        assert (tie[differ] < 1e-4).all()  # only float32 rounding at exact ties may differ
        assert differ.mean() < 1e-3


def test_labels_smallest_dtype():
    seg = torch.zeros(1, 6, 6, 6, dtype=torch.int64)
    seg[0, 2:4, 2:4, 2:4] = 17
    aff = np.eye(4)
    out = warp_labels(seg, aff, (6, 6, 6), aff)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), seg.numpy())
    assert warp_labels(seg - 1, aff, (6, 6, 6), aff).dtype == torch.int16


def test_stride_one_field_read_directly_equals_general_path(oblique_fixed_grid):
    fs, fa = oblique_fixed_grid
    img = torch.from_numpy(blob_image(fs, fa, [(0, 0, 0), (5, 5, 5)], radius=5.0).astype(np.float32))[None, None]
    disp = torch.randn(1, 3, *fs, generator=torch.Generator().manual_seed(0)) * 1.5
    field = DisplacementField(disp, fa)
    fast = warp_image(img, fa, fs, fa, field)[0, 0]

    class Wrapped:  # the same map, forced through the general path
        def map_points(self, p):
            return field.map_points(p)

    general = warp_image(img, fa, fs, fa, Wrapped())[0, 0]
    assert float((fast - general).abs().max()) < 1e-4


def test_resample_affine_matches_exact():
    vol = torch.rand(1, 1, 20, 22, 18, generator=torch.Generator().manual_seed(2))
    mat = torch.eye(4, dtype=torch.float64)
    mat[:3, :3] = torch.from_numpy(rotation([1.0, 0.2, 0.1], 20)) * 1.7
    mat[:3, 3] = torch.tensor([1.5, -2.0, 3.2])
    out = resample_affine(vol, mat, (9, 10, 11))
    idx = _grid_index((9, 10, 11))
    from keyreg.geometry import apply_affine

    ref = _trilinear(vol.double().reshape(1, 1, -1), apply_affine(mat, idx), vol.shape[2:]).reshape(1, 1, 9, 10, 11)
    assert float((out.double() - ref).abs().max()) < 1e-4
