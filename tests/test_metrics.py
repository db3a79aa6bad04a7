"""Metrics: hand-checkable values on tiny synthetic volumes."""

import numpy as np
import pytest
import torch

from keyreg.errors import ConfigError
from keyreg.metrics import (compute_metrics, dice_per_label, hausdorff95_per_label, jacobian_determinant,
                            jacobian_determinant_stats, mean_dice, mse, ncc, parse_metrics,
                            soft_dice_per_label)
from keyreg.transforms import AffineTransform, DisplacementField


def test_parse_metrics_validates_and_deduplicates():
    assert parse_metrics(["MSE", "harddice", "mse"]) == ["mse", "harddice"]
    assert parse_metrics("ncc,jdstd") == ["ncc", "jdstd"]
    with pytest.raises(ConfigError, match="unknown metric 'dice'; use one of"):
        parse_metrics(["dice"])


def test_mse_and_ncc():
    a = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    assert mse(a, a) == 0
    assert mse(a, a + 0.5) == pytest.approx(0.25)
    assert ncc(a, 2 * a + 1) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert np.isnan(ncc(a, np.ones_like(a)))


def test_dice_counts_labels_in_either_map_and_excludes_background():
    fixed = np.zeros((4, 4, 4), int)
    warped = np.zeros((4, 4, 4), int)
    fixed[:2] = 1                      # 32 voxels
    warped[:1] = 1                     # 16 voxels, all inside
    warped[3, 3, 3] = 7                # label only in the warped map
    per = dice_per_label(warped, fixed)
    assert set(per) == {1, 7}
    assert per[1] == pytest.approx(2 * 16 / 48)
    assert per[7] == 0.0
    assert mean_dice(per) == pytest.approx((2 * 16 / 48) / 2)
    # a label absent from both maps is not a free Dice of 1
    assert 5 not in per


def test_hausdorff95_of_shifted_box_uses_spacing():
    a = np.zeros((20, 20, 20), int)
    b = np.zeros((20, 20, 20), int)
    a[5:15, 5:15, 5:15] = 3
    b[7:17, 5:15, 5:15] = 3            # shifted 2 voxels along axis 0
    hd = hausdorff95_per_label(b, a, spacing=(1.5, 1.0, 1.0))[3]
    assert hd == pytest.approx(3.0)     # 2 voxels x 1.5 mm
    assert hausdorff95_per_label(a, a, (1, 1, 1))[3] == 0.0
    c = np.zeros_like(a)
    c[0, 0, 0] = 9
    assert np.isnan(hausdorff95_per_label(c, a, (1, 1, 1))[3])


def test_soft_dice_identity_and_half_voxel_shift():
    seg = np.zeros((10, 10, 10), int)
    seg[2:8, 2:8, 2:8] = 4
    eye = np.eye(4)
    ident = AffineTransform(torch.eye(4, dtype=torch.float64)[None])
    assert soft_dice_per_label(seg, eye, seg, eye, ident)[4] == pytest.approx(1.0)
    shift = torch.eye(4, dtype=torch.float64)[None].clone()
    shift[0, 0, 3] = 0.5
    soft = soft_dice_per_label(seg, eye, seg, eye, AffineTransform(shift))[4]
    assert 0.9 < soft < 1.0


def test_jacobian_of_known_fields():
    shape = (6, 7, 8)
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    world = np.einsum("ab,b...->a...", affine[:3, :3], idx)
    # u = 0.1 * x_world along every axis: Jacobian = 1.1 I, det = 1.331 everywhere
    disp = torch.from_numpy(0.1 * world)[None]
    det = jacobian_determinant(DisplacementField(disp, affine))
    assert det.shape == shape
    np.testing.assert_allclose(det, 1.1**3, rtol=1e-12)
    stats = jacobian_determinant_stats(DisplacementField(disp, affine))
    assert stats["jdstd"] == pytest.approx(0.0, abs=1e-12) and stats["jdlessthan0"] == 0.0
    # folding: u = -2 x along the first axis gives det = -1
    fold = torch.zeros_like(disp)
    fold[0, 0] = torch.from_numpy(-2 * world[0])
    assert jacobian_determinant_stats(DisplacementField(fold, affine))["jdlessthan0"] == 1.0


def test_jacobian_of_affine_and_reflection():
    m = torch.eye(4, dtype=torch.float64)[None].clone()
    assert jacobian_determinant_stats(AffineTransform(m)) == {"jdstd": 0.0, "jdlessthan0": 0.0}
    m[0, 0, 0] = -1
    assert jacobian_determinant_stats(AffineTransform(m))["jdlessthan0"] == 1.0


def test_compute_metrics_requires_inputs_and_returns_per_label():
    seg = np.zeros((5, 5, 5), int)
    seg[1:4, 1:4, 1:4] = 2
    out = compute_metrics(["harddice", "jdstd"], warped_seg=seg, fixed_seg=seg,
                          transform=AffineTransform(torch.eye(4, dtype=torch.float64)[None]))
    assert out["harddice"] == 1.0 and out["harddice_per_label"] == {2: 1.0}
    assert out["jdstd"] == 0.0 and "jdlessthan0" not in out
    with pytest.raises(ConfigError, match="needs --moving_seg and --fixed_seg"):
        compute_metrics(["harddice"])


def test_brain_dice_counts_only_freesurfer_brain_structures():
    from keyreg.metrics import BRAIN_LABELS, brain_dice_per_label, brain_structures, mean_dice

    fixed = np.zeros((4, 4, 4), np.int64)
    fixed[0], fixed[1], fixed[2], fixed[3, :2] = 2, 60, 507, 61  # 507: extra-cerebral, 61: not a brain structure
    warped = fixed.copy()
    warped[2] = 0  # the extra-cerebral label is lost: no effect on brain Dice
    warped[3] = 1
    assert list(BRAIN_LABELS) == list(range(2, 61))
    assert set(np.unique(brain_structures(fixed)).tolist()) == {0, 2, 60}
    assert brain_dice_per_label(warped, fixed) == {2: 1.0, 60: 1.0}
    out = compute_metrics(["braindice", "harddice"], warped_seg=warped, fixed_seg=fixed)
    assert out["braindice"] == 1.0 and out["braindice_per_label"] == {2: 1.0, 60: 1.0}
    assert out["harddice"] < 1.0 and mean_dice(out["harddice_per_label"]) == out["harddice"]


def test_mse_and_ncc_chunked_equal_the_float64_formulas():
    """mse and ncc run over float64 chunks (no full-size float64 copies); on a volume spanning
    several chunks they equal the plain float64 formulas to rounding."""
    from keyreg.metrics import _CHUNK

    rng = np.random.default_rng(3)
    a = rng.random((3, _CHUNK // 2 + 7), dtype=np.float32)  # 1.5 chunks, not a multiple of the chunk
    b = (0.7 * a + 0.3 * rng.random(a.shape, dtype=np.float32)).astype(np.float32)
    x, y = a.astype(np.float64), b.astype(np.float64)
    assert mse(a, b) == pytest.approx(float(np.mean((x - y) ** 2)), rel=1e-12)
    assert ncc(a, b) == pytest.approx(float(np.corrcoef(x.ravel(), y.ravel())[0, 1]), rel=1e-12)
