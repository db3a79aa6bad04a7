"""The demo pair: the known transform really maps moving anatomy onto the template."""

import numpy as np
import pytest
import torch

pytest.importorskip("nilearn", reason="keyreg demo needs nilearn (pip install 'keyreg[demo]')")

from keyreg.demo import TRUE_ROTATION_DEG, demo_data, make_moving, rotation_angle, rotation_error  # noqa: E402
from keyreg.metrics import dice_per_label, mean_dice  # noqa: E402
from keyreg.transforms import AffineTransform, fit_affine  # noqa: E402
from keyreg.warp import warp_labels  # noqa: E402


def test_demo_pair_is_recoverable_from_its_known_map():
    fixed, seg, prob = demo_data(step=3)
    moving, moving_seg, psi = make_moving(fixed, seg, prob, step=3)
    assert set(np.unique(seg.data)) == {0, 2, 3, 24}
    assert moving.shape != fixed.shape and not np.allclose(moving.affine[:3, :3], np.diag(np.diag(moving.affine[:3, :3])))
    # CSF is the brightest tissue in the T2-like moving image
    means = {k: moving.data[moving_seg.data == k].mean() for k in (2, 3, 24)}
    assert means[24] > means[3] > means[2]
    # before registration the tissues barely overlap
    before = warp_labels(torch.from_numpy(moving_seg.data)[None], moving.affine, fixed.shape, fixed.affine)[0]
    assert mean_dice(dice_per_label(before.numpy(), seg.data)) < 0.4
    # an affine fitted to correspondences of the known map (fixed point psi(y) <-> moving point y)
    rng = np.random.default_rng(0)
    idx = rng.uniform(0, np.array(moving.shape) - 1, size=(200, 3))
    y = torch.from_numpy(idx @ moving.affine[:3, :3].T + moving.affine[:3, 3])[None]
    x = psi.map_points(y)
    matrix = fit_affine(x, y)
    assert abs(rotation_angle(matrix[0].numpy()) - TRUE_ROTATION_DEG) < 3
    assert rotation_error(matrix[0].numpy()) < 3 and TRUE_ROTATION_DEG >= 120
    after = warp_labels(torch.from_numpy(moving_seg.data)[None], moving.affine, fixed.shape, fixed.affine,
                        AffineTransform(matrix))[0]
    per = dice_per_label(after.numpy(), seg.data)  # 3 mm grids, two nearest resamplings: thin CSF suffers
    assert per[2] > 0.75 and per[3] > 0.75
    assert mean_dice(per) > mean_dice(dice_per_label(before.numpy(), seg.data)) + 0.3
