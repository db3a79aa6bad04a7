"""keyreg.formats: every file format checked against an independent reader (SimpleITK, scipy, json).

Geometry is deliberately awkward: oblique (about 20 degrees about an oblique axis), LIA-like axis
flips, anisotropic voxels and non-cubic shapes, and transforms with a large translation along RAS x,
so a missing LPS flip, a transposed matrix, a swapped direction or an axis mix-up changes the result.
Expected values are derived from the written conventions (docs/conventions.md, FORMATS.md), never
copied from observed output.
"""

from __future__ import annotations

import json
import struct

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import torch
from conftest import rotation

from keyreg.errors import ConfigError, ImageIOError, OutputError, ShapeError
from keyreg.formats import (
    displacement_from_field,
    field_from_displacement,
    load_transform,
    read_ants_mat,
    read_displacement_field,
    read_itk_affine,
    read_lta,
    read_markups,
    read_matrix_txt,
    read_point_set,
    read_points_csv,
    save_transform,
    write_ants_mat,
    write_displacement_field,
    write_itk_affine,
    write_lta,
    write_markups_fcsv,
    write_markups_json,
    write_matrix_txt,
    write_points_csv,
)
from keyreg.transforms import AffineTransform, sample_field
from keyreg.warp import warp_image

sitk = pytest.importorskip("SimpleITK")

F = np.diag([-1.0, -1.0, 1.0, 1.0])
F3 = F[:3, :3]


# ------------------------------------------------------------------------------------------ helpers

def _grid(shape, spacing, rot, center) -> tuple[tuple[int, int, int], np.ndarray]:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = np.asarray(center, float) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return tuple(shape), a


MOVING_CENTER = np.array([11.5, -10.0, 13.0])
LIA = np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # i -> Left, j -> Inferior, k -> Anterior


@pytest.fixture(scope="module")
def fixed_grid():
    """Oblique (20 degrees), LIA-like, anisotropic, non-cubic."""
    return _grid((20, 26, 17), (1.2, 0.9, 2.0), rotation([1, 2, 0.5], 20) @ LIA, (3.0, -8.0, 12.0))


@pytest.fixture(scope="module")
def moving_grid():
    """Another oblique grid, larger than the fixed field of view and centred near T(fixed centre)."""
    return _grid((30, 24, 32), (1.0, 1.4, 1.1), rotation([0.3, -1, 1], -25), MOVING_CENTER)


