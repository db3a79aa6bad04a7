"""QC figures are real PNGs that show the data (not blank canvases)."""

import numpy as np
from matplotlib.image import imread

from keyreg.io import Volume
from keyreg.viz import canonical_view, save_keypoint_figure, save_qc_figure


def _volume(affine):
    data = np.zeros((20, 24, 16), np.float32)
    data[5:15, 6:18, 4:12] = 1.0
    return Volume(data, affine, name="box")


def test_canonical_view_flips_las_to_ras():
    aff = np.diag([-2.0, 1.0, 1.5, 1.0])
    aff[:3, 3] = [10, -5, 3]
    vol = _volume(aff)
    data, canon = canonical_view(vol)
    assert canon[0, 0] > 0
    # the same world point is reached through both grids
    ijk = np.array([3, 4, 5, 1.0])
    world = aff @ ijk
    back = np.linalg.inv(canon) @ world
    np.testing.assert_allclose(data[tuple(np.round(back[:3]).astype(int))], vol.data[3, 4, 5])


def test_qc_figure_is_a_png_with_content(tmp_path):
    vol = _volume(np.diag([1.0, 1.0, 2.0, 1.0]))
    kp = np.array([[10.0, 12.0, 16.0], [5.0, 8.0, 14.0]])
    out = save_qc_figure(tmp_path / "qc.png", vol, vol, vol, fixed_keypoints=kp, moving_keypoints=kp,
                         aligned_keypoints=kp, title="test")
    img = imread(out)
    assert img.ndim == 3 and img.shape[0] > 300
    assert img[..., :3].std() > 0.05  # not a blank page
    assert not list(tmp_path.glob("*.tmp*"))


def test_keypoint_figure(tmp_path):
    vol = _volume(np.eye(4))
    out = save_keypoint_figure(tmp_path / "kp.png", vol, np.array([[10.0, 12.0, 8.0]]))
    assert imread(out).shape[1] > 300
