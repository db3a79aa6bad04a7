"""Reading volumes: accepted inputs, validation errors, atomic writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import save_nifti

from keyreg.atomic import atomic_path
from keyreg.errors import ImageContentError, ImageIOError, OutputError
from keyreg.io import Volume, load_volume, save_volume

AFF = np.diag([1.5, 1.0, 2.0, 1.0])


def image(shape=(6, 7, 5), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_accepted_inputs_agree(tmp_path):
    data = image()
    path = save_nifti(tmp_path / "a.nii.gz", data, AFF)
    from_path = load_volume(path)
    assert from_path.name == "a" and from_path.shape == (6, 7, 5)
    np.testing.assert_array_equal(from_path.affine, AFF)
    for src in (nib.load(path), (data, AFF), from_path, torch.from_numpy(data)):
        v = load_volume(src, affine=AFF if torch.is_tensor(src) else None)
        np.testing.assert_array_equal(v.data, data)
        np.testing.assert_array_equal(v.affine, AFF)


def test_four_d_single_volume_is_accepted(tmp_path):
    path = save_nifti(tmp_path / "a.nii", image((6, 7, 5, 1)), AFF)
    assert load_volume(path).shape == (6, 7, 5)


def test_labels_are_integers_never_normalised(tmp_path):
    lab = np.zeros((6, 7, 5), dtype=np.float32)
    lab[2:4] = 41
    lab[0] = 1_000_003
    v = load_volume(save_nifti(tmp_path / "s.nii.gz", lab, AFF), kind="labels")
    assert v.data.dtype == np.int64 and set(np.unique(v.data)) == {0, 41, 1_000_003}


@pytest.mark.parametrize("case,error,match", [
    ("missing", ImageIOError, "does not exist"),
    ("directory", ImageIOError, "is a directory"),
    ("not_nifti_name", ImageIOError, "not a NIfTI file name"),
    ("garbage", ImageIOError, "cannot read as NIfTI"),
    ("corrupt_gzip", ImageIOError, "corrupt|cannot read"),
    ("empty", ImageIOError, "cannot read as NIfTI"),
    ("two_d", ImageContentError, "expected a 3-D volume"),
    ("multi_volume", ImageContentError, "expected a 3-D volume"),
    ("thin", ImageContentError, "at least 2 voxels"),
    ("nan", ImageContentError, "NaN or Inf"),
    ("inf", ImageContentError, "NaN or Inf"),
    ("constant", ImageContentError, "constant"),
])
def test_bad_images(tmp_path, case, error, match):
    p = tmp_path / "x.nii.gz"
    if case == "missing":
        p = tmp_path / "nope.nii.gz"
    elif case == "directory":
        p = tmp_path / "dir.nii.gz"
        p.mkdir()
    elif case == "not_nifti_name":
        p = tmp_path / "x.txt"
        p.write_text("hello")
    elif case == "garbage":
        p.write_bytes(gzip.compress(b"definitely not nifti" * 20))
    elif case == "corrupt_gzip":
        save_nifti(p, image((20, 20, 20)), AFF)
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "two_d":
        save_nifti(p, image((6, 7)), AFF)
    elif case == "multi_volume":
        save_nifti(p, image((6, 7, 5, 3)), AFF)
    elif case == "thin":
        save_nifti(p, image((6, 1, 5)), AFF)
    elif case in ("nan", "inf"):
        d = image()
        d[1, 2, 3] = np.nan if case == "nan" else np.inf
        save_nifti(p, d, AFF)
    elif case == "constant":
        save_nifti(p, np.full((6, 7, 5), 3.0, dtype=np.float32), AFF)
    with pytest.raises(error, match=match):
        load_volume(p)


def test_bad_label_maps(tmp_path):
    d = np.zeros((6, 7, 5), dtype=np.float32)
    d[1] = 2.5
    with pytest.raises(ImageContentError, match="non-integer"):
        load_volume(save_nifti(tmp_path / "s.nii.gz", d, AFF), kind="labels")
    d[1] = np.nan
    with pytest.raises(ImageContentError, match="NaN"):
        load_volume(save_nifti(tmp_path / "t.nii.gz", d, AFF), kind="labels")


def test_array_needs_affine_and_valid_affine():
    with pytest.raises(ImageContentError, match="needs an affine"):
        load_volume(image())
    with pytest.raises(ImageContentError, match="invalid affine"):
        load_volume((image(), np.zeros((4, 4))))


def test_too_many_voxels_rejected_before_reading(tmp_path, monkeypatch):
    import keyreg.io as kio

    monkeypatch.setattr(kio, "MAX_VOXELS", 100)
    with pytest.raises(ImageContentError, match="more than the 100"):
        load_volume(save_nifti(tmp_path / "a.nii.gz", image(), AFF))


def test_save_volume_carries_reference_header(tmp_path):
    ref = load_volume(save_nifti(tmp_path / "ref.nii.gz", image(), AFF))
    out = save_volume(np.ones(ref.shape, dtype=np.float32) * 2, ref, tmp_path / "out" / "w.nii.gz")
    img = nib.load(out)
    np.testing.assert_array_equal(img.affine, AFF)
    assert int(img.header["sform_code"]) == 1 and img.get_fdata().max() == 2
    with pytest.raises(ImageContentError, match="does not match grid"):
        save_volume(np.ones((2, 2, 2)), ref, tmp_path / "bad.nii.gz")
    with pytest.raises(OutputError, match="must end in .nii"):
        save_volume(np.ones(ref.shape), ref, tmp_path / "bad.img")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    ref = Volume(image(), AFF)

    def fake_save(img, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("keyreg.nifti_gzip.write_nifti", fake_save)  # every NIfTI output goes through it
    with pytest.raises(OutputError, match="No space left"):
        save_volume(ref.data, ref, tmp_path / "w.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_uncreatable_output_directory_is_a_clean_error():
    ref = Volume(image(), AFF)
    with pytest.raises(OutputError, match="cannot create output directory"):
        save_volume(ref.data, ref, "/proc/keyreg-test/w.nii.gz")


def test_volume_repr_shows_geometry():
    v = Volume(image(), AFF, name="t1")
    assert "shape=(6, 7, 5)" in repr(v) and "1.5x1x2 mm" in repr(v) and "RAS" in repr(v)


def test_atomic_dir_merge_replaces_its_entries_and_keeps_the_others(tmp_path):
    from keyreg.atomic import atomic_dir

    out = tmp_path / "out"
    (out / "images" / "old").mkdir(parents=True)
    (out / "mine.txt").write_text("the user's")
    (out / "metrics.csv").write_text("old")
    with atomic_dir(out, merge=True) as stage:
        assert stage.parent == out and stage.name.endswith(".tmp")
        (stage / "images" / "new").mkdir(parents=True)
        (stage / "metrics.csv").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["images", "metrics.csv", "mine.txt"]
    assert [p.name for p in (out / "images").iterdir()] == ["new"]  # a directory is replaced as a whole
    assert (out / "metrics.csv").read_text() == "new" and (out / "mine.txt").read_text() == "the user's"
    with pytest.raises(RuntimeError):
        with atomic_dir(out, merge=True) as stage:
            (stage / "metrics.csv").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["images", "metrics.csv", "mine.txt"]
    assert (out / "metrics.csv").read_text() == "new"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        with atomic_dir(tmp_path / "afile" / "out", merge=True):
            pass


def test_one_affine_check_for_images_and_transform_files(tmp_path):
    from keyreg.errors import ShapeError
    from keyreg.formats import write_displacement_field
    from keyreg.formats.lta import lta_geometry_block
    from keyreg.io import check_affine

    singular = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ImageContentError, match="x.nii: invalid affine"):
        check_affine(singular, "x.nii")
    with pytest.raises(ShapeError, match="invalid affine"):
        check_affine(torch.full((4, 4), float("nan")), "t", ShapeError)
    with pytest.raises(ShapeError, match="invalid affine"):
        write_displacement_field(tmp_path / "u.nii.gz", np.zeros((2, 2, 2, 3), np.float32), singular)
    with pytest.raises(ShapeError, match="invalid affine"):
        lta_geometry_block((2, 2, 2), singular, "src")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_loaded_volumes_are_c_ordered_and_equal_nibabel(tmp_path, klass):
    """A .nii.gz read through ISA-L (NIfTI-1 and -2, scaled int16 data) and a .nii read by nibabel give
    nibabel's values, in C order (the rest of the pipeline is faster on C-ordered arrays); labels too."""
    rng = np.random.default_rng(0)
    data = rng.integers(-300, 3000, (9, 7, 5)).astype(np.int16)
    aff = np.diag([1.5, 1.0, 2.0, 1.0])
    for name in ("img.nii.gz", "img.nii"):
        img = klass(data, aff)
        img.header.set_slope_inter(0.5, 10.0)
        nib.save(img, tmp_path / name)
        ref = np.asanyarray(nib.load(tmp_path / name).dataobj).astype(np.float32)
        vol = load_volume(tmp_path / name)
        assert vol.data.flags.c_contiguous and vol.data.dtype == np.float32 and np.array_equal(vol.data, ref)
        nib.save(klass(data, aff), tmp_path / f"seg_{name}")
        lab = load_volume(tmp_path / f"seg_{name}", kind="labels", compact_labels=True)
        assert lab.data.flags.c_contiguous and lab.data.dtype == np.int16 and np.array_equal(lab.data, data)