def _world(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def moving_image(moving_grid):
    """Smooth, asymmetric blobs (world-space Gaussians) plus a gentle gradient: (data, affine)."""
    shape, aff = moving_grid
    p = _world(shape, aff)
    data = np.zeros(shape)
    for c, s, amp in (((4.0, 3.0, -2.0), 4.0, 100.0), ((-6.0, -1.0, 5.0), 3.0, 60.0),
                      ((1.0, -7.0, -4.0), 3.5, 80.0)):
        data += amp * np.exp(-((p - MOVING_CENTER - np.asarray(c)) ** 2).sum(-1) / (2 * s * s))
    data += 0.5 * (p[..., 0] + 2 * p[..., 1] - p[..., 2])
    return data.astype(np.float32), aff


@pytest.fixture(scope="module")
def rigid_matrix():
    """A rigid moving_from_fixed matrix: 12 degrees about an oblique axis, 7 mm along RAS x."""
    a = np.eye(4)
    a[:3, :3] = rotation([0.4, -0.3, 1.0], 12)
    a[:3, 3] = [7.0, -1.5, 2.0]
    return a


@pytest.fixture(scope="module")
def affine_matrix(rigid_matrix):
    """A general affine (anisotropic scaling + shear) with the same translation."""
    a = rigid_matrix.copy()
    a[:3, :3] = a[:3, :3] @ np.array([[1.08, 0.06, 0.0], [0.0, 0.93, -0.04], [0.03, 0.0, 1.05]])
    return a


@pytest.fixture(params=["rigid", "affine"])
def matrix(request, rigid_matrix, affine_matrix):
    return rigid_matrix if request.param == "rigid" else affine_matrix


def _save_nifti(path, data, affine):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _sitk_image(tmp_path, name, data, affine):
    return sitk.ReadImage(str(_save_nifti(tmp_path / name, data, affine)))


def _sitk_array(img) -> np.ndarray:
    """SimpleITK array (k, j, i) -> nibabel order (i, j, k)."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def _apply(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ a[:3, :3].T + a[:3, 3]


def _inside_mask(points_moving: np.ndarray, moving_shape, moving_affine, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose transformed position lies at least ``margin`` voxels inside the moving grid."""
    idx = _apply(np.linalg.inv(moving_affine), points_moving)
    return np.all((idx >= margin) & (idx <= np.asarray(moving_shape) - 1 - margin), axis=-1)


def _keyreg_warp(moving, moving_affine, fixed_shape, fixed_affine, transform) -> np.ndarray:
    out = warp_image(torch.from_numpy(moving)[None, None], moving_affine, fixed_shape, fixed_affine, transform)
    return out[0, 0].numpy()


def _assert_resample_agrees(tmp_path, moving_image, fixed_grid, sitk_transform, keyreg_transform,
                            points_moving) -> None:
    """SimpleITK.Resample(moving, fixed, T, linear) == keyreg warp_image in the interior."""
    moving, m_aff = moving_image
    f_shape, f_aff = fixed_grid
    m_img = _sitk_image(tmp_path, "moving.nii.gz", moving, m_aff)
    f_img = _sitk_image(tmp_path, "fixed.nii.gz", np.zeros(f_shape, np.float32), f_aff)
    ref = _sitk_array(sitk.Resample(m_img, f_img, sitk_transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = _keyreg_warp(moving, m_aff, f_shape, f_aff, keyreg_transform)
    inside = _inside_mask(points_moving, moving.shape, m_aff)
    assert inside.mean() > 0.3, "test geometry must overlap"
    value_range = float(moving.max() - moving.min())
    diff = np.abs(ref - ours)[inside]
    assert diff.max() < 1e-3 * value_range, diff.max()
    # the comparison is meaningful: the warped image is far from the unwarped one
    plain = _keyreg_warp(moving, m_aff, f_shape, f_aff, None)
    assert np.abs(plain - ours)[inside].max() > 0.05 * value_range


def _itk_params(a_ras: np.ndarray) -> np.ndarray:
    a = F @ a_ras @ F
    return np.concatenate([a[:3, :3].ravel(), a[:3, 3]])


# ----------------------------------------------------------------------------------------- ITK .tfm

@pytest.mark.parametrize("suffix", [".tfm", ".txt"])
def test_itk_affine_read_by_simpleitk(tmp_path, matrix, suffix, moving_image, fixed_grid):
    path = write_itk_affine(tmp_path / f"t{suffix}", matrix)
    text = path.read_text().splitlines()
    assert text[0] == "#Insight Transform File V1.0"
    assert "Transform: AffineTransform_double_3_3" in text
    assert "FixedParameters: 0 0 0" in text

    tf = sitk.ReadTransform(str(path))
    np.testing.assert_allclose(tf.GetParameters(), _itk_params(matrix), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(tf.GetFixedParameters(), [0, 0, 0])
    # full precision: the numbers read back bit-exactly
    np.testing.assert_array_equal(read_itk_affine(path), matrix)

    rng = np.random.default_rng(0)
    p_ras = rng.uniform(-40, 40, (8, 3))
    for p in p_ras:
        q_lps = np.array(tf.TransformPoint(tuple(F3 @ p)))
        np.testing.assert_allclose(F3 @ q_lps, _apply(matrix, p), atol=1e-10)

    f_shape, f_aff = fixed_grid
    pts = _apply(matrix, _world(f_shape, f_aff))
    _assert_resample_agrees(tmp_path, moving_image, fixed_grid, tf, AffineTransform(torch.from_numpy(matrix)), pts)


def test_itk_worked_example(tmp_path):
    """FORMATS.md: moving anatomy 10 mm further Right -> Parameters 1 0 0 0 1 0 0 0 1 -10 0 0."""
    a = np.eye(4)
    a[0, 3] = 10.0
    text = write_itk_affine(tmp_path / "ex.tfm", a).read_text()
    assert "Parameters: 1 0 0 0 1 0 0 0 1 -10 0 0\n" in text


def _sitk_affine(matrix_lps3, translation, center):
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(np.asarray(matrix_lps3).ravel()))
    t.SetTranslation(tuple(translation))
    t.SetCenter(tuple(center))
    return t


def _check_against_sitk(a_ras: np.ndarray, tf, n: int = 10) -> None:
    rng = np.random.default_rng(1)
    for p in rng.uniform(-60, 60, (n, 3)):
        q_lps = np.array(tf.TransformPoint(tuple(F3 @ p)))
        np.testing.assert_allclose(_apply(a_ras, p), F3 @ q_lps, atol=1e-9)


def test_itk_nonzero_center(tmp_path):
    """FORMATS.md example: offset = t + c - M c with M, t, c given in LPS."""
    m = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    tf = _sitk_affine(m, (5, -3, 2), (10, 20, 30))
    sitk.WriteTransform(tf, str(tmp_path / "c.tfm"))
    a = read_itk_affine(tmp_path / "c.tfm")
    a_lps = F @ a @ F
    np.testing.assert_allclose(a_lps[:3, 3], [0.0, -4.0, -4.5], atol=1e-12)
    np.testing.assert_allclose(_apply(a_lps, np.array([1.0, 2.0, 3.0])), [1.5, -1.9, -0.85], atol=1e-12)
    _check_against_sitk(a, tf)


@pytest.mark.parametrize("zyx", [False, True])
def test_itk_euler3d(tmp_path, zyx):
    tf = sitk.Euler3DTransform()
    tf.SetRotation(0.3, -0.5, 0.7)
    tf.SetTranslation((4.0, -2.0, 1.5))
    tf.SetCenter((10.0, -20.0, 5.0))
    tf.SetComputeZYX(zyx)
    sitk.WriteTransform(tf, str(tmp_path / "e.tfm"))
    assert tmp_path.joinpath("e.tfm").read_text().count("Euler3DTransform_double_3_3") == 1
    a = read_itk_affine(tmp_path / "e.tfm")
    _check_against_sitk(a, tf)
    np.testing.assert_allclose(F3 @ a[:3, :3] @ F3, np.reshape(tf.GetMatrix(), (3, 3)), atol=1e-14)


def test_itk_versor_translation_and_float_names(tmp_path):
    v = sitk.VersorRigid3DTransform()
    v.SetRotation((0.2, -0.4, 1.0), 0.5)
    v.SetTranslation((1.0, 2.0, -3.0))
    v.SetCenter((5.0, 6.0, -7.0))
    sitk.WriteTransform(v, str(tmp_path / "v.tfm"))
    _check_against_sitk(read_itk_affine(tmp_path / "v.tfm"), v)

    t = sitk.TranslationTransform(3, (4.0, -5.0, 6.0))
    sitk.WriteTransform(t, str(tmp_path / "tr.tfm"))
    _check_against_sitk(read_itk_affine(tmp_path / "tr.tfm"), t)

    m = rotation([1, 1, 0], 30) @ np.diag([1.1, 0.9, 1.0])
    tf = _sitk_affine(m, (1.0, -2.0, 3.0), (7.0, 8.0, 9.0))
    sitk.WriteTransform(tf, str(tmp_path / "a.txt"))
    for name in ("AffineTransform_float_3_3", "MatrixOffsetTransformBase_double_3_3"):
        text = tmp_path.joinpath("a.txt").read_text().replace("AffineTransform_double_3_3", name)
        tmp_path.joinpath("b.txt").write_text(text)
        assert sitk.ReadTransform(str(tmp_path / "b.txt")).GetParameters() == tf.GetParameters()
        _check_against_sitk(read_itk_affine(tmp_path / "b.txt"), tf)


def test_itk_composite_with_one_transform(tmp_path, rigid_matrix):
    comp = sitk.CompositeTransform(3)
    a_lps = F @ rigid_matrix @ F
    c = np.array([3.0, 2.0, 1.0])  # non-zero centre: translation = offset - c + M c
    comp.AddTransform(_sitk_affine(a_lps[:3, :3], a_lps[:3, 3] - c + a_lps[:3, :3] @ c, c))
    sitk.WriteTransform(comp, str(tmp_path / "comp.tfm"))
    assert "CompositeTransform_double_3_3" in tmp_path.joinpath("comp.tfm").read_text()
    got = read_itk_affine(tmp_path / "comp.tfm")
    _check_against_sitk(got, comp)
    np.testing.assert_allclose(got, rigid_matrix, atol=1e-12)

    comp.AddTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)))
    sitk.WriteTransform(comp, str(tmp_path / "comp2.tfm"))
    with pytest.raises(ImageIOError, match="exactly one"):
        read_itk_affine(tmp_path / "comp2.tfm")


