"""Pin the coordinate conventions of docs/conventions.md end to end.

Expected values are derived from the written convention (fixed -> moving world maps, RAS mm,
corner-aligned normalised coordinates), never copied from observed output.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import blob_image, make_volume, rotation, world_points
from keyreg.api import ImageKeypoints, detect_keypoints
from keyreg.pipeline import Registrar
from keyreg.geometry import (apply_affine, fov_center, fov_half_extent, normalized_to_voxel, ras_to_lps_matrix, ras_to_lps_points,
                             voxel_to_grid_sample, voxel_to_normalized)
from keyreg.models import ArchitectureConfig, KeypointDetector, ModelConfig
from keyreg.errors import ConfigError
from keyreg.io import Volume
from keyreg.preprocess import (GridSpec, IntensitySpec, PreprocessConfig, background_level, network_grid_affine,
                               to_network_input)
from keyreg.transforms import AffineTransform, fit_tps
from keyreg.warp import source_index_fn, warp_image

DT = torch.float64


# ------------------------------------------------------------------------------ frames

def test_normalised_frame_is_corner_aligned():
    idx = torch.tensor([[0.0, 0.0, 0.0], [4.0, 9.0, 2.0], [2.0, 4.5, 1.0]])
    u = voxel_to_normalized(idx, (5, 10, 3))
    torch.testing.assert_close(u, torch.tensor([[-1.0, -1, -1], [1, 1, 1], [0, 0, 0]]))
    torch.testing.assert_close(normalized_to_voxel(u, (5, 10, 3)), idx)
    assert voxel_to_normalized(torch.tensor([[0.0, 0, 0]]), (1, 1, 1)).abs().max() == 0


def test_grid_sample_order_is_reversed_in_one_place():
    vol = torch.zeros(1, 1, 5, 6, 7)
    vol[0, 0, 1, 4, 2] = 1.0
    grid = voxel_to_grid_sample(torch.tensor([[1.0, 4.0, 2.0]]), (5, 6, 7)).view(1, 1, 1, 1, 3)
    out = torch.nn.functional.grid_sample(vol, grid, align_corners=True)
    assert out.item() == 1.0


def test_apply_affine_matches_nibabel(oblique_fixed_grid):
    _, aff = oblique_fixed_grid
    pts = np.random.default_rng(0).random((10, 3)) * 30
    np.testing.assert_allclose(apply_affine(torch.as_tensor(aff), torch.as_tensor(pts)).numpy(),
                               nib.affines.apply_affine(aff, pts), atol=1e-12)


def test_ras_lps_flip():
    m = np.eye(4)
    m[:3, 3] = [10, 20, 30]
    np.testing.assert_array_equal(ras_to_lps_matrix(m)[:3, 3], [-10, -20, 30])
    np.testing.assert_array_equal(ras_to_lps_points(np.array([[1.0, 2.0, 3.0]])), [[-1, -2, 3]])


def test_ras_network_grid_is_centred_and_axis_aligned(oblique_fixed_grid):
    shape, aff = oblique_fixed_grid
    grid = GridSpec("ras", (16, 20, 12), (2.0, 2.0, 3.0))
    net = network_grid_affine(aff, shape, grid)
    np.testing.assert_allclose(net[:3, :3], np.diag([2.0, 2.0, 3.0]))
    centre_img = aff @ np.r_[(np.asarray(shape) - 1) / 2, 1]
    centre_net = net @ np.r_[(np.asarray(grid.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_net, centre_img, atol=1e-12)


@pytest.mark.parametrize("outside", ["zero", "background"])
def test_grid_beyond_the_image_holds_zero_or_the_background_level(outside):
    """A network grid larger than the image: inside, the image's normalised values (the same in both
    modes); beyond it, 0 or the image's background level (the median of its faces: 0.3 here, as a
    noisy magnitude image's background after min-max; 0 for a border of mostly exact zeros)."""
    data = np.full((10, 10, 10), 0.3, dtype=np.float32)
    data[3:7, 3:7, 3:7] = 1.0
    data[4:6, 4:6, 4:6] = 0.0  # min-max: background 0.3 -> 0.3, bright cube -> 1, dark core -> 0
    vol = Volume(data * 500 + 100, np.diag([4.0, 4.0, 4.0, 1.0]))
    cfg = PreprocessConfig(GridSpec("ras", (16, 16, 16), (4.0, 4.0, 4.0)), IntensitySpec(outside=outside))
    x, _ = to_network_input(vol, cfg)  # grid voxel i reads image voxel i - 3
    x = x[0, 0].numpy()
    np.testing.assert_allclose(x[3:13, 3:13, 3:13], data, atol=1e-5)
    beyond = np.ones(x.shape, dtype=bool)
    beyond[2:14, 2:14, 2:14] = False  # one voxel of trilinear blending at the image's edge
    np.testing.assert_allclose(x[beyond], 0.3 if outside == "background" else 0.0, atol=1e-5)
    assert background_level(vol, cfg.intensity) == pytest.approx(0.3, abs=1e-6)
    head = np.where(data == np.float32(0.3), 0.0, data)  # the same image with a black background ...
    clipped = head + np.random.default_rng(0).normal(0.0, 0.05, data.shape).clip(0, None)  # ... and clipped noise
    assert background_level(Volume(clipped.astype(np.float32), vol.affine), cfg.intensity) == 0.0  # mostly exact zeros


