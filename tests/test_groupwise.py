"""Groupwise registration: the keypoint iteration, the image outputs and ``keyreg groupwise``."""

from __future__ import annotations

import gc
import json
import weakref

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import blob_image, grid_affine, rotation, save_nifti
from keyreg.cli import main
from keyreg.errors import ConfigError, ImageContentError
from keyreg.groupwise import groupwise, groupwise_keypoints, pairwise_dice
from keyreg.metrics import dice_per_label, mean_dice
from keyreg.transforms import fit_affine, fit_rigid

RNG = np.random.default_rng(7)
SHAPE_X = RNG.normal(0, 15, (14, 3))


def _distances(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def _rotated_copies(x=SHAPE_X, angles=(0, 20, -35, 50, 10), seed=1):
    rng = np.random.default_rng(seed)
    return [x @ rotation(rng.normal(size=3), a).T + rng.normal(0, 8, 3) for a in angles]


def test_rotated_copies_converge_to_a_common_mean():
    pts = _rotated_copies()
    fit = groupwise_keypoints(pts, "rigid", tolerance=1e-6)
    assert fit.converged and fit.iterations <= 3
    aligned = np.stack(fit.aligned_keypoints)
    assert np.abs(aligned - aligned[0]).max() < 1e-9  # every copy lands on the same points
    np.testing.assert_allclose(_distances(fit.template_keypoints), _distances(SHAPE_X), atol=1e-9)  # congruent
    assert fit.residuals.max() < 1e-9
    for t, p in zip(fit.transforms, pts):  # final transforms: template (fixed) -> each image (moving)
        np.testing.assert_allclose(t.map_points(torch.from_numpy(fit.template_keypoints)[None])[0].numpy(), p, atol=1e-9)
    # gauge: the template sits in the pose of the plain mean of the copies
    m0 = np.mean(pts, axis=0)
    g = fit_rigid(torch.from_numpy(fit.template_keypoints)[None], torch.from_numpy(m0)[None])[0].numpy()
    np.testing.assert_allclose(g[:3, :3], np.eye(3), atol=1e-9)


def test_final_transforms_are_fitted_from_the_original_keypoints():
    rng = np.random.default_rng(2)
    pts = [p @ (np.eye(3) + rng.normal(0, 0.08, (3, 3))).T + rng.normal(0, 1.0, p.shape) for p in _rotated_copies()]
    fit = groupwise_keypoints(pts, "affine", tolerance=1e-7)
    assert fit.converged and 2 <= fit.iterations < 50
    assert fit.shifts[-1] < 1e-7 < fit.shifts[0]
    m = torch.from_numpy(fit.template_keypoints)[None]
    for t, p in zip(fit.transforms, pts):
        direct = fit_affine(m, torch.from_numpy(p)[None])
        np.testing.assert_allclose(t.matrix.numpy(), direct.numpy(), atol=1e-9)
    # fixed point: the template is the gauge-fixed mean of the aligned keypoints
    a = np.mean(fit.aligned_keypoints, axis=0)
    g = fit_affine(torch.from_numpy(a)[None], torch.from_numpy(np.mean(pts, axis=0))[None])[0].numpy()
    np.testing.assert_allclose(a @ g[:3, :3].T + g[:3, 3], fit.template_keypoints, atol=1e-5)
    # the order of the images does not matter
    rev = groupwise_keypoints(pts[::-1], "affine", tolerance=1e-7)
    np.testing.assert_allclose(rev.template_keypoints, fit.template_keypoints, atol=1e-5)


def test_noisy_group_does_not_converge_in_one_iteration():
    rng = np.random.default_rng(4)
    pts = [p + rng.normal(0, 2.0, p.shape) for p in _rotated_copies()]
    fit = groupwise_keypoints(pts, "rigid", tolerance=1e-9, max_iterations=1)
    assert not fit.converged and fit.iterations == 1


@pytest.mark.parametrize("align", ["tps_0", "tps_5"])
def test_tps_group(align):
    rng = np.random.default_rng(5)
    pts = [p + rng.normal(0, 1.5, p.shape) for p in _rotated_copies()]
    fit = groupwise_keypoints(pts, align, tolerance=1e-4)
    assert fit.converged
    aligned = np.stack(fit.aligned_keypoints)
    spread = np.abs(aligned - fit.template_keypoints).max()
    if align == "tps_0":  # interpolating: every image's keypoints land exactly on the template
        assert spread < 1e-6 and fit.residuals.max() < 1e-6
    else:
        assert 1e-3 < spread < 5.0


def test_bad_groups():
    with pytest.raises(ConfigError, match="at least 2"):
        groupwise_keypoints([SHAPE_X], "rigid")
    with pytest.raises(ImageContentError, match="same number"):
        groupwise_keypoints([SHAPE_X, SHAPE_X[:-1]], "rigid")
    with pytest.raises(ConfigError, match="unknown align"):
        groupwise_keypoints([SHAPE_X, SHAPE_X], "similarity")


def test_pairwise_dice_matches_metrics(tmp_path):
    rng = np.random.default_rng(0)
    maps = [rng.choice([0, 2, 7, 70_000], size=(9, 8, 7), p=[0.4, 0.3, 0.2, 0.1]) for _ in range(3)]
    maps[2][maps[2] == 7] = 0  # a label missing from one map
    files = []
    for i, m in enumerate(maps):
        files.append(tmp_path / f"{i}.npy")
        np.save(files[-1], m)
    d = pairwise_dice(files, sorted({int(v) for m in maps for v in np.unique(m)}))
    for i in range(3):
        for j in range(3):
            expected = 1.0 if i == j else mean_dice(dice_per_label(maps[i], maps[j]))
            assert d[i, j] == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------ with images

CENTRES = np.array([(-10.0, 6.0, 3.0), (9.0, -7.0, 8.0), (3.0, 11.0, -9.0), (-4.0, -10.0, -5.0), (6.0, 2.0, -2.0)])


@pytest.fixture
def group(tmp_path):
    """Four images of one phantom, each rotated and shifted, on different grids; label maps; keypoints."""
    img_dir, seg_dir = tmp_path / "img", tmp_path / "seg"
    img_dir.mkdir()
    seg_dir.mkdir()
    kps = []
    for n, (deg, shift, shape) in enumerate([(0, (0, 0, 0), (28, 30, 26)), (18, (3, -2, 1), (30, 28, 26)),
                                             (-22, (-2, 3, 2), (26, 30, 28)), (30, (1, 1, -3), (28, 28, 30))]):
        r = rotation([0.3, 1.0, 0.2], deg)
        c = CENTRES @ r.T + np.asarray(shift)
        aff = grid_affine((1.4, 1.3, 1.5), rotation([1, 0, 0], 5 * n), shape=shape)
        img = blob_image(shape, aff, c, radius=4.5)
        seg = np.zeros(shape, np.int16)
        for lab, lev in zip((3, 8, 12, 20, 41), np.linspace(0.3, 1.0, 5)):
            seg[np.abs(img - lev) < 1e-3] = lab
        save_nifti(img_dir / f"s{n}.nii.gz", img + 0.02 * np.random.default_rng(n).random(shape).astype(np.float32), aff)
        save_nifti(seg_dir / f"s{n}.nii.gz", seg, aff)
        kps.append(c)
    return img_dir, seg_dir, kps


def _dice_of(files) -> float:
    maps = [np.asanyarray(nib.load(str(f)).dataobj) for f in files]
    return float(np.mean([mean_dice(dice_per_label(maps[i], maps[j]))
                          for i in range(len(maps)) for j in range(i + 1, len(maps))]))


def test_groupwise_with_given_keypoints_aligns_the_images(group, tmp_path):
    img_dir, seg_dir, kps = group
    names = sorted(p.name for p in img_dir.iterdir())
    out = tmp_path / "gw"
    res = groupwise([img_dir / n for n in names], segs=[seg_dir / n for n in names], keypoints=kps, align="rigid",
                    save_dir=out, progress=False)
    assert res.fit.converged
    s = res.metrics["summary"]
    assert s["pairwise_dice_mean"] > 0.75  # the phantom's labels overlap once aligned
    # outputs on the common template grid
    tmpl = nib.load(str(out / "template.nii.gz"))
    assert tmpl.shape == res.template_grid.shape
    for n in ("s0", "s1", "s2", "s3"):
        d = out / "images" / n
        for f in ("warped.nii.gz", "warped_seg.nii.gz", "transform_matrix.txt", "transform.tfm",
                  "transform_0GenericAffine.mat", "transform.lta", "keypoints.csv", "keypoints_aligned.csv"):
            assert (d / f).is_file(), f"{n}/{f}"
        assert nib.load(str(d / "warped.nii.gz")).shape == tmpl.shape
        np.testing.assert_allclose(nib.load(str(d / "warped.nii.gz")).affine, tmpl.affine, atol=1e-5)
    warped_segs = [out / "images" / n / "warped_seg.nii.gz" for n in ("s0", "s1", "s2", "s3")]
    assert _dice_of(warped_segs) == pytest.approx(s["pairwise_dice_mean"], abs=1e-9)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["pairwise_dice"]["matrix"]) == 4 and {r["image"] for r in metrics["images"]} == {"s0", "s1", "s2", "s3"}
    assert all(r["jdstd"] == 0.0 and r["jdlessthan0"] == 0.0 for r in metrics["images"])  # rigid
    assert (out / "metrics.csv").read_text().startswith("image,keypoint_residual_mm,jdstd,jdlessthan0")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.suffix == ".npy"], "staging files left"
    # without aligning (identity), the same label maps overlap much less
    unaligned = groupwise([img_dir / n for n in names], segs=[seg_dir / n for n in names],
                          keypoints=[kps[0]] * 4, align="rigid", progress=True)
    assert unaligned.metrics["summary"]["pairwise_dice_mean"] < s["pairwise_dice_mean"] - 0.2
    # before: the label maps as they are, resampled onto the first image's grid (here by scipy)
    from scipy.ndimage import affine_transform

    ref = nib.load(str(seg_dir / names[0]))
    segs = [nib.load(str(seg_dir / n)) for n in names]
    before = [affine_transform(np.asarray(m.dataobj), np.linalg.inv(m.affine) @ ref.affine, output_shape=ref.shape,
                               order=0, cval=0) for m in segs]
    want = np.mean([mean_dice(dice_per_label(before[i], before[j])) for i in range(4) for j in range(i + 1, 4)])
    assert s["pairwise_dice_before_mean"] == pytest.approx(want, abs=1e-9)
    assert s["pairwise_dice_before_mean"] < s["pairwise_dice_mean"] - 0.2


