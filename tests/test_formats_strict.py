"""Strict file readers: malformed keypoint CSVs, Slicer markups, LTAs and ANTs .mat files give one
keyreg error line naming the file and the problem, never a raw numpy/Python message or silent garbage."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.io

from keyreg.errors import ImageIOError
from keyreg.formats import read_ants_mat, read_lta, read_markups, read_point_set, write_ants_mat, write_lta

LIA = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])


def _raises(reader, path, pattern: str, *args) -> str:
    """Call ``reader``; it must raise a one-line ImageIOError that starts with the path and matches."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's ComplexWarning must not be the only sign
        with pytest.raises(ImageIOError, match=pattern) as e:
            reader(path, *args)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    assert e.value.__context__ is None or e.value.__suppress_context__  # no chained low-level traceback
    return msg


def _csv(tmp_path, text: str, name: str = "k.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ CSV

@pytest.mark.parametrize("weight, pattern", [
    ("-1", r"data row 2: weight -1 is negative"),
    ("nan", r"data row 2: weight 'nan' is not a finite number"),
    ("inf", r"data row 2: weight 'inf' is not a finite number"),
    ("-inf", r"data row 2: weight '-inf' is not a finite number"),
])
def test_csv_bad_weight_names_row(tmp_path, weight, pattern):
    path = _csv(tmp_path, f"label,x_ras,y_ras,z_ras,weight\nA,1,2,3,1\nB,4,5,6,{weight}\nC,7,8,9,0.5\n")
    _raises(read_point_set, path, pattern)


def test_csv_zero_weight_still_allowed(tmp_path):
    path = _csv(tmp_path, "label,x_ras,y_ras,z_ras,weight\nA,1,2,3,0\nB,4,5,6,2.5\n")
    np.testing.assert_array_equal(read_point_set(path).weights, [0.0, 2.5])


@pytest.mark.parametrize("header", ["label,x_ras,y_ras,z_ras,x_ras", "label,x,y,z,weight,weight",
                                    "label,x_lps,y_lps,z_lps,label"])
def test_csv_duplicate_column(tmp_path, header):
    n = len(header.split(","))
    path = _csv(tmp_path, header + "\n" + ",".join(["A"] + ["1"] * (n - 1)) + "\n")
    dup = next(c for c in header.split(",") if header.split(",").count(c) > 1)
    _raises(read_point_set, path, rf"column '{dup}' occurs 2 times in the header")


def test_csv_row_longer_than_header(tmp_path):
    # an unquoted comma in a label shifts the row: it must not be read as other columns
    path = _csv(tmp_path, "label,x_ras,y_ras,z_ras\nA,1,2,3\nB,4,5,6,7\n")
    _raises(read_point_set, path, r"data row 2 has 5 values but the header has 4 columns")
    ok = _csv(tmp_path, "label,x_ras,y_ras,z_ras\nA,1,2,3,\n", "trailing.csv")  # empty extra cells are harmless
    np.testing.assert_array_equal(read_point_set(ok).points, [[1.0, 2.0, 3.0]])


# --------------------------------------------------------------------------------- Slicer .mrk.json

def _mrk(tmp_path, *control_points) -> object:
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"label": "A", "position": [1.0, 2.0, 3.0]}, *control_points]}]}
    path = tmp_path / "k.mrk.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("key, value", [("selected", "false"), ("selected", 0), ("locked", "true"),
                                        ("selected", None)])
def test_markups_flags_must_be_booleans(tmp_path, key, value):
    path = _mrk(tmp_path, {"label": "B", "position": [4, 5, 6], key: value})
    _raises(read_markups, path, rf"control point 2: '{key}' must be true or false \(a JSON boolean\)")


def test_markups_boolean_flags_read(tmp_path):
    path = _mrk(tmp_path, {"label": "B", "position": [4, 5, 6], "selected": False, "locked": True})
    _, labels, states = read_markups(path, with_states=True)
    assert labels == ["A", "B"]
    assert states == [{"selected": True, "locked": False}, {"selected": False, "locked": True}]