def test_outside_mode_is_part_of_the_model_config():
    """``outside`` travels in a model's preprocessing config; configs without it (the official
    models, models trained before it) read as ``zero``; an unknown mode is a one-line config error."""
    cfg = PreprocessConfig(intensity=IntensitySpec(outside="background"))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert "outside" not in PreprocessConfig().to_dict()["intensity"]
    assert PreprocessConfig.from_dict({"intensity": {"method": "minmax"}}).intensity.outside == "zero"
    with pytest.raises(ConfigError, match="outside must be one of zero, background"):
        PreprocessConfig.from_dict({"intensity": {"outside": "noise"}})


def test_fov_network_grid_maps_corners_with_permutation(oblique_fixed_grid):
    shape, aff = oblique_fixed_grid
    grid = GridSpec("fov", (8, 9, 10), permute=(0, 2, 1))
    net = network_grid_affine(aff, shape, grid)
    # network voxel (a, b, c) is image voxel (a, c, b) scaled corner to corner
    last = net @ np.r_[7, 8, 9, 1]
    np.testing.assert_allclose(last, aff @ np.r_[shape[0] - 1, shape[1] - 1, shape[2] - 1, 1], atol=1e-9)
    mid = net @ np.r_[0, 8, 0, 1]  # last along network axis 1 = image axis 2
    np.testing.assert_allclose(mid, aff @ np.r_[0, 0, shape[2] - 1, 1], atol=1e-9)


# ------------------------------------------------------------------------------ keypoints -> world

class _Identity(nn.Module):
    """A 'backbone' whose single heatmap is the image itself: its center of mass is the image's."""

    reduction = 1

    def forward(self, x):
        return x


def _identity_detector(grid: GridSpec) -> KeypointDetector:
    cfg = ModelConfig("identity", ArchitectureConfig("conv", 1), PreprocessConfig(grid))
    det = KeypointDetector(cfg)
    det.backbone = _Identity()
    return det


@pytest.mark.parametrize("grid", [GridSpec("ras", (40, 44, 36), (1.5, 1.5, 1.5)),
                                  GridSpec("ras", (24, 30, 20), (2.5, 2.0, 3.0)),
                                  GridSpec("fov", (32, 40, 28), permute=(0, 2, 1))])
def test_keypoint_lands_on_the_world_position(oblique_fixed_grid, grid):
    shape, aff = oblique_fixed_grid
    centre = np.array([6.0, -4.0, 9.0])
    vol = make_volume(blob_image(shape, aff, [centre], radius=7.0), aff)
    [kp] = detect_keypoints(_identity_detector(grid), [vol])
    err = np.linalg.norm(kp.numpy()[0] - centre)
    assert err < 0.1, f"keypoint {kp.numpy()[0]} is {err:.3f} mm from the ball centre {centre}"