# ----------------------------------------------------------------------------------------- ANTs .mat

def test_ants_mat_read_by_simpleitk(tmp_path, matrix, moving_image, fixed_grid):
    path = write_ants_mat(tmp_path / "reg0GenericAffine.mat", matrix)
    raw = path.read_bytes()
    assert struct.unpack("<5i", raw[:20]) == (0, 12, 1, 0, 27)  # float64, 12x1, real, name length
    assert raw[20:47] == b"AffineTransform_double_3_3\x00"
    mat = scipy.io.loadmat(str(path))
    assert mat["AffineTransform_double_3_3"].shape == (12, 1)
    assert mat["AffineTransform_double_3_3"].dtype == np.float64
    assert mat["fixed"].shape == (3, 1)
    np.testing.assert_array_equal(mat["AffineTransform_double_3_3"][:, 0], _itk_params(matrix))

    tf = sitk.ReadTransform(str(path))
    np.testing.assert_allclose(tf.GetParameters(), _itk_params(matrix), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(tf.GetFixedParameters(), [0, 0, 0])
    np.testing.assert_array_equal(read_ants_mat(path), matrix)

    f_shape, f_aff = fixed_grid
    pts = _apply(matrix, _world(f_shape, f_aff))
    _assert_resample_agrees(tmp_path, moving_image, fixed_grid, tf, AffineTransform(torch.from_numpy(matrix)), pts)


def test_ants_mat_float32_with_center(tmp_path, affine_matrix):
    """antsRegistration writes the float name, float32 data and a centre near the image centre."""
    a_lps = F @ affine_matrix @ F
    c = np.array([15.5, 15.5, 15.5])
    m = a_lps[:3, :3]
    t = a_lps[:3, 3] - c + m @ c  # same map: offset = t + c - M c
    params = np.concatenate([m.ravel(), t]).astype(np.float32).reshape(12, 1)
    path = tmp_path / "ants.mat"
    scipy.io.savemat(str(path), {"AffineTransform_float_3_3": params,
                                 "fixed": c.astype(np.float32).reshape(3, 1)}, format="4")
    assert struct.unpack("<5i", path.read_bytes()[:20])[0] == 10  # float32 record
    tf = sitk.ReadTransform(str(path))
    got = read_ants_mat(path)
    _check_against_sitk(got, tf)
    np.testing.assert_allclose(got, affine_matrix, atol=1e-4)  # float32 parameters


def test_ants_mat_euler_from_simpleitk(tmp_path):
    tf = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, 6.0))
    sitk.WriteTransform(tf, str(tmp_path / "e.mat"))
    _check_against_sitk(read_ants_mat(tmp_path / "e.mat"), tf)


