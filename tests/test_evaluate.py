"""``keyreg evaluate`` on tiny synthetic label maps (32^3) with a tiny random model."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import grid_affine, rotation, save_nifti, tiny_model
from keyreg.cli import main
from keyreg.errors import ConfigError
from keyreg.evaluate import (CSV_COLUMNS, PAIR_KINDS, EvalImage, draw_perturbation, evaluate,
                             images_from_csv, images_from_directories, images_from_label_maps, make_pairs,
                             perturb)
from keyreg.io import Volume
from keyreg.warp import warp_labels

SHAPE = (32, 32, 32)


def label_map(seed: int, affine: np.ndarray) -> np.ndarray:
    """A head-like ellipsoid (label 1) with five asymmetric balls (labels 20..60), jittered per seed."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(float)
    p = idx @ affine[:3, :3].T + affine[:3, 3]
    lab = np.zeros(SHAPE, np.int16)
    lab[((p / np.array([38.0, 42.0, 34.0])) ** 2).sum(-1) <= 1] = 1
    centres = [(-15, 10, 5), (12, -8, 10), (5, 18, -10), (-8, -15, -6), (18, 12, -4)]
    for lab_id, c in zip((20, 30, 40, 50, 60), centres):
        c = np.asarray(c, float) + rng.normal(0, 2, 3)
        lab[np.linalg.norm(p - c, axis=-1) <= 7 + rng.uniform(-1, 1)] = lab_id
    return lab


