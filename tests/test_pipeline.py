"""The pipeline layer: Registrar stages, keypoint names and exclusion, padding, the caller's model untouched."""

from __future__ import annotations

import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import blob_image, grid_affine, make_volume, rotation, save_nifti, tiny_model
from keyreg.errors import DegenerateFitError
from keyreg.keypoints import ImageKeypoints
from keyreg.pipeline import Registrar, RegistrationOptions, resolve_model
from keyreg.transforms import DisplacementField, fit_tps, map_to_fixed, sample_field

CENTRES = [(-8.0, 4.0, 2.0), (7.0, -5.0, 6.0), (1.0, 9.0, -7.0), (-3.0, -8.0, -4.0)]


@pytest.fixture
def pair():
    shape = (24, 26, 22)
    aff = grid_affine((1.5, 1.4, 1.6), rotation([1, 0, 0], 8), shape=shape)
    img = blob_image(shape, aff, CENTRES, radius=5.0) + 0.01
    return make_volume(img, aff, "moving"), make_volume(img, aff, "fixed")


def test_half_resolution_twice_does_not_shrink_the_callers_model():
    net = tiny_model()
    before = net.config.preprocessing.grid.shape
    a = resolve_model(net, torch.device("cpu"), half_resolution=True)
    b = resolve_model(net, torch.device("cpu"), half_resolution=True)
    assert net.config.preprocessing.grid.shape == before == (24, 24, 24)
    assert a.config.preprocessing.grid.shape == b.config.preprocessing.grid.shape == (12, 12, 12)
    assert a.backbone is net.backbone  # weights shared, not copied


def test_a_training_model_is_copied_not_switched_to_eval():
    net = tiny_model().train()
    out = resolve_model(net, torch.device("cpu"))
    assert net.training and not out.training


def test_sample_field_of_a_displacement_field_is_the_field():
    shape, aff = (6, 7, 5), np.diag([2.0, 1.5, 1.0, 1.0])
    disp = torch.randn(1, 3, *shape)
    f = DisplacementField(disp, aff)
    out = sample_field(f, shape, aff, stride=1)
    torch.testing.assert_close(out.displacement, disp, atol=1e-5, rtol=0)


def test_map_to_fixed_reports_the_inverse_residual():
    g = torch.Generator().manual_seed(0)
    pf = torch.rand(1, 10, 3, generator=g, dtype=torch.float64) * 40
    tps = fit_tps(pf, pf + 0.5 * torch.randn(1, 10, 3, generator=g, dtype=torch.float64), 0.0,
                  center=torch.zeros(3, dtype=torch.float64), scale=20.0)
    q = tps.map_points(pf)
    p, res = map_to_fixed(tps, q)
    assert res.shape == (1, 10) and float(res.max()) < 1e-3
    np.testing.assert_allclose(p.numpy(), pf.numpy(), atol=1e-3)