# --------------------------------------------------------------------------------- displacement field

def _sin_field(shape, affine) -> np.ndarray:
    """A smooth, non-uniform, asymmetric displacement (RAS mm) evaluated at the grid's world points."""
    p = _world(shape, affine)
    u = np.stack([3.0 * np.sin(p[..., 1] / 7.0) + 1.0,
                  2.0 * np.cos(p[..., 2] / 5.0 + 0.4) - 0.5 * np.sin(p[..., 0] / 9.0),
                  1.5 * np.sin(p[..., 0] / 6.0 + 0.3) + 0.8], axis=-1)
    return u.astype(np.float32)


def test_displacement_field_read_by_simpleitk(tmp_path, fixed_grid, moving_image):
    f_shape, f_aff = fixed_grid
    u = _sin_field(f_shape, f_aff)
    path = write_displacement_field(tmp_path / "warp.nii.gz", u, f_aff)

    img = nib.load(str(path))
    hdr = img.header
    assert img.shape == (*f_shape, 1, 3)
    assert int(hdr["intent_code"]) == 1007
    assert hdr.get_data_dtype() == np.float32
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert hdr.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.affine, f_aff, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), f_aff, atol=1e-5)
    raw = np.asanyarray(img.dataobj)[:, :, :, 0, :]
    np.testing.assert_array_equal(raw, u * np.array([-1, -1, 1], np.float32))  # LPS components

    field_img = sitk.ReadImage(str(path))
    assert field_img.GetDimension() == 3
    assert field_img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(field_img.GetOrigin(), F3 @ f_aff[:3, 3], atol=1e-4)
    d = np.reshape(field_img.GetDirection(), (3, 3))
    sp = np.asarray(field_img.GetSpacing())
    np.testing.assert_allclose(F3 @ d @ np.diag(sp), f_aff[:3, :3], atol=1e-5)

    dft = sitk.DisplacementFieldTransform(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    a_file = img.affine  # the geometry as stored (float32 sform)
    rng = np.random.default_rng(2)
    for idx in rng.integers(0, f_shape, size=(12, 3)):
        p = a_file[:3, :3] @ idx + a_file[:3, 3]
        q_lps = np.array(dft.TransformPoint(tuple(F3 @ p)))
        np.testing.assert_allclose(F3 @ q_lps, p + u[tuple(idx)], atol=1e-4)

    # keyreg reads its own file back exactly (components and grid)
    u2, a2 = read_displacement_field(path)
    assert u2.shape == (*f_shape, 3) and u2.dtype == np.float32
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_allclose(a2, f_aff, atol=1e-5)

    # SimpleITK resampling with the field == keyreg warping with the same field
    field = field_from_displacement(u2, a2)
    pts = _world(f_shape, f_aff) + u
    _assert_resample_agrees(tmp_path, moving_image, fixed_grid, dft, field, pts)


def test_displacement_field_worked_example(tmp_path):
    """FORMATS.md: T(p) = p + (10, 0, 0)_RAS is stored as (-10, 0, 0); LPS (-20,-5,13) -> (-30,-5,13)."""
    shape = (6, 7, 5)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [10.0, -2.0, 4.0]
    u = np.zeros((*shape, 3), np.float32)
    u[..., 0] = 10.0
    path = write_displacement_field(tmp_path / "ex.nii.gz", u, aff)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(path)).dataobj)[0, 0, 0, 0], [-10, 0, 0])
    dft = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    np.testing.assert_allclose(dft.TransformPoint((-20.0, -5.0, 13.0)), (-30.0, -5.0, 13.0), atol=1e-6)


def test_displacement_field_keeps_header_and_accepts_intent_1006(tmp_path, fixed_grid):
    f_shape, f_aff = fixed_grid
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_slope_inter(2.0, 5.0)
    header["descrip"] = b"fixed image"
    u = _sin_field(f_shape, f_aff)
    path = write_displacement_field(tmp_path / "w.nii", u, f_aff, header=header)
    img = nib.load(str(path))
    assert img.header.get_data_dtype() == np.float32
    assert img.header.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(read_displacement_field(path)[0], u)

    lps = (u * np.array([-1, -1, 1], np.float32))[:, :, :, None, :].astype(np.float64)
    img = nib.Nifti1Image(lps, f_aff)
    img.header.set_intent(1006)
    nib.save(img, str(tmp_path / "dispvect.nii.gz"))
    got, _ = read_displacement_field(tmp_path / "dispvect.nii.gz")
    np.testing.assert_allclose(got, u, atol=1e-6)