def test_prefetched_inputs_are_read_once_and_never_stale(tmp_path):
    """Bytes inflated ahead (keyreg.prefetch) are what load_volume reads; a file changed after its
    prefetch is read again; other paths are ignored."""
    from keyreg import prefetch as pf

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    pf.prefetch([path, tmp_path / "missing.nii.gz", tmp_path, None])
    got = pf.take(path)
    assert got is not None and pf.take(path) is None  # taken once
    pf.prefetch([path])
    assert np.array_equal(load_volume(path).data, data)  # through the prefetched bytes
    assert pf.take(path) is None
    pf.prefetch([path])
    nib.save(nib.Nifti1Image(data + 1, np.eye(4)), path)  # changed after the prefetch
    assert np.array_equal(load_volume(path).data, data + 1)


@pytest.mark.parametrize("unit, per_mm", [("meter", 1e-3), ("micron", 1e3)])
def test_nifti_spatial_units_are_read_as_mm(tmp_path, unit, per_mm):
    """A header in metres or microns (xyzt_units) gives the same mm geometry as one in mm, and what is
    written on its grid says mm."""
    from keyreg.io import read_grid

    aff = np.diag([1.5, 1.2, 2.0, 1.0])
    aff[:3, 3] = (-20.0, 15.0, 8.0)
    data = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    scaled = aff.copy()
    scaled[:3, :] *= per_mm
    img = nib.Nifti1Image(data, scaled)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, tmp_path / "in.nii.gz")
    vol = load_volume(tmp_path / "in.nii.gz")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-9)
    np.testing.assert_allclose(read_grid(tmp_path / "in.nii.gz").affine, aff, atol=1e-9)
    save_volume(vol.data, vol, tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)


