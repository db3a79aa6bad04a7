"""``keyreg apply`` / ``keyreg invert`` and the :mod:`keyreg.apply` API.

Geometry is oblique, anisotropic and non-cubic (conftest grids); expected values come from the
written conventions (``moving_from_fixed``; points move with the inverse) and from SimpleITK.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import blob_image, grid_affine, rotation, save_nifti, world_points
from keyreg.apply import (apply_transform, compose, invert_on_grid, invert_saved_transform, load_saved_transform,
                          transform_points)
from keyreg.cli import main
from keyreg.formats import (read_markups, read_points_csv, save_transform, write_displacement_field,
                            write_markups_json, write_points_csv)
from keyreg.transforms import AffineTransform, fit_tps
from keyreg.warp import warp_image, warp_labels

F3 = np.diag([-1.0, -1.0, 1.0])
CENTRES = [(-9.0, 4.0, 3.0), (8.0, -6.0, 7.0), (2.0, 10.0, -8.0), (-4.0, -9.0, -5.0)]


def _rigid(degrees=14.0, shift=(6.0, -3.0, 2.5)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation([0.4, -0.3, 1.0], degrees)
    a[:3, 3] = shift
    return a


@pytest.fixture
def scene(tmp_path, oblique_fixed_grid, oblique_moving_grid):
    """moving.nii.gz (blobs + gradient) and fixed.nii.gz on two oblique anisotropic grids."""
    (fs, fa), (ms, ma) = oblique_fixed_grid, oblique_moving_grid
    p = world_points(ms, ma)
    moving = blob_image(ms, ma, CENTRES, radius=5.0) + 0.01 * (p[..., 0] + 2 * p[..., 1] - p[..., 2] + 60)
    fixed = blob_image(fs, fa, CENTRES, radius=5.0)
    save_nifti(tmp_path / "moving.nii.gz", moving.astype(np.float32), ma)
    save_nifti(tmp_path / "fixed.nii.gz", fixed.astype(np.float32), fa)
    return tmp_path, (fs, fa), (ms, ma), moving.astype(np.float32)


def _load(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _cli(*args) -> int:
    return main([*map(str, args)])


def _direct(moving, ma, fs, fa, transform, mode="linear"):
    return warp_image(torch.from_numpy(moving)[None, None], ma, fs, fa, transform, mode=mode)[0, 0].numpy()


def _sitk_resample(sitk, tmp_path, transform):
    m = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    f = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    out = sitk.Resample(m, f, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _interior(fs, fa, ms, ma, moving_points) -> np.ndarray:
    idx = moving_points @ np.linalg.inv(ma)[:3, :3].T + np.linalg.inv(ma)[:3, 3]
    return np.all((idx >= 1) & (idx <= np.asarray(ms) - 2), axis=-1)


# --------------------------------------------------------------------------------------- linear

@pytest.mark.parametrize("name", ["t_matrix.txt", "t.tfm", "t_itk.txt", "t0GenericAffine.mat", "t.lta"])
def test_apply_linear_every_format(scene, name, capsys):
    tmp, (fs, fa), (ms, ma), moving = scene
    a = _rigid()
    path = save_transform(tmp / name, a, moving_shape=ms, moving_affine=ma, fixed_shape=fs, fixed_affine=fa)
    ref = [] if name.endswith(".lta") else ["-r", tmp / "fixed.nii.gz"]  # an LTA records the fixed grid
    assert _cli("apply", tmp / "moving.nii.gz", "-t", path, "-o", tmp / "out.nii.gz", *ref) == 0
    assert "1 transform(s) in one resampling" in capsys.readouterr().out
    out = nib.load(str(tmp / "out.nii.gz"))
    assert out.shape == fs
    np.testing.assert_allclose(out.affine, fa, atol=1e-4)
    expected = _direct(moving, ma, fs, fa, AffineTransform(torch.from_numpy(a)))
    np.testing.assert_allclose(np.asarray(out.dataobj), expected, atol=1e-4)
    # the comparison means something: the identity would give another image
    assert np.abs(_direct(moving, ma, fs, fa, None) - expected).max() > 0.3


def test_apply_tfm_matches_simpleitk(scene):
    sitk = pytest.importorskip("SimpleITK")
    tmp, (fs, fa), (ms, ma), moving = scene
    a = _rigid(20.0, (4.0, 5.0, -3.0))
    save_transform(tmp / "t.tfm", a)
    assert _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "t.tfm", "-r", tmp / "fixed.nii.gz",
                "-o", tmp / "out.nii.gz") == 0
    ref = _sitk_resample(sitk, tmp, sitk.ReadTransform(str(tmp / "t.tfm")))
    pts = world_points(fs, fa) @ a[:3, :3].T + a[:3, 3]
    inside = _interior(fs, fa, ms, ma, pts)
    assert inside.mean() > 0.3
    assert np.abs(_load(tmp / "out.nii.gz") - ref)[inside].max() < 1e-3 * float(np.ptp(moving))


def _smooth_field(shape, affine, amp=2.0) -> np.ndarray:
    p = world_points(shape, affine)
    return np.stack([amp * np.sin(p[..., 1] / 9.0), amp * np.cos(p[..., 2] / 11.0),
                     0.6 * amp * np.sin(p[..., 0] / 7.0 + 0.4)], axis=-1).astype(np.float32)


def test_composition_is_one_resampling_in_ants_order(scene):
    """-t A -t F: out(p) = moving(A(F(p))); SimpleITK's CompositeTransform([A, F]) agrees."""
    sitk = pytest.importorskip("SimpleITK")
    tmp, (fs, fa), (ms, ma), moving = scene
    a = _rigid(10.0, (3.0, -2.0, 1.0))
    u = _smooth_field(fs, fa)
    save_transform(tmp / "a.tfm", a)
    write_displacement_field(tmp / "f.nii.gz", u, fa)
    assert _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "a.tfm", "-t", tmp / "f.nii.gz",
                "-o", tmp / "out.nii.gz") == 0  # default grid: the field's (last transform's) grid
    out = _load(tmp / "out.nii.gz")

    field_img = sitk.Cast(sitk.ReadImage(str(tmp / "f.nii.gz")), sitk.sitkVectorFloat64)
    composite = sitk.CompositeTransform([sitk.ReadTransform(str(tmp / "a.tfm")),
                                         sitk.DisplacementFieldTransform(field_img)])
    ref = _sitk_resample(sitk, tmp, composite)
    p = world_points(fs, fa)
    q = (p + u) @ a[:3, :3].T + a[:3, 3]  # A(F(p))
    inside = _interior(fs, fa, ms, ma, q)
    assert inside.mean() > 0.3
    rng = float(np.ptp(moving))
    assert np.abs(out - ref)[inside].max() < 2e-3 * rng
    # the other order is a different image, so the order test is meaningful
    _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "f.nii.gz", "-t", tmp / "a.tfm",
         "-r", tmp / "fixed.nii.gz", "-o", tmp / "rev.nii.gz")
    assert np.abs(_load(tmp / "rev.nii.gz") - ref)[inside].max() > 0.05 * rng


