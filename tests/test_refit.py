"""Refit from keypoint files edited by hand: reading, matching rules, Slicer round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keyreg.errors import ConfigError, ImageIOError
from keyreg.formats import write_markups_json, write_points_csv
from keyreg.refit import match_keypoints, read_keypoint_file
from keyreg.transforms import fit_affine, fit_tps


def _points(n=12, seed=0):
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(-60, 60, (n, 3))
    moving = fixed @ np.array([[1.05, 0.1, 0], [-0.1, 0.98, 0.05], [0, -0.05, 1.02]]).T + [4.0, -2.0, 7.0]
    return fixed, moving + rng.normal(0, 0.5, (n, 3))


def test_markups_round_trip_edit_move_delete_and_refit(tmp_path):
    fixed, moving = _points()
    labels = [f"K-{i + 1}" for i in range(len(fixed))]
    write_markups_json(tmp_path / "f.mrk.json", fixed, labels=labels)
    write_markups_json(tmp_path / "m.mrk.json", moving, labels=labels)
    doc = json.loads((tmp_path / "m.mrk.json").read_text())
    # the file is a Slicer point list in LPS with the names as labels (../shared/FORMATS.md section 5)
    assert doc["@schema"].startswith("https://raw.githubusercontent.com/slicer/slicer/")
    mk = doc["markups"][0]
    assert mk["type"] == "Fiducial" and mk["coordinateSystem"] == "LPS" and mk["coordinateUnits"] == "mm"
    assert [cp["label"] for cp in mk["controlPoints"]] == labels
    assert np.allclose(mk["controlPoints"][0]["position"], moving[0] * [-1, -1, 1])
    assert all(cp["positionStatus"] == "defined" for cp in mk["controlPoints"])

    # as a person would in Slicer: move K-3 by +5 mm towards Right (LPS x decreases), delete K-7
    offset_ras = np.array([5.0, 0.0, -2.0])
    cps = mk["controlPoints"]
    cps[2]["position"] = (np.array(cps[2]["position"]) + offset_ras * [-1, -1, 1]).tolist()
    del cps[6]
    (tmp_path / "m.mrk.json").write_text(json.dumps(doc))

    m = match_keypoints(read_keypoint_file(tmp_path / "f.mrk.json"), read_keypoint_file(tmp_path / "m.mrk.json"))
    assert m.labels == [lab for lab in labels if lab != "K-7"]
    assert m.left_out == {"K-7": "not in the moving file"}
    edited = moving.copy()
    edited[2] += offset_ras
    keep = [i for i in range(len(fixed)) if i != 6]
    assert np.allclose(m.moving, edited[keep]) and np.allclose(m.fixed, fixed[keep])
    direct = fit_affine(torch.from_numpy(fixed[keep])[None], torch.from_numpy(edited[keep])[None])
    refit = fit_affine(torch.from_numpy(m.fixed)[None], torch.from_numpy(m.moving)[None])
    assert torch.allclose(direct, refit, atol=1e-9)
    tps_direct = fit_tps(torch.from_numpy(fixed[keep])[None], torch.from_numpy(edited[keep])[None], 0.0)
    tps_refit = fit_tps(torch.from_numpy(m.fixed)[None], torch.from_numpy(m.moving)[None], 0.0)
    q = torch.randn(1, 30, 3, dtype=torch.float64) * 40
    assert torch.allclose(tps_direct.map_points(q), tps_refit.map_points(q), atol=1e-9)


def test_slicer_states_unselected_excluded_locked_kept(tmp_path):
    fixed, moving = _points(8)
    write_markups_json(tmp_path / "f.mrk.json", fixed)
    write_markups_json(tmp_path / "m.mrk.json", moving)
    for name, idx, key in (("f.mrk.json", 1, "selected"), ("m.mrk.json", 4, "selected"), ("m.mrk.json", 5, "locked")):
        doc = json.loads((tmp_path / name).read_text())
        doc["markups"][0]["controlPoints"][idx][key] = key == "locked"
        (tmp_path / name).write_text(json.dumps(doc))
    m = match_keypoints(read_keypoint_file(tmp_path / "f.mrk.json"), read_keypoint_file(tmp_path / "m.mrk.json"))
    assert m.left_out == {"K-2": "unselected in the fixed file", "K-5": "unselected in the moving file"}
    assert "K-6" in m.labels and len(m.labels) == 6


def test_csv_and_markups_mix_by_index_labels_and_weights(tmp_path):
    fixed, moving = _points(6)
    w = np.arange(1.0, 7.0)
    write_points_csv(tmp_path / "f.csv", fixed, weights=w)      # labels K-1..K-6 = the index
    # a moving CSV without labels: rows are K-1..K-N by index; reorder nothing, drop the last row
    (tmp_path / "m.csv").write_text("x_ras,y_ras,z_ras\n" + "".join(f"{a},{b},{c}\n" for a, b, c in moving[:5]))
    m = match_keypoints(read_keypoint_file(tmp_path / "f.csv"), read_keypoint_file(tmp_path / "m.csv"))
    assert m.labels == ["K-1", "K-2", "K-3", "K-4", "K-5"] and np.allclose(m.weights, w[:5])
    assert m.left_out == {"K-6": "not in the moving file"}
    # named points are matched by name, whatever their order
    names = ["lh_hippo", "rh_hippo", "brainstem", "lh_caud", "rh_caud", "cc"]
    write_points_csv(tmp_path / "fn.csv", fixed, labels=names)
    write_markups_json(tmp_path / "mn.mrk.json", moving[::-1], labels=names[::-1])
    m = match_keypoints(read_keypoint_file(tmp_path / "fn.csv"), read_keypoint_file(tmp_path / "mn.mrk.json"))
    assert m.labels == names and np.allclose(m.moving, moving) and m.weights is None


def test_bad_keypoint_files(tmp_path):
    fixed, moving = _points(4)
    write_points_csv(tmp_path / "f.csv", fixed, labels=["a", "b", "c", "a"])
    with pytest.raises(ImageIOError, match="occurs twice"):
        read_keypoint_file(tmp_path / "f.csv")
    write_points_csv(tmp_path / "f.csv", fixed, labels=["a", "b", "c", "d"])
    write_points_csv(tmp_path / "m.csv", moving, labels=["w", "x", "y", "z"])
    with pytest.raises(ConfigError, match="no keypoint label is in both"):
        match_keypoints(read_keypoint_file(tmp_path / "f.csv"), read_keypoint_file(tmp_path / "m.csv"))
    (tmp_path / "k.txt").write_text("1 2 3\n")
    with pytest.raises(ImageIOError, match="unknown keypoint file type"):
        read_keypoint_file(tmp_path / "k.txt")