def test_header_fixes_of_nibabel_become_one_warning_naming_the_file(tmp_path, capfd):
    """nibabel prints its header repairs (here a negative pixdim) without a file name; keyreg turns
    each into one warning naming the file, and the CLI prints it as one line."""
    from keyreg.cli import main

    img = nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), np.diag([2.0, 2, 2, 1]))
    img.header["pixdim"][1] = -2.0
    path = tmp_path / "negpix.nii.gz"
    nib.save(img, path)
    with pytest.warns(UserWarning, match=r"negpix\.nii\.gz: nibabel repaired the header while reading: pixdim"):
        vol = load_volume(path)
    np.testing.assert_allclose(vol.affine, np.diag([2.0, 2, 2, 1]))
    assert capfd.readouterr().err == ""  # nibabel's own unnamed line is not printed

    (tmp_path / "id.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    rc = main(["apply", str(path), "-t", str(tmp_path / "id.txt"), "-r", str(path), "-o", str(tmp_path / "w.nii.gz")])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 0
    assert len(err) == 1 and err[0].startswith("keyreg apply: warning: ") and "negpix.nii.gz" in err[0], err


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_an_intensity_image_given_as_labels_is_named_in_a_warning(tmp_path, dtype):
    """A label map with thousands of distinct ids (an integer T1 passed as a segmentation) loads with
    a warning naming the file: every id would get its own Dice. A parcellation of a few hundred ids,
    and a bool mask, load silently."""
    import warnings as _warnings

    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (24, 24, 24)).astype(dtype)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "t1.nii.gz")
    with pytest.warns(UserWarning, match=r"t1\.nii\.gz: label map has \d+ or more distinct ids; is it an intensity"):
        vol = load_volume(tmp_path / "t1.nii.gz", kind="labels")
    assert vol.data.shape == (24, 24, 24)
    parcels = rng.integers(0, 400, (24, 24, 24)).astype(dtype)
    nib.save(nib.Nifti1Image(parcels, np.eye(4)), tmp_path / "aparc.nii.gz")
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        load_volume(tmp_path / "aparc.nii.gz", kind="labels")
        load_volume(tmp_path / "aparc.nii.gz", kind="labels", compact_labels=True)