def test_field_conversions(fixed_grid, rigid_matrix):
    f_shape, f_aff = fixed_grid
    u = _sin_field(f_shape, f_aff)
    field = field_from_displacement(u, f_aff)
    assert tuple(field.displacement.shape) == (1, 3, *f_shape)
    # map_points at grid points is p + u(p)
    idx = np.array([[3, 4, 5], [19, 0, 16], [10, 25, 2]])
    p = idx @ f_aff[:3, :3].T + f_aff[:3, 3]
    q = field.map_points(torch.from_numpy(p)[None])[0].numpy()
    np.testing.assert_allclose(q, p + u[tuple(idx.T)], atol=1e-5)
    np.testing.assert_array_equal(displacement_from_field(field, f_shape, f_aff), u)

    # a coarse (stride 3) field of an affine transform is upsampled exactly (the field is linear)
    coarse = sample_field(AffineTransform(torch.from_numpy(rigid_matrix)), f_shape, f_aff, stride=3,
                          dtype=torch.float64)
    assert coarse.shape != f_shape
    full = displacement_from_field(coarse, f_shape, f_aff)
    world = _world(f_shape, f_aff)
    np.testing.assert_allclose(full, _apply(rigid_matrix, world) - world, atol=1e-4)

    other = f_aff.copy()
    other[:3, 3] += 5.0
    with pytest.raises(ShapeError, match="grid"):
        displacement_from_field(field, f_shape, other)


# ---------------------------------------------------------------------------------------- LTA

def _parse_lta_blocks(text: str) -> dict[str, np.ndarray]:
    """Independent parse of the geometry blocks -> vox2ras = [Mdc diag(vs) | cras - Mdc diag(vs) dims/2]."""
    out: dict[str, np.ndarray] = {}
    lines = text.splitlines()
    for which in ("src", "dst"):
        start = lines.index(f"{which} volume info")
        kv = {}
        for ln in lines[start + 1:start + 9]:
            key, _, value = ln.partition("=")
            kv[key.strip()] = value.split("#")[0].split()
        assert kv["valid"] == ["1"]
        dims = np.array(kv["volume"], float)
        vs = np.array(kv["voxelsize"], float)
        mdc = np.array([kv["xras"], kv["yras"], kv["zras"]], float).T
        a = np.eye(4)
        a[:3, :3] = mdc @ np.diag(vs)
        a[:3, 3] = np.array(kv["cras"], float) - a[:3, :3] @ (dims / 2)
        out[which] = a
        out[which + "_dims"] = dims
    return out


def _lta_matrix(text: str) -> np.ndarray:
    lines = text.splitlines()
    i = lines.index("1 4 4")
    return np.array([[float(v) for v in lines[i + 1 + r].split()] for r in range(4)])


def test_lta_roundtrip_and_geometry(tmp_path, affine_matrix, fixed_grid, moving_grid):
    f_shape, f_aff = fixed_grid
    m_shape, m_aff = moving_grid
    path = write_lta(tmp_path / "reg.lta", affine_matrix, m_shape, m_aff, f_shape, f_aff,
                     moving_name="moving.nii.gz", fixed_name="fixed.nii.gz")
    text = path.read_text()
    assert "type      = 1 # LINEAR_RAS_TO_RAS" in text
    assert "filename = moving.nii.gz" in text.split("dst volume info")[0]
    # the file maps moving RAS -> fixed RAS: the inverse of keyreg's matrix
    np.testing.assert_allclose(_lta_matrix(text), np.linalg.inv(affine_matrix), atol=1e-12)
    blocks = _parse_lta_blocks(text)
    np.testing.assert_allclose(blocks["src"], m_aff, atol=1e-12)  # src = moving
    np.testing.assert_allclose(blocks["dst"], f_aff, atol=1e-12)  # dst = fixed
    np.testing.assert_array_equal(blocks["src_dims"], m_shape)
    np.testing.assert_array_equal(blocks["dst_dims"], f_shape)
    np.testing.assert_allclose(read_lta(path), affine_matrix, atol=1e-12)


def test_lta_type0_equals_type1(tmp_path, affine_matrix, fixed_grid, moving_grid):
    f_shape, f_aff = fixed_grid
    m_shape, m_aff = moving_grid
    text = write_lta(tmp_path / "ras.lta", affine_matrix, m_shape, m_aff, f_shape, f_aff).read_text()
    r = np.linalg.inv(affine_matrix)  # src (moving) RAS -> dst (fixed) RAS
    v = np.linalg.inv(f_aff) @ r @ m_aff  # src voxel -> dst voxel
    lines = text.splitlines()
    i = lines.index("1 4 4")
    lines[i + 1:i + 5] = [" ".join(repr(float(x)) for x in row) for row in v]
    lines = [("type      = 0 # LINEAR_VOX_TO_VOX" if ln.startswith("type") else ln) for ln in lines]
    tmp_path.joinpath("vox.lta").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_lta(tmp_path / "vox.lta"), read_lta(tmp_path / "ras.lta"), atol=1e-9)

    bad = "\n".join(ln.replace("valid = 1", "valid = 0") for ln in lines) + "\n"
    tmp_path.joinpath("bad.lta").write_text(bad)
    with pytest.raises(ImageIOError, match="geometry"):
        read_lta(tmp_path / "bad.lta")
    # a type-1 file does not need the geometry
    tmp_path.joinpath("ras_invalid.lta").write_text(text.replace("valid = 1", "valid = 0"))
    np.testing.assert_allclose(read_lta(tmp_path / "ras_invalid.lta"), affine_matrix, atol=1e-12)


