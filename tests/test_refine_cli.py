"""Dense refinement through ``keyreg register --refine``, the Python API, ``keyreg invert`` and
``keyreg apply``: tiny synthetic volumes, a tiny random model, a few iterations (CPU, quick)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_image, grid_affine, rotation, save_nifti, tiny_model
from keyreg.cli import main

SHAPE = (22, 24, 20)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: deterministic, and fair on a shared CPU


@pytest.fixture
def pair(tmp_path):
    """Moving and fixed images (+ segmentations) on different oblique 2-2.5 mm grids, a fixed mask,
    and a tiny model file."""
    from keyreg.models import save_model

    d = tmp_path / "in"
    d.mkdir()
    centres = [(-12.0, 5.0, 3.0), (10.0, -6.0, 8.0), (2.0, 12.0, -9.0), (-3.0, -10.0, -4.0)]
    for name, spacing, rot, shift in (("fixed", (2.0, 2.2, 2.5), rotation([1, 0, 0], 8), (0.0, 0.0, 0.0)),
                                      ("moving", (2.3, 2.0, 2.1), rotation([0, 1, 1], -12), (2.0, -1.0, 1.0))):
        aff = grid_affine(spacing, rot, shape=SHAPE)
        img = blob_image(SHAPE, aff, [np.add(c, shift) for c in centres], radius=7.0)
        seg = np.zeros(SHAPE, np.int16)
        for lab, lev in zip((2, 41, 17, 53), np.linspace(0.3, 1.0, 4)):
            seg[np.abs(img - lev) < 1e-3] = lab
        save_nifti(d / f"{name}.nii.gz", img + 0.02, aff)
        save_nifti(d / f"{name}_seg.nii.gz", seg, aff)
        if name == "fixed":
            mask = np.zeros(SHAPE, np.uint8)
            mask[2:-2, 2:-2, 2:-2] = 1
            save_nifti(d / "mask.nii.gz", mask, aff)
    model, _ = save_model(tiny_model(), d / "tiny")
    return d, model


def _register(d, model, out, *extra):
    return main(["register", "--moving", str(d / "moving.nii.gz"), "--fixed", str(d / "fixed.nii.gz"),
                 "--moving_seg", str(d / "moving_seg.nii.gz"), "--fixed_seg", str(d / "fixed_seg.nii.gz"),
                 "--load_path", str(model), "--device", "cpu", "--save_dir", str(out), "--no_progress",
                 *map(str, extra)])


def test_register_refine_rows_files_resume_invert_apply(pair, tmp_path, capsys):
    d, model = pair
    out = tmp_path / "out"
    args = ("--list_of_aligns", "affine", "--refine", "affine", "deformable", "--refine_iterations", 3, 2,
            "--fixed_mask", d / "mask.nii.gz", "--refine_similarity", "lncc", "--save_eval_to_disk",
            "--skip_existing")
    assert _register(d, model, out, *args) == 0
    stdout = capsys.readouterr().out
    names = ["affine", "affine+affine", "affine+deformable"]
    for n in names:
        assert f"| {n} |" in stdout
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["align"] for r in rows] == ["none", *names]
    by = {r["align"]: r for r in rows}
    for n in names:  # the same measure stage for every row: Dice, Jacobian statistics
        assert 0 <= by[n]["harddice"] <= 1 and "jdlessthan0" in by[n] and "jdstd" in by[n]
    for n in names[1:]:
        assert by[n]["refine_kept_start"] in (0, 1) and by[n]["refine_seconds"] > 0
        # the safeguard decides from the images; a kept start equals its start
        if by[n]["refine_kept_start"]:
            assert by[n]["harddice"] == pytest.approx(by[n.split("+")[0]]["harddice"])
    assert "refine_kept_start" not in by["affine"]
    assert by["affine+deformable"]["jdlessthan0"] == 0.0
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "refine_kept_start" in header
    p = out / "pairs" / "moving_to_fixed"
    for n in names[1:]:
        for f in ("warp.nii.gz", "inverse_warp.nii.gz", "refine.json", "warped.nii.gz", "warped_seg.nii.gz",
                  "keypoints_aligned.csv"):
            assert (p / n / f).is_file(), f"{n}/{f}"
    assert (p / "affine+affine" / "transform_matrix.txt").is_file()  # affine start + affine refinement: linear
    doc = json.loads((p / "affine+deformable" / "refine.json").read_text())
    assert doc["start"] == "affine" and doc["report"]["similarity"] == "lncc"
    assert doc["report"]["deformable"]["iterations"] <= 5 and "jdlessthan0" in doc["jacobian"]
    assert "affine+deformable" in (out / "report.html").read_text()
    fixed, moving = nib.load(d / "fixed.nii.gz"), nib.load(d / "moving.nii.gz")
    w = nib.load(p / "affine+deformable" / "warped_seg.nii.gz")
    assert w.shape == fixed.shape and np.allclose(w.affine, fixed.affine, atol=1e-5)
    inv = nib.load(p / "affine+deformable" / "inverse_warp.nii.gz")
    assert inv.shape[:3] == moving.shape and np.allclose(inv.affine, moving.affine, atol=1e-5)

    # resume: same options -> skipped; other refinement options or another mask -> redone
    capsys.readouterr()
    assert _register(d, model, out, *args) == 0
    assert "1 pair(s) were already complete" in capsys.readouterr().err
    from keyreg.batch import _completed, _pair_config, model_fingerprint
    from keyreg.models import load_model
    from keyreg.pairing import build_pairs
    from keyreg.pipeline import Registrar

    fp = model_fingerprint(load_model(model))
    pairs, _ = build_pairs(d / "moving.nii.gz", d / "fixed.nii.gz", d / "moving_seg.nii.gz", d / "fixed_seg.nii.gz",
                           fixed_mask=d / "mask.nii.gz")
    metrics = ["mse", "harddice", "jdstd", "jdlessthan0"]
    same = dict(aligns=("affine",), refine=("affine", "deformable"), refine_iterations=(3, 2), refine_similarity="lncc")
    cfg = _pair_config(pairs[0], Registrar(None, **same), metrics, fp, True, False)
    assert _completed(p, cfg) is not None
    for change in (dict(refine_reg_weight=2.0), dict(refine_seconds=30.0), dict(refine=("affine",)),
                   dict(refine_similarity="mind"), dict(refine_iterations=(3, 3))):
        assert _completed(p, _pair_config(pairs[0], Registrar(None, **(same | change)), metrics, fp, True, False)) is None
    (d / "mask.nii.gz").touch()
    assert _completed(p, _pair_config(pairs[0], Registrar(None, **same), metrics, fp, True, False)) is None

    # keyreg invert on the refined directory uses its stored inverse
    target = tmp_path / "inv.nii.gz"
    assert main(["invert", str(p / "affine+deformable"), "-o", str(target)]) == 0
    said = capsys.readouterr().out
    assert "stored inverse" in said and "residual" in said
    np.testing.assert_allclose(np.asarray(nib.load(target).dataobj), np.asarray(inv.dataobj), atol=1e-5)

    # keyreg apply, forward: the align directory reproduces the warped segmentation
    fwd = tmp_path / "fwd_seg.nii.gz"
    assert main(["apply", str(d / "moving_seg.nii.gz"), "-t", str(p / "affine+deformable"), "-o", str(fwd),
                 "--labels"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(fwd).dataobj), np.asarray(w.dataobj))
    # backward: the inverse field pulls the warped segmentation back onto the moving grid, close to the original
    back = tmp_path / "back_seg.nii.gz"
    assert main(["apply", str(fwd), "-t", str(p / "affine+deformable" / "inverse_warp.nii.gz"), "-o", str(back),
                 "--labels"]) == 0
    b, m = np.asarray(nib.load(back).dataobj), np.asarray(nib.load(d / "moving_seg.nii.gz").dataobj)
    assert nib.load(back).shape == moving.shape
    fg = (m > 0) & (b > 0)
    assert fg.sum() > 0.5 * (m > 0).sum() and (b[fg] == m[fg]).mean() > 0.95
    # points both ways: fixed -> moving with the transform, back with its inverse
    pts = tmp_path / "pts.csv"
    np.savetxt(pts, np.array([[-12.0, 5.0, 3.0], [10.0, -6.0, 8.0]]), delimiter=",", header="x,y,z", comments="")
    assert main(["apply", str(pts), "-t", str(p / "affine+deformable"), "-o", str(tmp_path / "m.csv"),
                 "--points_direction", "fixed_to_moving"]) == 0
    assert main(["apply", str(tmp_path / "m.csv"), "-t", str(p / "affine+deformable"), "-o", str(tmp_path / "f.csv"),
                 "--points_direction", "moving_to_fixed"]) == 0
    from keyreg.formats import read_point_set

    a, c = read_point_set(pts, "RAS").points, read_point_set(tmp_path / "f.csv", "RAS").points
    assert np.abs(a - c).max() < 0.05


def test_a_failed_refinement_keeps_its_start_on_the_console_and_in_refine_json(pair, tmp_path, capsys, monkeypatch):
    """A refinement made to fail (a wrong affine correction) keeps its start: the console says so,
    with the reason; metrics.json and refine.json too."""
    import keyreg.refine.run as run_module
    from keyreg.refine.optimize import AffineOutcome

    def broken(*args, **kwargs):
        m = np.eye(4)
        m[:3, 3] = (7.0, -6.0, 5.0)
        return AffineOutcome(m, 0.10, 0.12, 1, False)  # and says its loss rose

    monkeypatch.setattr(run_module, "optimize_affine", broken)
    d, model = pair
    out = tmp_path / "out"
    assert _register(d, model, out, "--list_of_aligns", "affine", "--refine", "affine", "--save_eval_to_disk") == 0
    err = capsys.readouterr().err
    assert "refinement safeguard: 1 note(s)" in err
    assert "moving_to_fixed affine+affine: start kept: " in err and "NMI" in err
    rows = {r["align"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert rows["affine+affine"]["refine_kept_start"] == 1
    assert rows["affine+affine"]["refine_safeguard"].startswith("start kept: ")
    assert rows["affine+affine"]["harddice"] == pytest.approx(rows["affine"]["harddice"])
    doc = json.loads((out / "pairs" / "moving_to_fixed" / "affine+affine" / "refine.json").read_text())
    assert doc["kept_start"] is True and doc["report"]["reason"] and "dice_change" in doc["report"]
    # the written transform is the start's
    start = np.loadtxt(out / "pairs" / "moving_to_fixed" / "affine" / "transform_matrix.txt")
    kept = np.loadtxt(out / "pairs" / "moving_to_fixed" / "affine+affine" / "transform_matrix.txt")
    np.testing.assert_allclose(kept, start, atol=1e-6)


def test_api_register_with_refinement(pair, tmp_path):
    import keyreg

    d, model = pair
    reg = keyreg.register(d / "moving.nii.gz", d / "fixed.nii.gz", model=tiny_model(), aligns=["affine"],
                          moving_seg=d / "moving_seg.nii.gz", fixed_seg=d / "fixed_seg.nii.gz", device="cpu",
                          refine="deformable", refine_iterations=[2, 2], refine_reg_weight=0.5, refine_seconds=60,
                          fixed_mask=d / "mask.nii.gz")
    assert list(reg.results) == ["affine", "affine+deformable"]
    r = reg["affine+deformable"]
    assert r.warped is not None and r.warped.shape == SHAPE and r.result.report["deformable"]["reg_weight"] == 0.5
    m = reg.evaluate(["harddice", "jdlessthan0"])
    assert m["affine+deformable"]["jdlessthan0"] == 0.0
    files = reg.save(tmp_path / "o", visualize=True)
    assert {"affine+deformable/warp", "affine+deformable/inverse_warp", "affine+deformable/report",
            "affine+deformable/qc", "affine+deformable/keypoints_aligned_csv"} <= set(files)


@pytest.mark.parametrize("kw,match", [
    (dict(refine="bspline"), "unknown refinement 'bspline'"),
    (dict(refine="affine", refine_seconds=-1), "time budget must be > 0"),
    (dict(refine="affine", refine_similarity="mi"), "unknown refinement similarity 'mi'"),
    (dict(refine="affine", refine_iterations=[3, -1]), "non-negative"),
    (dict(fixed_mask="mask.nii.gz"), "needs a refinement stage"),
])
def test_api_bad_refinement_options(pair, kw, match):
    import keyreg
    from keyreg.errors import KeyregError

    d, model = pair
    kw = {k: (d / v if k == "fixed_mask" else v) for k, v in kw.items()}
    with pytest.raises(KeyregError, match=match):
        keyreg.register(d / "moving.nii.gz", d / "fixed.nii.gz", model=model, aligns=["affine"], device="cpu", **kw)


def test_fixed_mask_directory_is_paired_by_the_fixed_images_names(tmp_path):
    from keyreg.errors import ConfigError
    from keyreg.pairing import build_pairs

    for sub in ("mov", "fix", "mask"):
        (tmp_path / sub).mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / "mov" / name).write_bytes(b"x")
        (tmp_path / "fix" / name).write_bytes(b"x")
    (tmp_path / "mask" / "a.nii.gz").write_bytes(b"x")
    pairs, warnings = build_pairs(tmp_path / "mov", tmp_path / "fix", fixed_mask=tmp_path / "mask")
    assert [p.fixed_mask for p in pairs] == [tmp_path / "mask" / "a.nii.gz", None]
    assert any("no fixed mask" in w and "b.nii.gz" in w for w in warnings)
    with pytest.raises(ConfigError, match="--fixed_mask must be a dir"):
        build_pairs(tmp_path / "mov", tmp_path / "fix", fixed_mask=tmp_path / "mask" / "a.nii.gz")