@pytest.fixture
def label_dir(tmp_path):
    """Two subjects' label maps on 3 mm grids (one of them LIA-oriented and oblique)."""
    d = tmp_path / "labelmaps"
    d.mkdir()
    lia = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)
    for s, rot in enumerate([np.eye(3), rotation([1, 1, 0], 10) @ lia]):
        aff = grid_affine((3.0, 3.0, 3.0), rot, shape=SHAPE)
        save_nifti(d / f"subj{s}.nii.gz", label_map(s, aff), aff)
    return d


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_on_label_maps_writes_csv_summary_and_plot(label_dir, tiny_model_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["evaluate", "--label_maps", str(label_dir), "--contrasts", "t1", "t2", "--max_pairs", "1",
               "--rotations", "0", "180", "--list_of_aligns", "affine",
               "--load_path", str(tiny_model_files), "--save_dir", str(out), "--device", "cpu", "--no_progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| pair kind | align |" in captured.out
    assert "none=" not in captured.err  # --no_progress (as for register), alias of --quiet: no per-task lines
    rows = read_rows(out / "evaluation.csv")
    assert list(rows[0]) == CSV_COLUMNS
    # 2 subjects x 2 contrasts = 4 images, 4 ordered pairs per kind, one kept per kind (--max_pairs 1)
    assert {k: len({r["pair"] for r in rows if r["kind"] == k}) for k in PAIR_KINDS} == {k: 1 for k in PAIR_KINDS}
    assert len(rows) == 3 * 2 * 2  # pairs x rotations x (none + affine), one metric
    assert {(r["align"], r["rotation_deg"]) for r in rows} == {(a, d) for a in ("none", "affine")
                                                               for d in ("0", "180")}
    assert {r["metric"] for r in rows} == {"harddice"}
    for r in rows:
        assert r["moving"] != r["fixed"]
        subj_m, mod_m = r["moving"].rsplit("_", 1)
        subj_f, mod_f = r["fixed"].rsplit("_", 1)
        assert (mod_m, mod_f) == (r["moving_modality"], r["fixed_modality"])
        expect = {"same_subject_cross_modality": subj_m == subj_f and mod_m != mod_f,
                  "cross_subject_same_modality": subj_m != subj_f and mod_m == mod_f,
                  "cross_subject_cross_modality": subj_m != subj_f and mod_m != mod_f}
        assert expect[r["kind"]], r
        assert 0.0 <= float(r["value"]) <= 1.0
        assert math.isclose(np.linalg.norm([float(r[f"axis_{c}"]) for c in "xyz"]), 1.0, rel_tol=1e-5)
    # same subject, rotation 0: the segmentations are identical before registration
    same0 = [r for r in rows if r["kind"] == "same_subject_cross_modality" and r["rotation_deg"] == "0"
             and r["align"] == "none"]
    assert [float(r["value"]) for r in same0] == [1.0]
    summary = (out / "summary.md").read_text()
    assert "| same_subject_cross_modality | affine |" in summary and "180°" in summary
    png = (out / "dice_vs_rotation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def twin_dirs(tmp_path, label_dir):
    """Two files with identical content under different names (+ segmentations)."""
    import nibabel as nib

    img_dir, seg_dir = tmp_path / "img", tmp_path / "seg"
    img_dir.mkdir()
    seg_dir.mkdir()
    seg = nib.load(label_dir / "subj0.nii.gz")
    lab = np.asarray(seg.dataobj)
    rng = np.random.default_rng(0)
    table = rng.uniform(0.2, 1.0, 61)
    table[0] = 0
    img = table[lab] + 0.02 * rng.standard_normal(lab.shape)
    for name in ("a.nii.gz", "b.nii.gz"):
        save_nifti(img_dir / name, img.astype(np.float32), seg.affine)
        save_nifti(seg_dir / name, lab, seg.affine)
    return img_dir, seg_dir


def test_identical_images_rotation0_affine_dice_high_and_rot180_is_not_identity(twin_dirs, model):
    images = images_from_directories(*twin_dirs)
    assert [i.subject for i in images] == ["a", "b"]
    pairs = make_pairs(images, ["cross_subject_same_modality"])
    assert [(p.moving, p.fixed) for p in pairs] == [(0, 1), (1, 0)]
    res = evaluate(images, pairs, model=model, aligns=["affine"], rotations=[0, 180], progress=False)
    assert not res.failures

    def values(align, rot):
        return [r["value"] for r in res.rows if r["align"] == align and r["rotation_deg"] == rot]

    assert values("none", 0.0) == [1.0, 1.0]
    assert min(values("affine", 0.0)) > 0.95
    # a half turn about one axis moves the anatomy: before-registration Dice drops
    assert max(values("none", 180.0)) < 0.9
    assert max(values("none", 180.0)) < min(values("none", 0.0)) - 0.1


def test_an_unexpected_error_in_one_task_is_recorded_and_the_evaluation_goes_on(twin_dirs, model, monkeypatch):
    import keyreg.evaluate.protocol as protocol

    real = protocol.perturb
    calls = []

    def flaky(*args, **kw):  # the second task hits a bug (not a KeyregError)
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("float division by zero")
        return real(*args, **kw)

    monkeypatch.setattr(protocol, "perturb", flaky)
    images = images_from_directories(*twin_dirs)
    pairs = make_pairs(images, ["cross_subject_same_modality"])
    res = evaluate(images, pairs, model=model, aligns=["affine"], rotations=[0], progress=False)
    assert len(calls) == 2 and len(res.failures) == 1
    assert res.failures[0][1] == "internal error ZeroDivisionError: float division by zero"
    assert {r["pair"] for r in res.rows} == {"a_to_b"}


def test_seeded_reproducibility(label_dir, model):
    one = [label_dir / "subj0.nii.gz"]
    images, _ = images_from_label_maps(one, ["t1", "t2"], seed=3)
    images2, _ = images_from_label_maps(one, ["t1", "t2"], seed=3)
    for a, b in zip(images, images2):
        np.testing.assert_array_equal(a.image.data, b.image.data)
    other, _ = images_from_label_maps(one, ["t1", "t2"], seed=4)
    assert not np.array_equal(images[0].image.data, other[0].image.data)
    pairs = make_pairs(images)[:1]
    kw = dict(model=model, aligns=["tps_1"], rotations=[90], translation=5.0, scaling=0.05, progress=False)
    r1 = evaluate(images, pairs, seed=3, **kw).rows
    r2 = evaluate(images2, pairs, seed=3, **kw).rows
    assert r1 == r2 and [r["align"] for r in r1] == ["none", "tps_1"]
    r3 = evaluate(images, pairs, seed=5, **kw).rows
    assert r3[0]["axis_x"] != r1[0]["axis_x"] and r3[0]["scale"] != r1[0]["scale"]
    for r in r1:
        assert all(abs(r[f"translation_{c}"]) <= 5.0 for c in "xyz") and 0.95 <= r["scale"] <= 1.05
        assert r["translation_x"] != 0.0


def test_keypoints_once_per_image_and_perturbation(label_dir, model):
    images, _ = images_from_label_maps([label_dir / "subj1.nii.gz"], ["t1", "t2", "pd"])
    pairs = make_pairs(images)
    assert len(pairs) == 6
    calls = []
    orig = model.infer

    def counting(x, **kw):  # images the network reads (a lone CPU image runs as a batch of two)
        calls.append(x.shape[0])
        return orig(x, **kw)

    model.infer = counting
    try:
        res = evaluate(images, pairs, model=model, aligns=["affine"], rotations=[0], progress=False)
        assert res.network_passes == 3 == sum(calls)  # rotation 0: every image once, not once per pair
        calls.clear()
        # fixed axis, no translation: the 90-degree perturbation of an image is shared by its pairs
        res = evaluate(images, pairs[:4], model=model, aligns=["affine"], rotations=[90], axis=(0, 0, 1),
                       progress=False)
        moving = {p.moving for p in pairs[:4]}
        assert res.network_passes == 3 + len(moving) == sum(calls)
    finally:
        del model.infer


def test_perturbations_are_single_axis_rotations_about_the_centre():
    c = np.array([10.0, -5.0, 3.0])
    seen_axes = []
    for angle in (45, 90, 135, 180):
        p = draw_perturbation(0, "a_to_b", angle)
        m = p.matrix(c)
        rot = m[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
        # the rotation angle is the requested one (a half turn stays a half turn)
        assert math.degrees(math.acos(np.clip((np.trace(rot) - 1) / 2, -1, 1))) == pytest.approx(angle)
        np.testing.assert_allclose(rot @ np.asarray(p.axis), p.axis, atol=1e-12)  # about its axis
        np.testing.assert_allclose(m[:3, :3] @ c + m[:3, 3], c, atol=1e-9)  # centre fixed
        seen_axes.append(p.axis)
        assert not p.is_identity
    assert len(set(seen_axes)) == 4  # a new random axis per angle
    assert draw_perturbation(0, "a_to_b", 0).is_identity
    fixed = draw_perturbation(7, "x", 90, axis=(0, 0, 2))
    assert fixed.axis == (0.0, 0.0, 1.0)
    np.testing.assert_allclose(fixed.matrix(np.zeros(3))[:3, :3], rotation([0, 0, 1], 90), atol=1e-12)
    assert draw_perturbation(1, "a_to_b", 45) == draw_perturbation(1, "a_to_b", 45)
    assert draw_perturbation(1, "a_to_b", 45) != draw_perturbation(2, "a_to_b", 45)
    with pytest.raises(ConfigError, match="--axis"):
        draw_perturbation(0, "x", 90, axis=(0, 0, 0))
    with pytest.raises(ConfigError, match="--scaling"):
        draw_perturbation(0, "x", 90, scaling=1.5)


def test_header_and_resample_modes_move_the_segmentation_the_same_way():
    aff = grid_affine((2.0, 2.0, 2.0), np.eye(3), center_world=(4.0, -2.0, 1.0), shape=SHAPE)
    lab = label_map(1, aff).astype(np.int64)
    img = Volume((lab > 0).astype(np.float32) + lab / 60.0, aff, None, "img")
    seg = Volume(lab, aff, None, "seg", "labels")
    pert = draw_perturbation(0, "x", 90, axis=(0, 1, 0))  # maps voxel centres onto voxel centres
    img_h, seg_h, p = perturb(img, seg, pert, "header")
    np.testing.assert_allclose(seg_h.affine, p @ aff)
    assert seg_h.data is seg.data  # no resampling in header mode
    img_r, seg_r, _ = perturb(img, seg, pert, "resample")
    np.testing.assert_allclose(seg_r.affine, aff)
    from_header = warp_labels(torch.as_tensor(seg_h.data)[None], seg_h.affine, SHAPE, aff)[0].numpy()
    np.testing.assert_array_equal(from_header, seg_r.data)
    assert not np.array_equal(seg_r.data, lab)


def _fake(name, subject, modality):
    v = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4), None, name)
    return EvalImage(name, subject, modality, v, v)


def test_pair_kinds_never_pair_an_image_with_itself():
    images = [_fake("s1_t1", "s1", "t1"), _fake("s1_t2", "s1", "t2"), _fake("s2_t1", "s2", "t1"),
              _fake("s3_t1", "s3", "t1")]
    pairs = make_pairs(images)
    assert all(p.moving != p.fixed for p in pairs)
    by_kind = {k: sorted((p.moving, p.fixed) for p in pairs if p.kind == k) for k in PAIR_KINDS}
    assert by_kind["same_subject_cross_modality"] == [(0, 1), (1, 0)]
    assert by_kind["cross_subject_same_modality"] == [(0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2)]
    assert by_kind["cross_subject_cross_modality"] == [(1, 2), (1, 3), (2, 1), (3, 1)]
    assert len(make_pairs(images, ["cross_subject_same_modality"], max_pairs_per_kind=4)) == 4
    with pytest.raises(ConfigError, match="unknown pair kind"):
        make_pairs(images, ["same_image"])


def test_csv_input_groups_images_sharing_a_segmentation(twin_dirs, tmp_path):
    img_dir, seg_dir = twin_dirs
    shutil.copy(img_dir / "a.nii.gz", tmp_path / "a_t2.nii.gz")
    (tmp_path / "list.csv").write_text(
        "img_path,seg_path,modality\n"
        f"{img_dir / 'a.nii.gz'},{seg_dir / 'a.nii.gz'},t1\n"
        f"a_t2.nii.gz,{seg_dir / 'a.nii.gz'},t2\n"
        f"{img_dir / 'b.nii.gz'},{seg_dir / 'b.nii.gz'},t1\n")
    images = images_from_csv(tmp_path / "list.csv")
    assert [i.modality for i in images] == ["t1", "t2", "t1"]
    assert images[0].subject == images[1].subject != images[2].subject
    kinds = {(p.moving, p.fixed): p.kind for p in make_pairs(images)}
    assert kinds[(0, 1)] == "same_subject_cross_modality"
    assert kinds[(0, 2)] == "cross_subject_same_modality"
    assert kinds[(1, 2)] == "cross_subject_cross_modality"


@pytest.mark.parametrize("args,match", [
    ([], "give exactly one input"),
    (["--images", "X", "--csv", "Y"], "give exactly one input"),
    (["--label_maps", "/nonexistent/x.nii.gz"], "does not exist"),
    (["--label_maps", "LM", "--list_of_aligns", "similarity"], "unknown align"),
    (["--label_maps", "LM", "--axis", "0", "0", "0"], "--axis"),
    (["--label_maps", "LM", "--contrasts", "t1", "--pair_kinds", "same_subject_cross_modality"], "no pairs"),
])
def test_bad_options_give_one_line(label_dir, tiny_model_files, tmp_path, capsys, args, match):
    args = [str(label_dir) if a == "LM" else a for a in args]
    rc = main(["evaluate", *args, "--load_path", str(tiny_model_files), "--save_dir", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("keyreg evaluate: error:") and match in err[-1]
    assert not (tmp_path / "o").exists()