def test_lta_worked_example_conformed(tmp_path):
    """FORMATS.md: 10 mm Right on FreeSurfer-conformed LIA 256^3 grids -> row `1 0 0 -10`, vox `1 0 0 10`."""
    lia = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    a = np.eye(4)
    a[0, 3] = 10.0
    text = write_lta(tmp_path / "c.lta", a, (256,) * 3, lia, (256,) * 3, lia).read_text()
    assert _lta_matrix(text)[0].tolist() == [1, 0, 0, -10]
    for line in ("volume = 256 256 256", "voxelsize = 1 1 1", "xras   = -1 0 0", "yras   = 0 0 -1",
                 "zras   = 0 1 0", "cras   = 0 0 0"):
        assert line in text.splitlines()
    v = np.linalg.inv(lia) @ _lta_matrix(text) @ lia
    assert v[0].tolist() == [1, 0, 0, 10]


# --------------------------------------------------------------------------- matrix text and dispatch

def test_matrix_txt_and_dispatch(tmp_path, affine_matrix, fixed_grid, moving_grid):
    path = write_matrix_txt(tmp_path / "t_matrix.txt", affine_matrix)
    assert path.read_text().startswith("# keyreg moving_from_fixed RAS\n")
    np.testing.assert_array_equal(read_matrix_txt(path), affine_matrix)
    np.testing.assert_array_equal(np.loadtxt(path), affine_matrix)  # plain numbers for numpy too

    f_shape, f_aff = fixed_grid
    m_shape, m_aff = moving_grid
    geometry = dict(moving_shape=m_shape, moving_affine=m_aff, fixed_shape=f_shape, fixed_affine=f_aff)
    for name in ("a.tfm", "a.txt", "a_matrix.txt", "a.mat", "a.lta"):
        save_transform(tmp_path / name, affine_matrix, **geometry)
        np.testing.assert_allclose(load_transform(tmp_path / name), affine_matrix, atol=1e-12)
    assert tmp_path.joinpath("a.txt").read_text().startswith("#Insight Transform File")
    assert tmp_path.joinpath("a_matrix.txt").read_text().startswith("# keyreg")
    assert sitk.ReadTransform(str(tmp_path / "a.txt")).GetParameters() == tuple(_itk_params(affine_matrix))
    assert scipy.io.loadmat(str(tmp_path / "a.mat"))["fixed"].shape == (3, 1)

    with pytest.raises(ConfigError, match="geometry"):
        save_transform(tmp_path / "b.lta", affine_matrix)
    with pytest.raises(ConfigError, match="extension"):
        save_transform(tmp_path / "b.xfm", affine_matrix)
    with pytest.raises(ConfigError, match="extension"):
        load_transform(tmp_path / "a.h5")
    with pytest.raises(ImageIOError, match="ITK transform file"):
        read_matrix_txt(tmp_path / "a.txt")


def test_writers_accept_tensor_and_reject_bad_matrix(tmp_path, rigid_matrix):
    t = torch.from_numpy(rigid_matrix)[None]  # (1, 4, 4) as AffineTransform stores it
    np.testing.assert_array_equal(read_itk_affine(write_itk_affine(tmp_path / "t.tfm", t)), rigid_matrix)
    with pytest.raises(ShapeError, match="4, 4"):
        write_itk_affine(tmp_path / "bad.tfm", np.eye(3))
    bad = rigid_matrix.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ShapeError, match="NaN"):
        write_ants_mat(tmp_path / "bad.mat", bad)
    assert not tmp_path.joinpath("bad.tfm").exists() and not tmp_path.joinpath("bad.mat").exists()


def test_writes_are_atomic(tmp_path, monkeypatch, fixed_grid):
    """A failing write leaves the previous file untouched and no temporary file behind."""
    f_shape, f_aff = fixed_grid
    target = tmp_path / "warp.nii.gz"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("keyreg.nifti_gzip.write_nifti", boom)  # every NIfTI output goes through it
    with pytest.raises(RuntimeError):
        write_displacement_field(target, _sin_field(f_shape, f_aff), f_aff)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warp.nii.gz"]


# ------------------------------------------------------------------------------------------ points

@pytest.fixture
def points():
    rng = np.random.default_rng(3)
    return rng.uniform(-80, 80, (7, 3)) + rng.normal(0, 1e-7, (7, 3))


def test_points_csv_roundtrip(tmp_path, points):
    w = np.linspace(0.1, 2.0, len(points))
    path = write_points_csv(tmp_path / "k.csv", points, weights=w)
    lines = path.read_text().splitlines()
    assert lines[0] == "label,x_ras,y_ras,z_ras,weight"
    assert lines[1].startswith("K-1,") and lines[-1].startswith("K-7,")
    p, labels = read_points_csv(path)
    np.testing.assert_array_equal(p, points)  # full precision
    assert labels == [f"K-{i}" for i in range(1, 8)]
    ps = read_point_set(path)
    p, labels, weights = ps.points, ps.labels, ps.weights
    np.testing.assert_array_equal(weights, w)

    names = ["a", "b,with comma", "c", "d", "e", "f", "g"]
    write_points_csv(tmp_path / "n.csv", points, labels=names)
    assert read_points_csv(tmp_path / "n.csv")[1] == names
    assert read_point_set(tmp_path / "n.csv").weights is None