def test_groupwise_cli_tiny_model_one_pass_per_image(group, tmp_path, tiny_model_files, monkeypatch, capsys):
    import keyreg.groupwise as gw
    from keyreg.models import KeypointDetector

    img_dir, seg_dir, _ = group
    calls, alive, refs = [], [], []
    infer = KeypointDetector.infer

    def counting_infer(self, x, **kw):  # images the network reads (a lone CPU image runs as a batch of two)
        calls.append(x.shape[0])
        return infer(self, x, **kw)

    load = gw.load_volume

    def tracking_load(*a, **k):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        v = load(*a, **k)
        refs.append(weakref.ref(v))
        return v

    monkeypatch.setattr(KeypointDetector, "infer", counting_infer)
    monkeypatch.setattr(gw, "load_volume", tracking_load)
    out = tmp_path / "gw"
    rc = main(["groupwise", str(img_dir), "--segs", str(seg_dir), "--load_path", str(tiny_model_files),
               "--align", "tps_1", "--save_dir", str(out), "--device", "cpu", "--max_iterations", "20"])
    assert rc == 0
    assert sum(calls) == 4  # one network pass per image
    assert max(alive) <= 1  # at most one other volume alive when the next is loaded (image before its labels)
    stdout = capsys.readouterr().out
    assert "4 images, 12 keypoints in the fit, tps_1" in stdout and "pairwise Dice" in stdout
    assert (out / "template.nii.gz").is_file() and (out / "template_keypoints.csv").is_file()
    for n in ("s0", "s1", "s2", "s3"):
        assert (out / "images" / n / "warp.nii.gz").is_file() and (out / "images" / n / "tps.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(np.isfinite(r["jdstd"]) and r["jdstd"] > 0 for r in metrics["images"])  # TPS: not constant


def test_groupwise_list_file_and_errors(group, tmp_path, capsys):
    img_dir, _, kps = group
    lst = tmp_path / "list.txt"
    lst.write_text("# images\nimg/s0.nii.gz\n\n" + str(img_dir / "s1.nii.gz") + "\n")
    rc = main(["groupwise", str(lst), "--load_path", "no-such-model", "--save_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown model 'no-such-model'" in err[0]
    assert not (tmp_path / "o").exists()
    rc = main(["groupwise", str(img_dir / "s0.nii.gz"), "--save_dir", str(tmp_path / "o")])
    assert rc == 2 and "at least 2 images" in capsys.readouterr().err


def test_groupwise_leaves_out_excluded_keypoints(group, tmp_path):
    """--exclude_keypoints (and a model's fit_exclude) applies to groupwise fits as to pairwise ones."""
    img_dir, _, kps = group
    names = sorted(p.name for p in img_dir.iterdir())
    images = [img_dir / n for n in names]
    full = groupwise(images, keypoints=kps, align="rigid", progress=False)
    res = groupwise(images, keypoints=kps, align="rigid", exclude_keypoints=["K-1"], save_dir=tmp_path / "gw",
                    progress=False)
    k = len(kps[0])
    assert res.metrics["summary"]["keypoints_left_out"] == ["K-1"]
    assert full.metrics["summary"]["keypoints_left_out"] == []
    assert res.fit.template_keypoints.shape == (k - 1, 3)
    labels = (tmp_path / "gw" / "template_keypoints.csv").read_text().splitlines()[1:]
    assert [ln.split(",")[0] for ln in labels] == [f"K-{i}" for i in range(2, k + 1)]
    with pytest.raises(ConfigError, match="matches no keypoint name"):
        groupwise(images, keypoints=kps, align="rigid", exclude_keypoints=["left-*"], progress=False)


def test_groupwise_refuses_a_template_grid_off_the_images(group, tmp_path):
    img_dir, _, kps = group
    images = [img_dir / n for n in sorted(p.name for p in img_dir.iterdir())]
    far = np.diag([5.0, 5.0, 5.0, 1.0])
    far[0, 3] = 5000.0
    save_nifti(tmp_path / "far.nii.gz", np.zeros((10, 10, 10), np.float32), far)
    with pytest.raises(ImageContentError, match="the template grid does not overlap this image"):
        groupwise(images, keypoints=kps, align="rigid", template_grid=tmp_path / "far.nii.gz",
                  save_dir=tmp_path / "gw", progress=False)
    assert not [p for p in (tmp_path / "gw").rglob("*") if p.is_file()]