def test_composition_resamples_once(scene):
    """A half-voxel shift followed by its inverse is the identity: exact in one resampling, blurred in two."""
    tmp, _, (ms, ma), moving = scene
    s = np.eye(4)
    s[:3, 3] = ma[:3, :3] @ np.array([0.5, 0.5, 0.0])  # half a voxel along i and j of the moving grid
    save_transform(tmp / "s_matrix.txt", s)
    save_transform(tmp / "sinv_matrix.txt", np.linalg.inv(s))
    assert _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "s_matrix.txt", "-t", tmp / "sinv_matrix.txt",
                "-r", tmp / "moving.nii.gz", "-o", tmp / "once.nii.gz") == 0
    np.testing.assert_allclose(_load(tmp / "once.nii.gz"), moving, atol=1e-5)
    _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "s_matrix.txt", "-r", tmp / "moving.nii.gz", "-o", tmp / "a.nii.gz")
    _cli("apply", tmp / "a.nii.gz", "-t", tmp / "sinv_matrix.txt", "-r", tmp / "moving.nii.gz", "-o", tmp / "b.nii.gz")
    assert np.abs(_load(tmp / "b.nii.gz") - moving)[3:-3, 3:-3, 3:-3].max() > 0.05


@pytest.mark.parametrize("interp", ["linear", "cubic", "nearest"])
def test_apply_image_interpolations(scene, interp):
    tmp, (fs, fa), (ms, ma), moving = scene
    a = _rigid()
    save_transform(tmp / "t.tfm", a)
    assert _cli("apply", tmp / "moving.nii.gz", "-t", tmp / "t.tfm", "-r", tmp / "fixed.nii.gz",
                "--interp", interp, "-o", tmp / "o.nii.gz") == 0
    expected = _direct(moving, ma, fs, fa, AffineTransform(torch.from_numpy(a)), mode=interp)
    np.testing.assert_allclose(_load(tmp / "o.nii.gz"), expected, atol=1e-4)