def test_points_csv_spaces(tmp_path, points):
    lps = (points * np.array([-1.0, -1.0, 1.0])).tolist()  # Python floats: repr is exact
    # ANTs antsApplyTransformsToPoints layout: LPS, x,y,z,t[,label,comment]
    rows = ["x,y,z,t,label,comment"] + [f"{q[0]!r},{q[1]!r},{q[2]!r},0,{i + 1},c" for i, q in enumerate(lps)]
    tmp_path.joinpath("ants.csv").write_text("\n".join(rows) + "\n")
    p, labels = read_points_csv(tmp_path / "ants.csv", space="LPS")
    np.testing.assert_array_equal(p, points)
    assert labels[0] == "1"
    np.testing.assert_array_equal(read_points_csv(tmp_path / "ants.csv", space="ras")[0], np.array(lps))

    rows = ["label,x_lps,y_lps,z_lps"] + [f"P{i},{q[0]!r},{q[1]!r},{q[2]!r}" for i, q in enumerate(lps)]
    tmp_path.joinpath("lps.csv").write_text("\n".join(rows) + "\n")
    np.testing.assert_array_equal(read_points_csv(tmp_path / "lps.csv")[0], points)
    np.testing.assert_array_equal(read_points_csv(tmp_path / "lps.csv", space="LPS")[0], points)
    with pytest.raises(ImageIOError, match="the columns x_lps,y_lps,z_lps are LPS, not the RAS given"):
        read_points_csv(tmp_path / "lps.csv", space="RAS")  # a contradiction is not silently resolved

    with pytest.raises(ConfigError, match="RAS"):
        read_points_csv(tmp_path / "lps.csv", space="XYZ")


@pytest.mark.parametrize("cs", ["LPS", "RAS"])
def test_markups_json(tmp_path, points, cs):
    path = write_markups_json(tmp_path / "k.mrk.json", points, coordinate_system=cs)
    doc = json.loads(path.read_text())
    assert doc["@schema"] == ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                              "Markups/Resources/Schema/markups-schema-v1.0.3.json#")
    (mk,) = doc["markups"]
    assert (mk["type"], mk["coordinateSystem"], mk["coordinateUnits"]) == ("Fiducial", cs, "mm")
    cps = mk["controlPoints"]
    assert [c["id"] for c in cps] == [str(i) for i in range(1, 8)]
    assert all(c["positionStatus"] == "defined" for c in cps)
    pos = np.array([c["position"] for c in cps])
    expected = points * np.array([-1.0, -1.0, 1.0]) if cs == "LPS" else points
    np.testing.assert_array_equal(pos, expected)
    p, labels = read_markups(path)
    np.testing.assert_array_equal(p, points)
    assert labels == [f"K-{i}" for i in range(1, 8)]


def test_markups_json_default_lps_and_units(tmp_path):
    doc = {"@schema": "x", "markups": [
        {"type": "Line", "controlPoints": [{"position": [9, 9, 9]}]},
        {"type": "Fiducial", "controlPoints": [
            {"label": "A", "position": [-10.0, 2.0, 3.0]},
            {"label": "skip", "positionStatus": "undefined"},
        ]},
        {"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "um",
         "controlPoints": [{"label": "B", "position": [1000.0, 2000.0, -500.0]}]},
    ]}
    tmp_path.joinpath("m.mrk.json").write_text(json.dumps(doc))
    p, labels = read_markups(tmp_path / "m.mrk.json")
    np.testing.assert_array_equal(p, [[10.0, -2.0, 3.0], [1.0, 2.0, -0.5]])
    assert labels == ["A", "B"]


@pytest.mark.parametrize("cs", ["LPS", "RAS"])
def test_markups_fcsv_roundtrip(tmp_path, points, cs):
    path = write_markups_fcsv(tmp_path / "k.fcsv", points, labels=[f"L{i}" for i in range(7)],
                              coordinate_system=cs)
    lines = path.read_text().splitlines()
    assert lines[1] == f"# CoordinateSystem = {cs}"
    assert lines[2] == "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
    first = lines[3].split(",")
    expected = points[0] * (np.array([-1.0, -1.0, 1.0]) if cs == "LPS" else 1.0)
    np.testing.assert_array_equal([float(v) for v in first[1:4]], expected)
    p, labels = read_markups(path)
    np.testing.assert_array_equal(p, points)
    assert labels == [f"L{i}" for i in range(7)]