def test_keypoint_names_label_the_outputs_and_exclusion_drops_them(pair, tmp_path):
    moving, fixed = pair
    net = tiny_model(num_keypoints=12)
    names = [f"lm_{i}" for i in range(12)]
    net.config.keypoint_names = names  # ModelConfig.keypoint_names
    reg = Registrar(net, device="cpu", aligns=("affine",), exclude_keypoints=("lm_1*",)).register(moving, fixed)
    assert reg.fixed_keypoints.names == names
    assert reg.excluded_keypoints == ["lm_1", "lm_10", "lm_11"]
    assert reg["affine"].fixed_keypoints.shape == (9, 3)
    reg.save(tmp_path)
    with open(tmp_path / "keypoints_fixed.csv", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == names
    with open(tmp_path / "affine" / "keypoints_aligned.csv", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [n for n in names if not n.startswith("lm_1")]


def test_exclusion_of_an_unnamed_model_uses_default_labels_and_refuses_too_few(pair):
    moving, fixed = pair
    net = tiny_model(num_keypoints=6)
    reg = Registrar(net, device="cpu", aligns=("rigid",), exclude_keypoints=("K-[12]",)).register(moving, fixed)
    assert reg.excluded_keypoints == ["K-1", "K-2"]
    with pytest.raises(DegenerateFitError, match=r"leaves 3 of 6 keypoints; an affine fit needs at least 4"):
        Registrar(net, device="cpu", aligns=("rigid", "affine"), exclude_keypoints=("K-[123]",)).register(moving, fixed)


def test_keypoints_are_cached_per_key(pair):
    moving, fixed = pair
    r = Registrar(tiny_model(), device="cpu", aligns=("affine",))
    r.register(moving, fixed, moving_key="m", fixed_key="f")
    r.register(moving, fixed, moving_key="m", fixed_key="f")
    assert r.network_passes == 2


def test_negative_background_is_padded_with_the_image_minimum(pair):
    _, fixed = pair
    ct = (fixed.data - 0.01) * 2000 - 1024  # CT-like: air -1024 everywhere outside the blobs
    moving = make_volume(ct.astype(np.float32), fixed.affine, "ct")
    # keypoints shifted 30 mm: much of the fixed grid maps outside the moving image
    kf = ImageKeypoints(torch.as_tensor(np.random.default_rng(0).random((8, 3)) * 20, dtype=torch.float64),
                        torch.ones(8), fixed.affine, fixed.shape)
    km = dataclasses.replace(kf, points=kf.points + torch.tensor([30.0, 0, 0], dtype=torch.float64))
    reg = Registrar(aligns=("affine",), device="cpu").register_keypoints(moving, fixed, kf, km)
    assert float(reg["affine"].warped.data.min()) == pytest.approx(-1024, abs=1e-3)
    assert float(reg["affine"].warped.data[-1, -1, -1]) == pytest.approx(-1024, abs=1e-3)
    reg0 = Registrar(aligns=("affine",), device="cpu", pad_value=0.0).register_keypoints(moving, fixed, kf, km)
    assert float(reg0["affine"].warped.data[-1, -1, -1]) == 0.0


def test_mgz_is_read_like_nifti(pair, tmp_path):
    moving, _ = pair
    save_nifti(tmp_path / "a.nii.gz", moving.data, moving.affine)
    nib.save(nib.MGHImage(moving.data.astype(np.float32), moving.affine), str(tmp_path / "a.mgz"))
    from keyreg.io import load_volume

    a, b = load_volume(tmp_path / "a.nii.gz"), load_volume(tmp_path / "a.mgz")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    assert b.name == "a" and b.header is None


def test_options_are_validated_once():
    with pytest.raises(Exception, match="field stride"):
        RegistrationOptions(field_stride=0)
    with pytest.raises(Exception, match="at most 8"):
        RegistrationOptions(field_stride=9)
    with pytest.raises(Exception, match="unknown label interpolation"):
        RegistrationOptions(label_interp="linear")
    assert RegistrationOptions(aligns=("tps_1.0", "affine")).aligns == ("tps_1", "affine")


# ------------------------------------------------------------------------------------------ batches

def _dirs(tmp_path, names=("a", "b")):
    shape = (24, 26, 22)
    aff = grid_affine((1.5, 1.4, 1.6), rotation([1, 0, 0], 8), shape=shape)
    img = blob_image(shape, aff, CENTRES, radius=5.0) + 0.01
    for sub in ("mov", "fix"):
        (tmp_path / sub).mkdir()
        for n in names:
            save_nifti(tmp_path / sub / f"{n}.nii.gz", img, aff)
    return tmp_path / "mov", tmp_path / "fix", img, aff


def _reg_args(mov, fix, model, out, *extra):
    return ["register", "--moving", str(mov), "--fixed", str(fix), "--load_path", str(model), "--list_of_aligns",
            "affine", "--save_dir", str(out), "--device", "cpu", *map(str, extra)]


def test_a_batch_survives_any_exception_of_a_pair(tmp_path, tiny_model_files, monkeypatch, capsys):
    from keyreg.cli import main

    mov, fix, _, _ = _dirs(tmp_path)
    real = Registrar.register

    def flaky(self, moving, fixed, **kw):
        if "b.nii" in str(moving):
            raise RuntimeError("boom")
        return real(self, moving, fixed, **kw)

    monkeypatch.setattr(Registrar, "register", flaky)
    out = tmp_path / "out"
    assert main(_reg_args(mov, fix, tiny_model_files, out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "b: internal error RuntimeError: boom" in err
    with open(out / "metrics.csv", newline="") as f:
        assert [r["pair"] for r in csv.DictReader(f)] == ["a"]
    import json
    assert json.loads((out / "metrics.json").read_text())["failures"] == [
        {"pair": "b", "error": "internal error RuntimeError: boom"}]


def test_skip_existing_redoes_a_pair_whose_input_changed_and_cleans_temporaries(tmp_path, tiny_model_files, capsys):
    import os

    from keyreg.cli import main

    mov, fix, img, aff = _dirs(tmp_path)
    out = tmp_path / "out"
    args = _reg_args(mov, fix, tiny_model_files, out, "--skip_existing")
    assert main(args) == 0
    (out / "pairs" / ".a.k1l2m3n4.tmp").mkdir()  # left by a killed run
    save_nifti(mov / "b.nii.gz", np.roll(img, 2, axis=0), aff)  # replaced input: same name, new content
    os.utime(mov / "b.nii.gz", ns=(1, 1))
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 pair(s) were already complete and skipped" in err
    assert not (out / "pairs" / ".a.k1l2m3n4.tmp").exists()


def test_moving_seg_without_fixed_seg_warns(tmp_path, tiny_model_files, capsys):
    from keyreg.cli import main

    mov, fix, img, aff = _dirs(tmp_path, ("a",))
    save_nifti(tmp_path / "seg.nii.gz", (img > 0.5).astype(np.int16), aff)
    assert main(_reg_args(mov / "a.nii.gz", fix / "a.nii.gz", tiny_model_files, tmp_path / "o",
                          "--moving_seg", tmp_path / "seg.nii.gz")) == 0
    assert "warning: --moving_seg is ignored without --fixed_seg" in capsys.readouterr().err


def test_training_label_warp_is_exact_for_large_ids():
    from keyreg.train.synth import warp_labels_on_grid

    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    labels[0, 0, 1:5, 1:5, 1:5] = 2**40 + 7  # not representable in float32
    eye = torch.eye(4, dtype=torch.float64)
    out = warp_labels_on_grid(labels, eye, (6, 6, 6), eye, eye[None])
    assert torch.equal(out, labels)


def test_the_warp_stage_warps_image_and_segmentation_in_one_pass_as_two_warps_would(pair, monkeypatch):
    from keyreg import results, warp
    from keyreg.results import warp_volume

    moving, fixed = pair
    ct = ((moving.data - 0.01) * 2000 - 1024).astype(np.float32)  # a negative background: padded with its min
    moving = make_volume(ct, moving.affine, "ct")
    seg = make_volume((moving.data > -500).astype(np.int16) * 300 + (moving.data > 0), moving.affine, "seg",
                      kind="labels")
    rng = np.random.default_rng(3)
    kf = ImageKeypoints(torch.as_tensor(rng.uniform(-12, 12, (10, 3))), torch.ones(10), fixed.affine, fixed.shape)
    km = dataclasses.replace(kf, points=kf.points + torch.as_tensor(rng.normal(0, 1.5, (10, 3))))
    calls = []
    real = warp.warp_image_and_labels
    monkeypatch.setattr(results, "warp_image_and_labels", lambda *a, **k: calls.append(a) or real(*a, **k))
    reg = Registrar(aligns=("affine", "tps_0"), device="cpu", label_interp="labelwise").register_keypoints(
        moving, fixed, kf, km, moving_seg=seg, fixed_seg=seg)
    assert len(calls) == 2 and all(a[0] is not None and a[1] is not None for a in calls)  # one pass per align
    for res in reg:
        dense = res.dense_transform()
        img = warp_volume(moving, fixed, dense)
        lab = warp_volume(seg, fixed, dense, kind="labels", interp="labelwise")
        np.testing.assert_array_equal(res.warped.data, img.data)
        np.testing.assert_array_equal(res.warped_seg.data, lab.data)
        assert res.warped_seg.data.dtype == np.int16 and float(res.warped.data.min()) == pytest.approx(-1024)


def test_api_refuses_unknown_names_and_reads_a_reference_as_a_grid(pair):
    from keyreg.errors import ConfigError

    moving, fixed = pair
    reg = Registrar(tiny_model(), device="cpu", aligns=("affine", "tps_1")).register(moving, fixed)
    assert reg["tps_1.0"] is reg["tps_1"]
    with pytest.raises(ConfigError, match="align 'tps_2' was not computed; available: affine, tps_1"):
        reg["tps_2"]
    with pytest.raises(ConfigError, match="unknown align 'bogus'"):
        reg.evaluate(["mse"], aligns=["bogus"])
    assert list(reg.evaluate(["mse"], aligns="tps_1.0")) == ["tps_1"]
    res = reg["affine"]
    with pytest.raises(ConfigError, match="kind must be image, labels or points, got 'label'"):
        res.apply(moving, kind="label")
    with pytest.raises(ConfigError, match="points_space must be moving or fixed, got 'world'"):
        res.apply(np.zeros((2, 3)), points_space="world")
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.0]])
    np.testing.assert_allclose(res.apply(torch.from_numpy(pts)), res.apply(pts))  # an (N, 3) tensor is points
    # a reference is a grid: its voxels (here constant) do not matter
    grid = (np.zeros((12, 13, 11), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert res.apply(moving, reference=grid).shape == (12, 13, 11)


def test_a_cache_key_reused_for_another_grid_detects_anew(pair):
    moving, fixed = pair
    r = Registrar(tiny_model(), device="cpu", aligns=("affine",))
    r.register(moving, fixed, moving_key="m", fixed_key="f")
    shifted = make_volume(np.asarray(fixed.data), fixed.affine @ np.array(
        [[1, 0, 0, 3.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "fixed")
    r.register(moving, shifted, moving_key="m", fixed_key="f")  # the same key, another grid
    assert r.network_passes == 3
