"""``keyreg register`` end to end on tiny synthetic NIfTI files with a tiny random model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_image, grid_affine, rotation, save_nifti
from keyreg.cli import main
from keyreg.pairing import build_pairs


@pytest.fixture
def data(tmp_path):
    """Two directories of images (+ segmentations) with the same names, on different oblique grids."""
    root = tmp_path / "data"
    for sub in ("mov", "fix", "mov_seg", "fix_seg"):
        (root / sub).mkdir(parents=True)
    centres = [(-12.0, 5.0, 3.0), (10.0, -6.0, 8.0), (2.0, 12.0, -9.0), (-3.0, -10.0, -4.0)]
    for i, name in enumerate(["a.nii.gz", "b.nii.gz"]):
        for sub, shape, rot, spacing in (("fix", (28, 32, 24), rotation([1, 0, 0], 10 * i), (1.5, 1.2, 1.8)),
                                         ("mov", (30, 26, 28), rotation([0, 1, 1], 25), (1.4, 1.6, 1.3))):
            aff = grid_affine(spacing, rot, shape=shape)
            img = blob_image(shape, aff, centres, radius=6.0)
            seg = np.zeros(shape, dtype=np.int16)
            for lab, lev in zip((2, 41, 17, 53), np.linspace(0.3, 1.0, 4)):
                seg[np.abs(img - lev) < 1e-3] = lab
            save_nifti(root / sub / name, img + 0.01 * np.random.default_rng(i).random(shape).astype(np.float32), aff)
            save_nifti(root / f"{sub}_seg" / name, seg, aff)
    return root


def run(*args):
    return main(["register", *map(str, args)])


def test_single_pair_writes_everything(data, tiny_model_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix/a.nii.gz",
             "--moving_seg", data / "mov_seg/a.nii.gz", "--fixed_seg", data / "fix_seg/a.nii.gz",
             "--load_path", tiny_model_files, "--list_of_aligns", "rigid", "affine", "tps_0", "tps_10",
             "--list_of_metrics", "mse", "ncc", "harddice", "jdstd", "jdlessthan0",
             "--save_eval_to_disk", "--visualize", "--save_dir", out, "--device", "cpu")
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| align |" in stdout and "tps_10" in stdout
    pair = out / "pairs" / "a"
    for f in ("keypoints_fixed.csv", "keypoints_moving.csv", "keypoints_fixed.mrk.json"):
        assert (pair / f).is_file()
    for align in ("rigid", "affine"):
        for f in ("warped.nii.gz", "warped_seg.nii.gz", "transform_matrix.txt", "transform.tfm",
                  "transform_0GenericAffine.mat", "transform.lta", "keypoints_aligned.csv", "qc.png"):
            assert (pair / align / f).is_file(), f"{align}/{f}"
    for f in ("warp.nii.gz", "tps.json", "warped.nii.gz", "qc.png"):
        assert (pair / "tps_0" / f).is_file()
    warped = nib.load(pair / "affine" / "warped.nii.gz")
    fixed = nib.load(data / "fix/a.nii.gz")
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    seg = np.asarray(nib.load(pair / "tps_0" / "warped_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 2, 41, 17, 53}
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert [r["align"] for r in rows] == ["none", "rigid", "affine", "tps_0", "tps_10"]  # none: before registration
    # none: the moving segmentation on the fixed grid through the identity (world), resampled here by scipy
    from scipy.ndimage import affine_transform

    from keyreg.metrics import dice_per_label, mean_dice

    fix_seg, mov_seg = nib.load(data / "fix_seg/a.nii.gz"), nib.load(data / "mov_seg/a.nii.gz")
    vox = np.linalg.inv(mov_seg.affine) @ fix_seg.affine  # fixed voxel -> moving voxel
    before = affine_transform(np.asarray(mov_seg.dataobj), vox, output_shape=fix_seg.shape, order=0, cval=0)
    dice = mean_dice(dice_per_label(before, np.asarray(fix_seg.dataobj)))
    assert rows[0]["harddice"] == pytest.approx(dice, abs=1e-9)
    assert rows[0]["harddice"] != rows[2]["harddice"] and rows[0]["mse"] > 0
    assert "jdstd" not in rows[0] and "jdlessthan0" not in rows[0]  # no transform before registration
    assert all(0 <= r["harddice"] <= 1 for r in rows)
    assert "harddice_per_label" in rows[0]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("pair,moving,fixed,align")
    assert next(r for r in rows if r["align"] == "rigid")["jdstd"] == pytest.approx(0.0, abs=1e-9)
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"


def test_directories_all_pairs_and_a_bad_file(data, tiny_model_files, tmp_path, capsys):
    (data / "mov" / "c.nii.gz").write_bytes(b"corrupt")
    (data / "fix" / "bad.nii.gz").write_bytes(b"corrupt")  # every pair with a corrupt file fails, the rest go on
    out = tmp_path / "out"
    rc = run("--moving", data / "mov", "--fixed", data / "fix", "--all_pairs", "--load_path", tiny_model_files,
             "--list_of_aligns", "affine", "--save_dir", out)
    err = capsys.readouterr().err
    assert rc == 1
    assert "pair(s) failed" in err and "bad.nii.gz" in err
    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows["results"]) == 4  # a,b x a,b (no segmentations: no none row)
    assert len(rows["failures"]) == 5  # a->bad, b->bad, c->a, c->b, c->bad


def test_directory_pairing_by_name(data):
    (data / "mov" / "only_moving.nii.gz").write_bytes(b"x")
    pairs, warnings = build_pairs(data / "mov", data / "fix", data / "mov_seg", data / "fix_seg")
    assert [p.name for p in pairs] == ["a", "b"]
    assert pairs[0].fixed_seg == data / "fix_seg" / "a.nii.gz"
    assert any("only_moving" in w for w in warnings)


@pytest.mark.parametrize("args,match", [
    (["--list_of_aligns", "similarity"], "unknown align 'similarity'"),
    (["--list_of_metrics", "dice"], "unknown metric"),
    (["--num_keypoints", "99"], "not the requested 99"),
    (["--backbone", "conv"], "not the requested conv"),
])
def test_bad_options_give_one_line(data, tiny_model_files, tmp_path, capsys, args, match):
    rc = run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix/a.nii.gz", "--load_path", tiny_model_files,
             "--save_dir", tmp_path / "o", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("keyreg register: error:")
    assert __import__("re").search(match, err[0])
    assert not (tmp_path / "o").exists()


def test_file_with_directory_is_an_error(data, tiny_model_files, capsys):
    rc = run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix", "--load_path", tiny_model_files)
    assert rc == 2
    assert "is a file but --fixed is a dir" in capsys.readouterr().err


def test_missing_input_and_seg_grid_mismatch(data, tiny_model_files, tmp_path, capsys):
    rc = run("--moving", data / "mov/zzz.nii.gz", "--fixed", data / "fix/a.nii.gz", "--load_path", tiny_model_files)
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix/a.nii.gz",
             "--moving_seg", data / "fix_seg/a.nii.gz", "--fixed_seg", data / "fix_seg/a.nii.gz",
             "--load_path", tiny_model_files, "--save_dir", tmp_path / "o")
    assert rc == 2 and "does not match its image grid" in capsys.readouterr().err


def test_models_command_lists_or_describes(tiny_model_files, capsys):
    assert main(["models", str(tiny_model_files)]) == 0
    out = capsys.readouterr().out
    assert "truncatedunet K=12" in out and "ras, 24x24x24 at 8x8x8 mm" in out


def test_unique_names_one_rule_for_every_workflow():
    from keyreg.pairing import unique_names

    assert unique_names(["a", "b"]) == ["a", "b"]
    # the first keeps its name; no new name takes one that another input already has
    assert unique_names(["a", "a", "a_2", "b", "a"]) == ["a", "a_3", "a_2", "b", "a_4"]
    names = unique_names(["x"] * 5 + ["x_3"])
    assert len(set(names)) == 6 and names[0] == "x" and names[-1] == "x_3"


def test_cli_turns_off_numpy_hugepage_advice_unless_the_user_chose(monkeypatch):
    """The CLI stops numpy's huge-page advice (slow first touches on the reference VM), except when
    NUMPY_MADVISE_HUGEPAGE says what the user wants."""
    import numpy as np

    from keyreg.cli import no_hugepage_advice

    setter = (getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage
    before = setter(True)
    try:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        no_hugepage_advice()
        assert setter(True) is True  # the user's choice is kept
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
        no_hugepage_advice()
        assert setter(True) is False
    finally:
        setter(before)
    code = ("import os, sys; os.environ.pop('NUMPY_MADVISE_HUGEPAGE', None); from keyreg.cli import no_hugepage_advice; "
            "no_hugepage_advice(); import numpy as np; print('numpy' in sys.modules, "
            "(getattr(np, '_core', None) or np.core).multiarray._set_madvise_hugepage(True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]  # numpy imported afterwards starts without the advice


def test_console_entry_exits_with_mains_status(tmp_path):
    """``python -m keyreg.cli`` (the console entry) ends with main's status and its whole output,
    also when it skips the interpreter's teardown."""
    ok = subprocess.run([sys.executable, "-m", "keyreg.cli", "models"], capture_output=True, text=True)
    assert ok.returncode == 0 and "keyreg-anatomy" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "keyreg.cli", "register", "--moving", str(tmp_path / "no.nii.gz"),
                          "--fixed", str(tmp_path / "no.nii.gz"), "--save_dir", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_refit_with_segmentations_writes_registers_none_row(data, tiny_model_files, tmp_path):
    """An unedited refit from register's keypoint files reproduces its rows, the none row included."""
    segs = ("--moving_seg", data / "mov_seg/a.nii.gz", "--fixed_seg", data / "fix_seg/a.nii.gz")
    out, ref = tmp_path / "out", tmp_path / "refit"
    assert run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix/a.nii.gz", *segs, "--load_path",
               tiny_model_files, "--list_of_aligns", "affine", "--list_of_metrics", "mse", "harddice",
               "--save_eval_to_disk", "--save_dir", out, "--device", "cpu") == 0
    pair = out / "pairs" / "a"
    assert main(["refit", "--moving", str(data / "mov/a.nii.gz"), "--fixed", str(data / "fix/a.nii.gz"),
                 *map(str, segs), "--fixed_keypoints", str(pair / "keypoints_fixed.csv"),
                 "--moving_keypoints", str(pair / "keypoints_moving.csv"), "--list_of_aligns", "affine",
                 "--list_of_metrics", "mse", "harddice", "--save_dir", str(ref), "--device", "cpu"]) == 0
    reg_rows = json.loads((out / "metrics.json").read_text())["results"]
    refit_rows = json.loads((ref / "metrics.json").read_text())["results"]
    assert [r["align"] for r in refit_rows] == [r["align"] for r in reg_rows] == ["none", "affine"]
    for a, b in zip(reg_rows, refit_rows, strict=True):
        assert b["harddice"] == pytest.approx(a["harddice"], abs=1e-9) and b["mse"] == pytest.approx(a["mse"], rel=1e-6)