@pytest.mark.parametrize("code, sign", [("0", 1.0), ("1", -1.0), ("RAS", 1.0), ("LPS", -1.0), (None, 1.0)])
def test_markups_fcsv_legacy_codes(tmp_path, code, sign):
    """Slicer <= 4.10 wrote ``CoordinateSystem = 0`` (RAS); files without the line are older, RAS too."""
    text = ("# Markups fiducial file version = 4.10\n"
            + (f"# CoordinateSystem = {code}\n" if code is not None else "")
            + "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            "vtkMRMLMarkupsFiducialNode_0,-10,4.5,7,0,0,0,1,1,1,0,F-1,,\n")
    tmp_path.joinpath("old.fcsv").write_text(text)
    p, labels = read_markups(tmp_path / "old.fcsv")
    np.testing.assert_array_equal(p, [[-10 * sign, 4.5 * sign, 7.0]])
    assert labels == ["F-1"]


def test_markups_worked_example_and_itk_points(tmp_path, rigid_matrix, points):
    """Fixed landmarks pushed through the ITK file (LPS) land on the moving landmarks' file positions."""
    a = np.eye(4)
    a[0, 3] = 10.0
    write_markups_json(tmp_path / "ex.mrk.json", _apply(a, np.zeros((1, 3))), coordinate_system="LPS")
    doc = json.loads(tmp_path.joinpath("ex.mrk.json").read_text())
    assert doc["markups"][0]["controlPoints"][0]["position"] == [-10.0, 0.0, 0.0]

    write_markups_json(tmp_path / "fixed.mrk.json", points)
    write_markups_json(tmp_path / "moving.mrk.json", _apply(rigid_matrix, points))
    tf = sitk.ReadTransform(str(write_itk_affine(tmp_path / "t.tfm", rigid_matrix)))
    fixed_lps = [c["position"] for c in json.loads(tmp_path.joinpath("fixed.mrk.json").read_text())
                 ["markups"][0]["controlPoints"]]
    moving_lps = [c["position"] for c in json.loads(tmp_path.joinpath("moving.mrk.json").read_text())
                  ["markups"][0]["controlPoints"]]
    mapped = np.array([tf.TransformPoint(q) for q in fixed_lps])
    np.testing.assert_allclose(mapped, moving_lps, atol=1e-9)


# ------------------------------------------------------------------------------------------- errors

_READERS = [
    (read_itk_affine, "t.tfm"),
    (read_ants_mat, "t.mat"),
    (read_displacement_field, "w.nii.gz"),
    (read_lta, "t.lta"),
    (read_matrix_txt, "t_matrix.txt"),
    (read_points_csv, "p.csv"),
    (read_markups, "p.mrk.json"),
    (read_markups, "p.fcsv"),
    (load_transform, "t.tfm"),
]


@pytest.mark.parametrize("reader, name", _READERS)
def test_missing_file(tmp_path, reader, name):
    with pytest.raises(ImageIOError, match="does not exist") as e:
        reader(tmp_path / name)
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"garbage \xff\xfe\x00\x01 not a file\n" * 5, b"1 2 3\nfoo bar\n", b""])
@pytest.mark.parametrize("reader, name", _READERS)
def test_garbage_content(tmp_path, reader, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageIOError) as e:
        reader(tmp_path / name)
    msg = str(e.value)
    assert name in msg and "\n" not in msg


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.tfm").mkdir()
    with pytest.raises(ImageIOError, match="directory"):
        read_itk_affine(tmp_path / "d.tfm")


def test_ants_mat_needs_mat_extension(tmp_path, rigid_matrix):
    with pytest.raises(OutputError, match=r"\.mat"):
        write_ants_mat(tmp_path / "affine.txt", rigid_matrix)
    assert list(tmp_path.iterdir()) == []


def test_displacement_4d_layout_rejected(tmp_path, fixed_grid):
    f_shape, f_aff = fixed_grid
    u = _sin_field(f_shape, f_aff)
    img = nib.Nifti1Image(u, f_aff)  # (X, Y, Z, 3): ITK reads this as a 4-D scalar image
    img.header.set_intent("vector")
    nib.save(img, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ImageIOError, match=r"\(X, Y, Z, 1, 3\)"):
        read_displacement_field(tmp_path / "4d.nii.gz")

    img = nib.Nifti1Image(u[:, :, :, None, :], f_aff)  # right shape, no intent
    nib.save(img, str(tmp_path / "nointent.nii.gz"))
    with pytest.raises(ImageIOError, match="intent"):
        read_displacement_field(tmp_path / "nointent.nii.gz")

    with pytest.raises(ShapeError, match=r"\(X, Y, Z, 3\)"):
        write_displacement_field(tmp_path / "x.nii.gz", u[..., :2], f_aff)
    with pytest.raises(OutputError, match="nii"):
        write_displacement_field(tmp_path / "x.mha", u, f_aff)


def test_unknown_transform_type_in_tfm(tmp_path):
    tmp_path.joinpath("b.tfm").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: BSplineTransform_double_3_3\n"
        "Parameters: 0 0 0\nFixedParameters: 4 4 4 0 0 0 1 1 1 1 0 0 0 1 0 0 0 1\n")
    with pytest.raises(ImageIOError, match="unsupported transform type 'BSplineTransform_double_3_3'"):
        read_itk_affine(tmp_path / "b.tfm")
    tmp_path.joinpath("n.tfm").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 1 0 0 0 1 0 0 0 1 0 0\nFixedParameters: 0 0 0\n")
    with pytest.raises(ImageIOError, match="12 parameters"):
        read_itk_affine(tmp_path / "n.tfm")


def test_lta_unsupported_type(tmp_path, rigid_matrix):
    lia = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    text = write_lta(tmp_path / "a.lta", rigid_matrix, (256,) * 3, lia, (256,) * 3, lia).read_text()
    tmp_path.joinpath("b.lta").write_text(text.replace("type      = 1", "type      = 14"))
    with pytest.raises(ImageIOError, match="type 14"):
        read_lta(tmp_path / "b.lta")