# ------------------------------------------------------------------------------ warping direction

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_translation_shifts_along_the_expected_axis(oblique_fixed_grid, axis):
    shape, aff = oblique_fixed_grid
    moving = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(axis))
    m = torch.eye(4, dtype=DT)
    m[:3, 3] = torch.as_tensor(aff[:3, axis])  # T(p) = p + one voxel step along voxel axis `axis`
    out = warp_image(moving, aff, shape, aff, AffineTransform(m))
    sl = [slice(None)] * 3
    sl_next = [slice(None)] * 3
    sl[axis] = slice(0, shape[axis] - 1)
    sl_next[axis] = slice(1, shape[axis])
    torch.testing.assert_close(out[0, 0][tuple(sl)], moving[0, 0][tuple(sl_next)], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ identity and recovery

def _keypoints(points: np.ndarray, grid_affine: np.ndarray, grid_shape) -> ImageKeypoints:
    t = torch.as_tensor(points, dtype=DT)
    return ImageKeypoints(t, torch.ones(len(points)), grid_affine, tuple(grid_shape))


def _fov_points(shape, affine, n=30, seed=0, margin=0.2):
    rng = np.random.default_rng(seed)
    idx = (margin + (1 - 2 * margin) * rng.random((n, 3))) * (np.asarray(shape) - 1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("align", ["rigid", "affine", "tps_0", "tps_10"])
def test_identical_keypoints_give_exact_identity_warp(oblique_fixed_grid, align):
    shape, aff = oblique_fixed_grid
    img = blob_image(shape, aff, _fov_points(shape, aff, 5, seed=3), radius=5.0)
    vol = make_volume(img, aff)
    kp = _keypoints(_fov_points(shape, aff), aff, shape)
    reg = Registrar(aligns=[align], device="cpu").register_keypoints(vol, vol, kp, kp)
    np.testing.assert_array_equal(reg[align].warped.data, img)


def _known(kind: str, centre: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation([0.4, -1.0, 0.8], 40)
    if kind == "affine":
        m[:3, :3] = m[:3, :3] @ np.array([[1.08, 0.1, 0.0], [0.0, 0.93, 0.07], [0.05, 0.0, 1.12]])
    m[:3, 3] = centre - m[:3, :3] @ centre + np.array([9.0, -6.0, 4.0])  # rotate about the centre, shift
    return m


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_known_linear_transform_recovered_on_oblique_grids(oblique_fixed_grid, oblique_moving_grid, kind):
    (fs, fa), (ms, ma) = oblique_fixed_grid, oblique_moving_grid
    centre = fa[:3, :3] @ ((np.asarray(fs) - 1) / 2) + fa[:3, 3]
    truth = _known(kind, centre)
    pf = _fov_points(fs, fa)
    pm = pf @ truth[:3, :3].T + truth[:3, 3]
    moving = make_volume(blob_image(ms, ma, _fov_points(ms, ma, 6, seed=5), radius=6.0), ma)
    fixed = make_volume(np.random.default_rng(0).random(fs).astype(np.float32), fa)
    reg = Registrar(aligns=[kind], device="cpu").register_keypoints(moving, fixed, _keypoints(pf, fa, fs),
                                                                 _keypoints(pm, ma, ms))
    res = reg[kind]
    assert np.abs(res.matrix - truth).max() < 1e-4
    # the warp samples the moving image exactly where the true transform says, in moving voxels
    to_src = source_index_fn(res.dense_transform(), fa, ma)
    idx = torch.as_tensor(np.stack(np.meshgrid(*[np.arange(n) for n in fs], indexing="ij"), -1)
                          .reshape(1, -1, 3), dtype=DT)
    true_src = (world_points(fs, fa).reshape(-1, 3) @ truth[:3, :3].T + truth[:3, 3]) @ \
        np.linalg.inv(ma)[:3, :3].T + np.linalg.inv(ma)[:3, 3]
    assert np.abs(to_src(idx)[0].numpy() - true_src).max() < 0.1
    # and rigid stays rigid in physical space although both grids are anisotropic and oblique
    if kind == "rigid":
        r = res.matrix[:3, :3]
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)


def test_known_tps_recovered_on_oblique_grids(oblique_fixed_grid, oblique_moving_grid):
    (fs, fa), (ms, ma) = oblique_fixed_grid, oblique_moving_grid
    centre = fa[:3, :3] @ ((np.asarray(fs) - 1) / 2) + fa[:3, 3]
    lin = _known("affine", centre)
    ctrl = _fov_points(fs, fa, 25, seed=11)
    bent = ctrl @ lin[:3, :3].T + lin[:3, 3] + np.random.default_rng(2).normal(0, 2.5, ctrl.shape)
    # same normalisation as the pipeline uses (the fixed grid's field of view), so affine parts compare
    truth = fit_tps(torch.as_tensor(ctrl)[None], torch.as_tensor(bent)[None], 0.0,
                    center=torch.as_tensor(fov_center(fa, fs)), scale=fov_half_extent(fa, fs))
    moving = make_volume(blob_image(ms, ma, _fov_points(ms, ma, 6, seed=5), radius=6.0), ma)
    fixed = make_volume(np.random.default_rng(0).random(fs).astype(np.float32), fa)
    reg = Registrar(aligns=["tps_0"], device="cpu", field_stride=1).register_keypoints(  # the exact field
        moving, fixed, _keypoints(ctrl, fa, fs), _keypoints(bent, ma, ms))
    res = reg["tps_0"]
    assert np.abs(res.transform.affine_part()[0].numpy() - truth.affine_part()[0].numpy()).max() < 1e-4
    grid_world = torch.as_tensor(world_points(fs, fa).reshape(1, -1, 3))
    exact = truth.map_points(grid_world)[0].numpy() @ np.linalg.inv(ma)[:3, :3].T + np.linalg.inv(ma)[:3, 3]
    idx = torch.as_tensor(np.stack(np.meshgrid(*[np.arange(n) for n in fs], indexing="ij"), -1).reshape(1, -1, 3),
                          dtype=DT)
    used = source_index_fn(res.dense_transform(), fa, ma)(idx)[0].numpy()  # through the sampled dense field
    assert np.abs(used - exact).max() < 0.1
    # the warped image is the moving image sampled there
    expected = warp_image(moving.tensor(), ma, fs, fa, truth)[0, 0].numpy()
    assert np.abs(reg["tps_0"].warped.data - expected).max() < 0.1


def test_rotation_about_follows_the_right_hand_rule():
    from keyreg.geometry import rotation_about

    r = rotation_about((0, 0, 2), 90)  # axis need not be unit
    np.testing.assert_allclose(r @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-15)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-15)
