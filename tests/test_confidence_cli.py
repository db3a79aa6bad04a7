"""Confidence, residual files, --robust and report.html from ``keyreg register``; ``keyreg refit`` round trip."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import blob_image, grid_affine, rotation, save_nifti
from keyreg.cli import main
from keyreg.formats import read_matrix_txt
from keyreg.refit import read_keypoint_file
from keyreg.transforms import fit_affine, fit_tps


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for sub in ("mov", "fix"):
        (root / sub).mkdir(parents=True)
    centres = [(-12.0, 5.0, 3.0), (10.0, -6.0, 8.0), (2.0, 12.0, -9.0), (-3.0, -10.0, -4.0)]
    for i, name in enumerate(["a.nii.gz", "b.nii.gz"]):
        for sub, shape, rot in (("fix", (28, 32, 24), rotation([1, 0, 0], 10 * i)),
                                ("mov", (30, 26, 28), rotation([0, 1, 1], 25))):
            aff = grid_affine((1.5, 1.3, 1.6), rot, shape=shape)
            save_nifti(root / sub / name, blob_image(shape, aff, centres, radius=6.0), aff)
    return root


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_register_batch_writes_confidence_residuals_and_report(data, tiny_model_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--load_path",
               str(tiny_model_files), "--list_of_aligns", "affine", "tps_0", "--save_eval_to_disk", "--visualize",
               "--save_dir", str(out), "--device", "cpu"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "flagged check" in stdout and "report:" in stdout
    rows = _csv(out / "metrics.csv")
    assert len(rows) == 4  # 2 pairs x (affine, tps_0); no segmentations, so no none row
    for r in rows:
        assert 0.0 <= float(r["confidence"]) <= 1.0 and r["flag"] in ("check", "ok")
        assert float(r["median_loo_mm"]) >= 0 and 0 <= float(r["inlier_fraction"]) <= 1
        # every flagged pair says why, beside its name in metrics.csv and in the summary line
        assert (r["flag_reason"] != "") == (r["flag"] == "check")
        if r["flag"] == "check":
            assert r["flag_reason"].startswith("confidence ") and f"{r['pair']} (confidence " in stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert {"confidence", "flag", "median_loo_mm"} <= set(doc["results"][0])
    pair = out / "pairs" / "a"
    res = _csv(pair / "affine" / "keypoint_residuals.csv")
    assert len(res) == 12 and res[0]["label"] == "K-1"
    assert all(float(r["loo_mm"]) >= float(r["residual_mm"]) - 1e-9 for r in res)
    tps = _csv(pair / "tps_0" / "keypoint_residuals.csv")
    assert max(float(r["residual_mm"]) for r in tps) < 1e-3  # tps_0 interpolates ...
    assert min(float(r["loo_mm"]) for r in tps) > 0        # ... but its LOO errors are not 0
    assert (pair / "residuals.png").is_file() and (pair / "thumbnail.png").is_file()
    page = (out / "report.html").read_text()
    assert page.count('<tr class="pair ') == 2 and "pairs/a/residuals.png" in page
    assert "pairs/b/tps_0/qc.png" in page and "data:image/png;base64," in page


def test_robust_option_is_recorded_and_fits(data, tiny_model_files, tmp_path):
    out = tmp_path / "rob"
    rc = main(["register", "--moving", str(data / "mov/a.nii.gz"), "--fixed", str(data / "fix/a.nii.gz"),
               "--load_path", str(tiny_model_files), "--list_of_aligns", "affine", "--robust", "--skip_existing",
               "--save_eval_to_disk", "--save_dir", str(out), "--device", "cpu"])
    assert rc == 0
    done = json.loads((out / "pairs" / "a" / "done.json").read_text())
    assert done["config"]["options"]["robust"] is True if "options" in done["config"] else "robust" in json.dumps(done)
    res = _csv(out / "pairs" / "a" / "affine" / "keypoint_residuals.csv")
    used = [r["used"] == "1" for r in res]
    assert sum(used) >= 6  # the robust fit keeps at least half


def test_refit_round_trip_from_edited_slicer_files(data, tiny_model_files, tmp_path, capsys):
    out = tmp_path / "reg"
    assert main(["register", "--moving", str(data / "mov/a.nii.gz"), "--fixed", str(data / "fix/a.nii.gz"),
                 "--load_path", str(tiny_model_files), "--list_of_aligns", "affine", "tps_0", "--weighted_kp_align",
                 "none", "--save_eval_to_disk", "--save_dir", str(out), "--device", "cpu"]) == 0
    pair = out / "pairs" / "a"
    fixed = read_keypoint_file(pair / "keypoints_fixed.mrk.json")
    moving_file = pair / "keypoints_moving.mrk.json"
    moving = read_keypoint_file(moving_file)

    # unedited: the refit reproduces register's affine exactly
    ref = tmp_path / "refit0"
    assert main(["refit", "--fixed", str(data / "fix/a.nii.gz"), "--moving", str(data / "mov/a.nii.gz"),
                 "--fixed_keypoints", str(pair / "keypoints_fixed.mrk.json"), "--moving_keypoints", str(moving_file),
                 "--list_of_aligns", "affine", "--save_dir", str(ref), "--device", "cpu"]) == 0
    np.testing.assert_allclose(read_matrix_txt(ref / "pairs" / "a" / "affine" / "transform_matrix.txt"),
                               read_matrix_txt(pair / "affine" / "transform_matrix.txt"), atol=1e-9)

    # edit in "Slicer": move K-3 by a known offset (LPS in the file), delete K-5
    doc = json.loads(moving_file.read_text())
    cps = doc["markups"][0]["controlPoints"]
    offset_ras = np.array([4.0, -3.0, 2.0])
    cps[2]["position"] = (np.array(cps[2]["position"]) + offset_ras * [-1, -1, 1]).tolist()
    cps[:] = [cp for cp in cps if cp["label"] != "K-5"]
    edited = tmp_path / "edited.mrk.json"
    edited.write_text(json.dumps(doc))
    ref = tmp_path / "refit1"
    assert main(["refit", "--fixed", str(data / "fix/a.nii.gz"), "--moving", str(data / "mov/a.nii.gz"),
                 "--fixed_keypoints", str(pair / "keypoints_fixed.mrk.json"), "--moving_keypoints", str(edited),
                 "--list_of_aligns", "affine", "tps_0", "--save_dir", str(ref), "--device", "cpu"]) == 0
    assert "K-5 (not in the moving file)" in capsys.readouterr().out
    keep = [i for i, lab in enumerate(fixed.labels) if lab != "K-5"]
    pm = moving.points.copy()
    pm[2] += offset_ras
    direct = fit_affine(torch.from_numpy(fixed.points[keep])[None], torch.from_numpy(pm[keep])[None])[0].numpy()
    got = read_matrix_txt(ref / "pairs" / "a" / "affine" / "transform_matrix.txt")
    np.testing.assert_allclose(got, direct, atol=1e-9)
    # the TPS: refit from the written tps.json equals a direct fit of the edited points
    tj = json.loads((ref / "pairs" / "a" / "tps_0" / "tps.json").read_text())
    assert len(tj["fixed_keypoints_ras"]) == len(keep)
    t_direct = fit_tps(torch.from_numpy(fixed.points[keep])[None], torch.from_numpy(pm[keep])[None], 0.0,
                       center=torch.tensor(tj["center_ras"], dtype=torch.float64), scale=tj["scale_mm"])
    t_saved = fit_tps(torch.tensor(tj["fixed_keypoints_ras"])[None], torch.tensor(tj["moving_keypoints_ras"])[None],
                      0.0, center=torch.tensor(tj["center_ras"], dtype=torch.float64), scale=tj["scale_mm"])
    q = torch.from_numpy(fixed.points)[None] + 1.5
    torch.testing.assert_close(t_saved.map_points(q), t_direct.map_points(q), atol=1e-5, rtol=0)  # tps.json precision
    meta = json.loads((ref / "pairs" / "a" / "refit.json").read_text())
    assert meta["left_out"] == {"K-5": "not in the moving file"}
    assert (ref / "report.html").is_file() and (ref / "metrics.csv").is_file()