@pytest.mark.parametrize("status", ["missing", "undefined"])
def test_markups_placeholder_without_position_skipped(tmp_path, status):
    path = _mrk(tmp_path, {"label": "B", "positionStatus": status}, {"label": "C", "position": [4, 5, 6]})
    pts, labels = read_markups(path)
    assert labels == ["A", "C"]
    np.testing.assert_array_equal(pts, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


@pytest.mark.parametrize("cp, pattern", [
    ({"label": "B", "positionStatus": "defined"}, r"control point 2 has no valid 3-number position"),
    ({"label": "B", "position": [[1, 2], [3]]}, r"control point 2 has no valid 3-number position"),
    ({"label": "B", "position": [1, 2, 3], "positionStatus": "bogus"}, r"control point 2 has unknown positionStatus"),
    ("not an object", r"control point 2 is not a JSON object"),
])
def test_markups_bad_control_point(tmp_path, cp, pattern):
    _raises(read_markups, _mrk(tmp_path, cp), pattern)


# -------------------------------------------------------------------------------------------- LTA

@pytest.fixture
def lta_text(tmp_path):
    return write_lta(tmp_path / "good.lta", np.eye(4), (256,) * 3, LIA, (256,) * 3, LIA).read_text()


def test_lta_more_than_one_transform(tmp_path, lta_text):
    path = tmp_path / "two.lta"
    path.write_text(lta_text.replace("nxforms   = 1", "nxforms   = 2"))
    _raises(read_lta, path, r"nxforms = 2; keyreg reads exactly one transform")
    matrix = "1 4 4\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"
    path.write_text(lta_text.replace("nxforms   = 1", "nxforms   = 2").replace(matrix, matrix * 2))
    _raises(read_lta, path, r"more than one matrix; keyreg reads exactly one transform")


@pytest.mark.parametrize("row, pattern", [("0 1 0", r"LTA matrix row 2 is not 4 numbers: '0 1 0'"),
                                          ("0 1 0 0 5", r"LTA matrix row 2 is not 4 numbers"),
                                          ("0 one 0 0", r"LTA matrix row 2 is not 4 numbers: '0 one 0 0'")])
def test_lta_bad_matrix_row(tmp_path, lta_text, row, pattern):
    assert "1 4 4\n1 0 0 0\n0 1 0 0\n" in lta_text
    path = tmp_path / "row.lta"
    path.write_text(lta_text.replace("1 4 4\n1 0 0 0\n0 1 0 0\n", f"1 4 4\n1 0 0 0\n{row}\n"))
    _raises(read_lta, path, pattern)


def test_lta_truncated_matrix(tmp_path):
    path = tmp_path / "short.lta"
    path.write_text("type = 1\nnxforms = 1\n1 4 4\n1 0 0 0\n0 1 0 0\n")
    _raises(read_lta, path, r"LTA matrix row 3 is not 4 numbers")


# ------------------------------------------------------------------------------------ ANTs .mat

@pytest.mark.parametrize("text, pattern", [
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", r"not a MATLAB v4/v5 \.mat file \(a text file\)"),
    ("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n",
     r"not a MATLAB v4/v5 \.mat file \(an ITK text transform"),
])
def test_ants_mat_text_file(tmp_path, text, pattern):
    path = tmp_path / "t.mat"
    path.write_text(text)
    msg = _raises(read_ants_mat, path, pattern)
    assert "index out of range" not in msg


@pytest.mark.parametrize("fmt", ["4", "5"])
def test_ants_mat_complex_parameters(tmp_path, fmt):
    params = np.concatenate([np.eye(3).ravel(), [1.0, 2.0, 3.0]]).reshape(12, 1)
    path = tmp_path / "c.mat"
    scipy.io.savemat(path, {"AffineTransform_double_3_3": params + 1j, "fixed": np.zeros((3, 1))},
                     format=fmt, appendmat=False)
    _raises(read_ants_mat, path, r"'AffineTransform_double_3_3' holds complex numbers")
    scipy.io.savemat(path, {"AffineTransform_double_3_3": params, "fixed": np.zeros((3, 1)) + 1j},
                     format=fmt, appendmat=False)
    _raises(read_ants_mat, path, r"'fixed' holds complex numbers")


def test_ants_mat_text_variable(tmp_path):
    path = tmp_path / "s.mat"
    scipy.io.savemat(path, {"AffineTransform_double_3_3": "abc", "fixed": np.zeros((3, 1))}, format="5",
                     appendmat=False)
    _raises(read_ants_mat, path, r"'AffineTransform_double_3_3' is not a numeric array")


def test_ants_mat_still_reads_real_files(tmp_path):
    a = np.eye(4)
    a[:3, 3] = [7.0, -1.5, 2.0]
    np.testing.assert_allclose(read_ants_mat(write_ants_mat(tmp_path / "a.mat", a)), a, atol=1e-12)


def test_csv_with_two_frames_is_refused(tmp_path):
    path = tmp_path / "both.csv"
    path.write_text("label,x_ras,y_ras,z_ras,x_lps,y_lps,z_lps\nA,1,2,3,-1,-2,3\n")
    _raises(read_point_set, path, "both x_ras,y_ras,z_ras and x_lps,y_lps,z_lps columns")


def test_lta_comment_names_the_src_and_dst_images(tmp_path):
    """The comment follows the file's own src/dst (an inverse swaps them), not a fixed wording."""
    path = write_lta(tmp_path / "t.lta", np.eye(4), (4, 5, 6), np.eye(4), (6, 5, 4), np.eye(4),
                     moving_name="fixed_of_the_pair", fixed_name="moving_of_the_pair")
    assert "maps src RAS mm (fixed_of_the_pair) to dst RAS mm (moving_of_the_pair)" in path.read_text()