# --------------------------------------------------------------------------------------- labels

@pytest.mark.parametrize("interp", ["nearest", "labelwise"])
def test_labels_large_ids_exact(scene, interp):
    tmp, (fs, fa), (ms, ma), _ = scene
    ids = np.array([0, 3, 70_000, 2**31 + 11, 2**40 + 5], dtype=np.int64)
    p = world_points(ms, ma)
    seg = ids[np.clip(((p[..., 0] + 40) // 16).astype(int), 0, 4)]
    img = nib.Nifti1Image(seg, ma, dtype=np.int64)
    nib.save(img, str(tmp / "seg.nii.gz"))
    a = _rigid()
    save_transform(tmp / "t.tfm", a)
    assert _cli("apply", tmp / "seg.nii.gz", "--labels", "--interp", interp, "-t", tmp / "t.tfm",
                "-r", tmp / "fixed.nii.gz", "-o", tmp / "o.nii.gz") == 0
    out = nib.load(str(tmp / "o.nii.gz"))
    assert out.get_data_dtype() == np.int64
    data = np.asanyarray(out.dataobj)
    assert set(np.unique(data)) <= set(ids.tolist())
    assert {2**31 + 11, 2**40 + 5} <= set(np.unique(data).tolist())
    direct = warp_labels(torch.from_numpy(seg)[None], ma, fs, fa, AffineTransform(torch.from_numpy(a)),
                         mode=interp)[0].numpy()
    np.testing.assert_array_equal(data, direct)


def test_labels_small_ids_get_the_smallest_integer_type(scene):
    tmp, (fs, fa), (ms, ma), _ = scene
    seg = (blob_image(ms, ma, CENTRES, radius=5.0) > 0.5).astype(np.int16) * 17
    save_nifti(tmp / "seg.nii.gz", seg, ma)
    save_transform(tmp / "t.tfm", np.eye(4))
    assert _cli("apply", tmp / "seg.nii.gz", "--labels", "-t", tmp / "t.tfm", "-r", tmp / "moving.nii.gz",
                "-o", tmp / "o.nii.gz") == 0
    out = nib.load(str(tmp / "o.nii.gz"))
    assert out.get_data_dtype() == np.uint8  # ids 0 and 17 fit in uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), seg)  # identity on the same grid: exact copy


# --------------------------------------------------------------------------------------- points

def _tps_doc(fs, fa, ms, ma, lam=0.0):
    rng = np.random.default_rng(3)
    pf = rng.uniform(-14, 14, (10, 3))
    pm = pf @ rotation([0, 0, 1], 8).T + np.array([2.0, -1.0, 1.5]) + rng.normal(0, 1.2, pf.shape)
    centre = fa[:3, :3] @ ((np.asarray(fs) - 1) / 2) + fa[:3, 3]
    return {"format": "keyreg-tps", "format_version": 1, "lambda": lam, "center_ras": centre.tolist(),
            "scale_mm": 30.0, "fixed_keypoints_ras": pf.tolist(), "moving_keypoints_ras": pm.tolist(),
            "weights": None, "fixed_grid": {"shape": list(fs), "affine": fa.tolist()},
            "moving_grid": {"shape": list(ms), "affine": ma.tolist()}}


def test_points_move_with_the_inverse_like_the_image(scene, capsys):
    """A landmark at q in the moving image is found at T^-1(q) in the warped image (TPS: Newton)."""
    tmp, (fs, fa), (ms, ma), _ = scene
    doc = _tps_doc(fs, fa, ms, ma)
    (tmp / "tps.json").write_text(json.dumps(doc))
    q = np.array([[3.0, -2.0, 4.0]])
    p_world = world_points(ms, ma)
    blob = np.exp(-((p_world - q[0]) ** 2).sum(-1) / (2 * 1.6**2)).astype(np.float32) + 1e-3
    save_nifti(tmp / "blob.nii.gz", blob, ma)
    write_points_csv(tmp / "q.csv", q, labels=["tip"])
    assert _cli("apply", tmp / "blob.nii.gz", "-t", tmp / "tps.json", "-o", tmp / "w.nii.gz") == 0
    assert _cli("apply", tmp / "q.csv", "-t", tmp / "tps.json", "-o", tmp / "p.csv") == 0
    assert "inverse residual" in capsys.readouterr().out
    p, labels = read_points_csv(tmp / "p.csv")
    assert labels == ["tip"]
    tps = fit_tps(torch.tensor(doc["fixed_keypoints_ras"])[None], torch.tensor(doc["moving_keypoints_ras"])[None],
                  0.0, center=torch.tensor(doc["center_ras"]), scale=30.0)
    np.testing.assert_allclose(tps.map_points(torch.from_numpy(p)[None])[0].numpy(), q, atol=1e-4)  # T(p) = q
    assert np.linalg.norm(p - q) > 2.0  # the transform really moves the point
    w = _load(tmp / "w.nii.gz").astype(np.float64) - 1e-3
    w[w < 0.2] = 0
    centroid = (world_points(fs, fa) * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    assert np.linalg.norm(centroid - p[0]) < 0.5, (centroid, p[0])
    # forward direction: T itself
    assert _cli("apply", tmp / "p.csv", "-t", tmp / "tps.json", "--points_direction", "fixed_to_moving",
                "-o", tmp / "q2.csv") == 0
    np.testing.assert_allclose(read_points_csv(tmp / "q2.csv")[0], q, atol=1e-4)


def test_points_linear_exact_and_slicer_markups(scene):
    tmp, *_ = scene
    a = _rigid()
    save_transform(tmp / "t.tfm", a)
    rng = np.random.default_rng(0)
    p = rng.uniform(-30, 30, (6, 3))
    q = p @ a[:3, :3].T + a[:3, 3]
    write_markups_json(tmp / "q.mrk.json", q)  # LPS on disk
    assert _cli("apply", tmp / "q.mrk.json", "-t", tmp / "t.tfm", "-o", tmp / "p.mrk.json") == 0
    doc = json.loads((tmp / "p.mrk.json").read_text())
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    got, _ = read_markups(tmp / "p.mrk.json")
    np.testing.assert_allclose(got, p, atol=1e-9)
    mapped, residual = transform_points(q, [tmp / "t.tfm"])
    np.testing.assert_allclose(mapped, p, atol=1e-9)
    assert residual.max() < 1e-9


# ------------------------------------------------------------------- outputs of keyreg register

@pytest.fixture
def registered(tmp_path, tiny_model_files):
    root = tmp_path / "d"
    root.mkdir()
    shape_f, shape_m = (28, 32, 24), (30, 26, 28)
    af = grid_affine((1.5, 1.2, 1.8), rotation([1, 0, 0], 10), shape=shape_f)
    am = grid_affine((1.4, 1.6, 1.3), rotation([0, 1, 1], 25), shape=shape_m)
    save_nifti(root / "f.nii.gz", blob_image(shape_f, af, CENTRES) + 0.01, af)
    mov = blob_image(shape_m, am, CENTRES)
    save_nifti(root / "m.nii.gz", mov + 0.01 * np.random.default_rng(0).random(shape_m).astype(np.float32), am)
    seg = (mov > 0.5).astype(np.int16) * 5 + (mov > 0.8).astype(np.int16) * 2
    save_nifti(root / "m_seg.nii.gz", seg, am)
    save_nifti(root / "f_seg.nii.gz", (blob_image(shape_f, af, CENTRES) > 0.5).astype(np.int16) * 5, af)
    out = tmp_path / "out"
    assert main(["register", "--moving", str(root / "m.nii.gz"), "--fixed", str(root / "f.nii.gz"),
                 "--moving_seg", str(root / "m_seg.nii.gz"), "--fixed_seg", str(root / "f_seg.nii.gz"),
                 "--load_path", str(tiny_model_files), "--list_of_aligns", "affine", "tps_0",
                 "--field_stride", "1",  # the exact TPS at every voxel, as `keyreg apply` of tps.json
                 "--save_eval_to_disk", "--save_dir", str(out), "--device", "cpu"]) == 0
    return root, out / "pairs" / "m_to_f"


def test_apply_align_directory_reproduces_register_outputs(registered):
    root, pair = registered
    for align in ("affine", "tps_0"):
        d = pair / align
        assert _cli("apply", root / "m.nii.gz", "-t", d, "-o", d / "again.nii.gz") == 0
        again, warped = _load(d / "again.nii.gz"), _load(d / "warped.nii.gz")
        assert again.shape == warped.shape
        np.testing.assert_allclose(again, warped, atol=1e-6 if align == "affine" else 1e-4)
        assert _cli("apply", root / "m_seg.nii.gz", "--labels", "-t", d, "-o", d / "seg_again.nii.gz") == 0
        seg_again, seg = _load(d / "seg_again.nii.gz"), _load(d / "warped_seg.nii.gz")
        if align == "affine":
            np.testing.assert_array_equal(seg_again, seg)
        else:  # float32 field vs exact TPS: ids may differ only on a few boundary voxels
            assert np.mean(seg_again != seg) < 1e-3
        assert _cli("apply", pair / "keypoints_moving.csv", "-t", d, "-o", d / "kp.csv") == 0
        np.testing.assert_allclose(read_points_csv(d / "kp.csv")[0],
                                   read_points_csv(d / "keypoints_aligned.csv")[0], atol=1e-3)
    st = load_saved_transform(pair / "tps_0")
    assert st.format == "tps" and st.fixed_grid is not None and st.moving_grid is not None
    assert st.fixed_grid.shape == (28, 32, 24) and st.moving_grid.shape == (30, 26, 28)
    # the tps.json refit is exact: the dense field written by register is the same map
    field = load_saved_transform(pair / "tps_0" / "warp.nii.gz").transform
    pts = torch.from_numpy(world_points((28, 32, 24), st.fixed_grid.affine)[::5, ::5, ::5].reshape(1, -1, 3))
    np.testing.assert_allclose(st.transform.map_points(pts).numpy(), field.map_points(pts).numpy(), atol=1e-3)


# --------------------------------------------------------------------------------------- invert

@pytest.mark.parametrize("name", ["t_matrix.txt", "t.tfm", "t0GenericAffine.mat", "t.lta"])
def test_invert_linear_exact_same_format(scene, name, capsys):
    tmp, (fs, fa), (ms, ma), _ = scene
    a = _rigid()
    a[:3, :3] = a[:3, :3] @ np.diag([1.1, 0.9, 1.05])
    path = save_transform(tmp / name, a, moving_shape=ms, moving_affine=ma, fixed_shape=fs, fixed_affine=fa)
    assert _cli("invert", path) == 0
    assert "exact inverse" in capsys.readouterr().out
    stem, suffix = name.rsplit(".", 1)
    inv_path = tmp / f"{stem}_inverse.{suffix}"
    inv = load_saved_transform(inv_path)
    assert inv.format == load_saved_transform(path).format
    np.testing.assert_allclose(inv.matrix @ a, np.eye(4), atol=1e-12)
    if name.endswith(".lta"):  # src and dst swap
        assert inv.fixed_grid.shape == ms and inv.moving_grid.shape == fs
        np.testing.assert_allclose(inv.fixed_grid.affine, ma, atol=1e-6)


def test_invert_output_suffix_decides(scene):
    tmp, *_ = scene
    a = _rigid()
    save_transform(tmp / "t_matrix.txt", a)
    assert _cli("invert", tmp / "t_matrix.txt", "-o", tmp / "inv.tfm") == 0
    assert (tmp / "inv.tfm").read_text().startswith("#Insight Transform File")
    np.testing.assert_allclose(load_saved_transform(tmp / "inv.tfm").matrix, np.linalg.inv(a), atol=1e-12)
    # `-t` as `keyreg apply` takes it: the same inverse
    assert _cli("invert", "-t", tmp / "t_matrix.txt", "-o", tmp / "inv_t.tfm") == 0
    assert (tmp / "inv_t.tfm").read_text() == (tmp / "inv.tfm").read_text()


def test_invert_tps_swapped_keypoints_reports_residual(scene, capsys):
    tmp, (fs, fa), (ms, ma), _ = scene
    doc = _tps_doc(fs, fa, ms, ma)
    (tmp / "tps.json").write_text(json.dumps(doc))
    assert _cli("invert", tmp / "tps.json") == 0
    out = capsys.readouterr().out
    assert "swapped keypoints" in out and "residual" in out
    inv_doc = json.loads((tmp / "tps_inverse.json").read_text())
    res = inv_doc["inverse_residual_mm"]
    assert f"max {res['max']:.4g} mm" in out
    assert 0 < res["mean"] <= res["max"] < 5.0
    inv = load_saved_transform(tmp / "tps_inverse.json")
    assert inv.fixed_grid.shape == ms and inv.moving_grid.shape == fs
    pm = torch.tensor(doc["moving_keypoints_ras"], dtype=torch.float64)[None]
    np.testing.assert_allclose(inv.transform.map_points(pm)[0].numpy(), doc["fixed_keypoints_ras"], atol=1e-8)
    # honest: the reported residual is |T(S(q)) - q| on the moving grid
    fwd = load_saved_transform(tmp / "tps.json").transform
    q = torch.from_numpy(world_points(ms, ma)[::4, ::4, ::4].reshape(1, -1, 3))
    r = (fwd.map_points(inv.transform.map_points(q)) - q).norm(dim=-1)
    assert r.max() == pytest.approx(res["max"], rel=0.5)


def test_invert_field_fixed_point(scene, capsys):
    tmp, (fs, fa), (ms, ma), moving = scene
    u = _smooth_field(fs, fa, amp=2.5)
    write_displacement_field(tmp / "warp.nii.gz", u, fa)
    assert _cli("invert", tmp / "warp.nii.gz", "--tolerance", "1e-4") == 0
    out = capsys.readouterr().out
    assert "fixed-point" in out
    max_res = float(out.split("max ")[1].split(" mm")[0])
    assert max_res < 1e-3
    assert "beyond the field's border" in out  # the border points are reported apart, not hidden
    n_points = int(out.split(" over ")[1].split(" points")[0])
    assert n_points > 0.7 * np.prod(fs)
    fwd = load_saved_transform(tmp / "warp.nii.gz").transform
    inv = load_saved_transform(tmp / "warp_inverse.nii.gz").transform
    p = torch.from_numpy(world_points(fs, fa)[4:-4:3, 4:-4:3, 4:-4:3].reshape(1, -1, 3))
    # interior points, where both fields are defined: T(T^-1(p)) = p
    np.testing.assert_allclose(fwd.map_points(inv.map_points(p)).numpy(), p.numpy(), atol=5e-3)


def test_invert_folding_field_reports_large_residual():
    """A field that folds has no inverse: the residual says so instead of pretending."""
    from keyreg.io import grid_volume
    from keyreg.transforms import DisplacementField

    shape, aff = (24, 24, 24), np.eye(4)
    x = torch.arange(24, dtype=torch.float32)
    disp = torch.zeros(1, 3, *shape)
    disp[0, 0] = (6.0 * torch.sin(x / 2.0)).view(-1, 1, 1)  # du/dx up to 3: folds
    field = DisplacementField(disp, torch.from_numpy(aff))
    _, residual = invert_on_grid(field, grid_volume(shape, aff), iterations=30)
    assert residual.max() > 0.5


def test_invert_api_tps_field_method(scene):
    tmp, (fs, fa), (ms, ma), _ = scene
    (tmp / "tps.json").write_text(json.dumps(_tps_doc(fs, fa, ms, ma, lam=1.0)))
    res = invert_saved_transform(tmp / "tps.json", method="field", tolerance=1e-4)
    assert res.method == "fixed_point" and res.fixed_grid.shape == ms
    assert res.residual_max_mm < 1e-3


def test_compose_multiplies_matrices():
    a, b = _rigid(), _rigid(-30, (1, 2, 3))
    t = compose([AffineTransform(torch.from_numpy(a)), AffineTransform(torch.from_numpy(b))])
    assert isinstance(t, AffineTransform)
    np.testing.assert_allclose(t.matrix[0].numpy(), a @ b, atol=1e-12)


def test_apply_api_returns_volume_on_reference(scene):
    tmp, (fs, fa), (ms, ma), moving = scene
    a = _rigid()
    vol = apply_transform(tmp / "moving.nii.gz", [AffineTransform(torch.from_numpy(a))], reference=tmp / "fixed.nii.gz")
    assert vol.shape == fs and vol.kind == "image"
    # the reference grid read back from float32 NIfTI headers differs by ~1e-6 mm; sampled positions are
    # float32 (keyreg.warp: within ~3e-5 voxel), and the image falls to 0 over one voxel at its edges
    np.testing.assert_allclose(vol.data, _direct(moving, ma, fs, fa, AffineTransform(torch.from_numpy(a))), atol=5e-5)


def test_invert_field_counts_apart_points_without_an_inverse(tmp_path):
    """A field that shifts everything by 5 mm: the grid points whose preimage lies off the field have no
    inverse (the iteration wanders there without converging) and are counted apart; every counted point
    converges."""
    from keyreg.formats import write_displacement_field

    shape, aff = (20, 22, 18), np.diag([2.0, 2.0, 2.0, 1.0])
    disp = np.zeros((*shape, 3), np.float32)
    disp[..., 0] = 5.0  # T(p) = p + 5 mm along x (RAS)
    path = write_displacement_field(tmp_path / "warp.nii.gz", disp, aff)
    res = invert_saved_transform(path, method="field", tolerance=1e-4)
    assert res.excluded > 0 and res.excluded_max_mm > 1.0
    assert res.residual_max_mm < 1e-3
    assert res.points + res.excluded == int(np.prod(shape))