@pytest.mark.parametrize("suffix, weighting", [(".csv", []), (".mrk.json", []),
                                               (".csv", ["--weighted_kp_align", "power"])])
def test_refit_leaves_out_what_register_left_out(data, tiny_model_files, tmp_path, suffix, weighting):
    """Points register left out of its fits (--exclude_keypoints, or a model's fit_exclude) are written
    unselected, so an unedited refit fits the same points: the same rigid and affine matrices."""
    out, ref = tmp_path / "out", tmp_path / "refit"
    assert run("--moving", data / "mov/a.nii.gz", "--fixed", data / "fix/a.nii.gz", "--load_path", tiny_model_files,
               "--list_of_aligns", "rigid", "affine", "--exclude_keypoints", "K-1", "K-1[0-2]", *weighting,
               "--save_eval_to_disk", "--save_dir", out, "--device", "cpu") == 0
    pair = out / "pairs" / "a"
    used = np.loadtxt(pair / "affine" / "keypoint_residuals.csv", delimiter=",", skiprows=1, usecols=-1)
    assert used.sum() == 8  # 12 keypoints, 4 left out
    assert main(["refit", "--moving", str(data / "mov/a.nii.gz"), "--fixed", str(data / "fix/a.nii.gz"),
                 "--fixed_keypoints", str(pair / f"keypoints_fixed{suffix}"),
                 "--moving_keypoints", str(pair / f"keypoints_moving{suffix}"), "--list_of_aligns", "rigid", "affine",
                 "--no_images", "--save_dir", str(ref), "--device", "cpu"]) == 0
    refit = json.loads((ref / "pairs" / "a" / "refit.json").read_text())
    assert sorted(refit["left_out"]) == ["K-1", "K-10", "K-11", "K-12"] and len(refit["used"]) == 8
    for align in ("rigid", "affine"):
        a = np.loadtxt(pair / align / "transform_matrix.txt")
        b = np.loadtxt(ref / "pairs" / "a" / align / "transform_matrix.txt")
        np.testing.assert_allclose(b, a, atol=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["register", "--field_stride", "abc"], r"^keyreg register: error: argument --field_stride: invalid int value: 'abc'"),
    (["register", "--fixed", "f.nii.gz"], r"^keyreg register: error: the following arguments are required: --moving"),
    (["register", "--moving", "m", "--fixed", "f", "--bogus", "1"], r"^keyreg register: error: unrecognized arguments: --bogus 1"),
    (["apply", "x.nii.gz"], r"^keyreg apply: error: the following arguments are required"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "usage:" not in err, err
    assert re.search(message, lines[0]) and lines[0].endswith("--help)"), lines[0]
