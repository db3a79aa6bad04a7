"""Bad input through the command line: every case exits non-zero with ONE line on stderr (no
traceback) and leaves no partial output files.

Each case builds its broken input from a set of good files and returns the command line and a
pattern the error line must match.  The table of cases and their messages is printed by
``python tests/test_bad_input.py`` (used for the issue's closing note).
"""

from __future__ import annotations

import errno
import gzip
import os
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_image, grid_affine, rotation, save_nifti, tiny_model

from keyreg.cli import main

CENTRES = [(-8.0, 4.0, 2.0), (7.0, -5.0, 6.0), (1.0, 9.0, -7.0), (-3.0, -8.0, -4.0)]


@pytest.fixture
def env(tmp_path):
    """Good inputs (images, label maps, a tiny model, a transform) and the output directory ``out``."""
    from keyreg.formats import save_transform
    from keyreg.models import save_model

    src = tmp_path / "in"
    src.mkdir()
    shape = (24, 26, 22)
    aff = grid_affine((1.5, 1.4, 1.6), rotation([1, 0, 0], 8), shape=shape)
    img = blob_image(shape, aff, CENTRES, radius=5.0) + 0.01
    seg = (img > 0.5).astype(np.int16) * 3
    for name in ("fixed", "moving"):
        save_nifti(src / f"{name}.nii.gz", img, aff)
        save_nifti(src / f"{name}_seg.nii.gz", seg, aff)
    model, _ = save_model(tiny_model(), src / "tiny")
    save_transform(src / "t_matrix.txt", np.eye(4))
    return SimpleNamespace(src=src, out=tmp_path / "out", model=model, shape=shape, aff=aff, img=img, tmp=tmp_path)


def register(e, *, moving=None, fixed=None, model=None, extra=()):
    return ["register", "--moving", str(moving or e.src / "moving.nii.gz"), "--fixed", str(fixed or e.src / "fixed.nii.gz"),
            "--load_path", str(model or e.model), "--list_of_aligns", "affine", "--save_eval_to_disk",
            "--save_dir", str(e.out), "--device", "cpu", *map(str, extra)]


def _image(e, name, data, affine=None) -> Path:
    return save_nifti(e.src / name, np.asarray(data), e.aff if affine is None else affine)


# ---------------------------------------------------------------------------------------- builders

def missing_file(e):
    return register(e, moving=e.src / "nope.nii.gz"), r"nope\.nii\.gz: --moving does not exist"


def unreadable_file(e):
    p = e.src / "moving.nii.gz"
    p.chmod(0)
    if os.access(p, os.R_OK):
        pytest.skip("running as root: file permissions do not stop reading")
    return register(e), r"moving\.nii\.gz: cannot read as NIfTI \(.*Permission denied"


def corrupt_gzip(e):
    (e.src / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    return register(e, moving=e.src / "bad.nii.gz"), r"bad\.nii\.gz: cannot read as NIfTI"


def truncated_data(e):
    raw = gzip.decompress((e.src / "moving.nii.gz").read_bytes())
    (e.src / "cut.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return register(e, moving=e.src / "cut.nii.gz"), r"cut\.nii\.gz: (corrupt or truncated data|cannot read)"


def empty_file(e):
    (e.src / "empty.nii.gz").write_bytes(b"")
    return register(e, moving=e.src / "empty.nii.gz"), r"empty\.nii\.gz: cannot read as NIfTI"


def not_a_nifti_name(e):
    (e.src / "scan.png").write_bytes(b"\x89PNG....")
    return register(e, moving=e.src / "scan.png"), r"scan\.png: not a NIfTI file name"


def image_2d(e):
    return register(e, moving=_image(e, "flat.nii.gz", e.img[:, :, 10])), r"expected a 3-D volume .*got shape \(24, 26\)"


def image_4d_several_volumes(e):
    return (register(e, moving=_image(e, "four.nii.gz", np.stack([e.img] * 3, -1))),
            r"expected a 3-D volume \(or 4-D with one volume\), got shape \(24, 26, 22, 3\)")


def image_nan(e):
    bad = e.img.copy()
    bad[3, 4, 5] = np.nan
    return register(e, moving=_image(e, "nan.nii.gz", bad)), r"nan\.nii\.gz: 1 voxel is NaN or Inf"


def image_inf(e):
    bad = e.img.copy()
    bad[:2] = np.inf
    return register(e, fixed=_image(e, "inf.nii.gz", bad)), r"inf\.nii\.gz: \d+ voxels are NaN or Inf"


def constant_image(e):
    return (register(e, moving=_image(e, "const.nii.gz", np.full(e.shape, 7.0, np.float32))),
            r"const\.nii\.gz: image is constant \(value 7\)")


def seg_grid_mismatch(e):
    seg = _image(e, "small_seg.nii.gz", np.zeros((20, 20, 20), np.int16))
    return (register(e, extra=["--moving_seg", seg, "--fixed_seg", e.src / "fixed_seg.nii.gz"]),
            r"segmentation grid \(20, 20, 20\) does not match its image grid")


def seg_affine_mismatch(e):
    shifted = e.aff.copy()
    shifted[:3, 3] += 0.6  # the same shape, moved by 0.6 mm: the message names the affines, not two equal shapes
    seg = _image(e, "shifted_seg.nii.gz", np.zeros(e.shape, np.int16), shifted)
    return (register(e, extra=["--moving_seg", seg, "--fixed_seg", e.src / "fixed_seg.nii.gz"]),
            r"shifted_seg: moving segmentation grid does not match its image grid: same shape .*affines differ by up to 0\.6")


def non_integer_labels(e):
    seg = _image(e, "float_seg.nii.gz", (e.img * 3.3).astype(np.float32))
    return (register(e, extra=["--moving_seg", seg, "--fixed_seg", e.src / "fixed_seg.nii.gz"]),
            r"float_seg\.nii\.gz: label map has non-integer values")


def labels_nan(e):
    seg = (e.img > 0.5).astype(np.float32)
    seg[0, 0, 0] = np.nan
    seg = _image(e, "nan_seg.nii.gz", seg)
    return (register(e, extra=["--moving_seg", e.src / "moving_seg.nii.gz", "--fixed_seg", seg]),
            r"nan_seg\.nii\.gz: label map contains NaN or Inf")


def absurd_dimensions(e):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30_000, 30_000, 30_000))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    (e.src / "huge.nii").write_bytes(hdr.binaryblock + b"\x00" * 4)  # header only: 356 bytes on disk
    return (register(e, moving=e.src / "huge.nii"),
            r"huge\.nii: \(30000, 30000, 30000\) is [\d,]+ voxels, more than the [\d,]+ keyreg accepts")


def checkpoint_text_file(e):
    (e.src / "model.pth").write_text("these are not weights\n")
    return register(e, model=e.src / "model.pth"), r"model\.pth: not a readable PyTorch checkpoint"


def checkpoint_other_architecture(e):
    torch.save({"state_dict": {"fc1.weight": torch.zeros(4, 4), "fc1.bias": torch.zeros(4)}}, e.src / "mlp.pth.tar")
    return register(e, model=e.src / "mlp.pth.tar"), r"mlp\.pth\.tar: .*unrecognised checkpoint"


def keyreg_model_wrong_shapes(e):
    import json

    cfg = json.loads(Path(str(e.model).replace(".safetensors", ".json")).read_text())
    cfg["architecture"]["num_keypoints"] = 20
    (e.src / "tiny.json").write_text(json.dumps(cfg))
    return register(e), r"tiny\.safetensors: weights do not fit truncatedunet K=20"


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_malicious_pickle(e):
    e.marker = e.tmp / "PWNED"
    torch.save({"state_dict": {}, "args": _Exploit(e.marker)}, e.src / "evil.pth.tar")
    return (register(e, model=e.src / "evil.pth.tar"),
            r"evil\.pth\.tar: refused, the checkpoint's pickle asks for code that is not allowed "
            r"\(unsupported GLOBAL posix\.system")


def read_only_output_dir(e):
    e.out.mkdir()
    e.out.chmod(0o555)
    if os.access(e.out, os.W_OK):
        pytest.skip("running as root: directory permissions do not stop writing")
    return register(e), r"out/pairs.*: cannot (write|create)"


def output_below_a_file(e):
    (e.tmp / "afile").write_text("x")
    e.out = e.tmp / "afile" / "out"
    return register(e), r"afile/out: cannot write here \(.*Not a directory"


def disk_full(e):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    e.patch = ("keyreg.nifti_gzip.write_nifti", no_space)  # every NIfTI output goes through it
    return register(e), r"out/pairs/moving_to_fixed/affine/warped\.nii\.gz: cannot write \(.*No space left on device"


def unknown_align(e):
    return register(e, extra=["--list_of_aligns", "similarity"]), r"unknown align 'similarity'"


def unknown_metric(e):
    return register(e, extra=["--list_of_metrics", "dice"]), r"unknown metric 'dice'; use one of: mse, ncc"


def tps_lambda_not_a_number(e):
    return register(e, extra=["--list_of_aligns", "tps_x"]), r"unknown align 'tps_x'"


def tps_lambda_negative(e):
    return register(e, extra=["--list_of_aligns", "tps_-1"]), r"unknown align 'tps_-1'"


def field_stride_zero(e):
    return register(e, extra=["--field_stride", "0"]), r"the field stride must be an integer >= 1, got 0"


def metric_needs_segmentations(e):
    return register(e, extra=["--list_of_metrics", "harddice"]), r"metric 'harddice' needs the moving and the fixed segmentation"


def apply_unknown_transform_type(e):
    (e.src / "t.xyz").write_text("1 0 0 0\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t.xyz"), "-o", str(e.out / "w.nii.gz")],
            r"t\.xyz: unknown transform file type")


def apply_corrupt_itk_file(e):
    (e.src / "t.tfm").write_text("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 0 x\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t.tfm"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz")], r"t\.tfm: cannot read as an ITK transform file")


def apply_without_reference_grid(e):
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-o", str(e.out / "w.nii.gz")],
            r"does not record the fixed image's grid; pass --reference")


def apply_labels_with_linear(e):
    return (["apply", str(e.src / "moving_seg.nii.gz"), "--labels", "--interp", "linear", "-t", str(e.src / "t_matrix.txt"),
             "-r", str(e.src / "fixed.nii.gz"), "-o", str(e.out / "w.nii.gz")], r"--interp linear would blend label ids")


def apply_points_without_coordinates(e):
    (e.src / "p.csv").write_text("name,a,b\nK-1,1,2\n")
    return (["apply", str(e.src / "p.csv"), "-t", str(e.src / "t_matrix.txt"), "-o", str(e.out / "q.csv")],
            r"p\.csv: no coordinate columns")


def apply_corrupt_tps_json(e):
    (e.src / "tps.json").write_text('{"format": "keyreg-tps", "lambda": 0, "fixed_keypoints_ras": [[1, 2]]}')
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "tps.json"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz")], r"tps\.json: cannot read as a keyreg tps\.json file")


def invert_singular_matrix(e):
    (e.src / "s_matrix.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 0 0\n0 0 0 1\n")
    return ["invert", str(e.src / "s_matrix.txt")], r"s_matrix\.txt: the matrix is singular, it has no inverse"


def groupwise_one_image(e):
    return (["groupwise", str(e.src / "moving.nii.gz"), "--load_path", str(e.model), "--save_dir", str(e.out)],
            r"needs at least 2 images, got 1")


def groupwise_missing_label_map(e):
    d, s = e.src / "group", e.src / "group_seg"
    d.mkdir()
    s.mkdir()
    for n in ("a", "b"):
        _image(e, f"group/{n}.nii.gz", e.img)
    _image(e, "group_seg/a.nii.gz", (e.img > 0.5).astype(np.int16))
    return (["groupwise", str(d), "--segs", str(s), "--load_path", str(e.model), "--save_dir", str(e.out)],
            r"group_seg/b\.nii\.gz: no label map for image b\.nii\.gz")


def groupwise_bad_image(e):
    d = e.src / "group"
    d.mkdir()
    _image(e, "group/a.nii.gz", e.img)
    _image(e, "group/b.nii.gz", np.zeros(e.shape, np.float32))
    return (["groupwise", str(d), "--load_path", str(e.model), "--save_dir", str(e.out)],
            r"b\.nii\.gz: image is constant \(value 0\)")


# ------------------------------------------------------------------- headers, dtypes, values (issue 11)

def _raw_header_file(e, name, **fields):
    """A NIfTI file of the good image with raw header fields overwritten (no nibabel checks)."""
    img = nib.load(str(e.src / "moving.nii.gz"))
    hdr = img.header.copy()
    data = np.asanyarray(img.dataobj).astype(np.float32)
    block = bytearray(hdr.binaryblock)
    raw = np.frombuffer(bytes(block), dtype=hdr.structarr.dtype).copy()
    for k, v in fields.items():
        raw[k] = v
    p = e.src / name
    p.write_bytes(raw.tobytes() + b"\x00" * 4 + data.tobytes())
    return p


def header_unknown_datatype(e):
    p = _raw_header_file(e, "dtype999.nii", datatype=999, bitpix=32, vox_offset=352)
    return register(e, moving=p), r"dtype999\.nii: cannot read as NIfTI"


def header_binary_datatype(e):
    p = _raw_header_file(e, "binary.nii", datatype=1, bitpix=1, vox_offset=352)
    return register(e, moving=p), r"binary\.nii: (cannot read as NIfTI|voxels of type)"


def header_dim0_nine(e):
    hdr_dim = np.array([9, 24, 26, 22, 1, 1, 1, 1], dtype=np.int16)
    p = _raw_header_file(e, "dim9.nii", dim=hdr_dim, datatype=16, bitpix=32, vox_offset=352)
    return register(e, moving=p), r"dim9\.nii: cannot read as NIfTI"


def rgb_image(e):
    rgb = np.zeros(e.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = (e.img * 255).astype(np.uint8)
    img = nib.Nifti1Image(rgb, e.aff)
    nib.save(img, str(e.src / "rgb.nii.gz"))
    return register(e, moving=e.src / "rgb.nii.gz"), r"rgb\.nii\.gz: voxels of type .* \(RGB or structured\)"


def complex_image(e):
    nib.save(nib.Nifti1Image((e.img + 1j * e.img).astype(np.complex64), e.aff), str(e.src / "cplx.nii.gz"))
    return register(e, moving=e.src / "cplx.nii.gz"), r"cplx\.nii\.gz: complex-valued voxels are not supported"


def complex_label_map(e):
    nib.save(nib.Nifti1Image((e.img > 0.5).astype(np.complex64), e.aff), str(e.src / "cseg.nii.gz"))
    return (register(e, extra=["--moving_seg", e.src / "cseg.nii.gz", "--fixed_seg", e.src / "fixed_seg.nii.gz"]),
            r"cseg\.nii\.gz: complex-valued voxels")


def image_huge_range(e):
    bad = e.img.copy()
    bad[0, 0, 0], bad[1, 1, 1] = 3e38, -3e38
    return register(e, moving=_image(e, "huge_range.nii.gz", bad)), r"huge_range\.nii\.gz: intensity range .* too large"


def zero_pixdim(e):
    img = nib.Nifti1Image(e.img, None)
    img.header["pixdim"][1:4] = [0.0, 1.5, 1.5]
    img.header["qform_code"], img.header["sform_code"] = 1, 0
    nib.save(img, str(e.src / "pix0.nii.gz"))
    return register(e, moving=e.src / "pix0.nii.gz"), r"pix0\.nii\.gz: voxel size \(pixdim\) .* zero"


def nan_affine(e):
    row = e.aff[0].copy()
    row[0] = np.nan
    p = _raw_header_file(e, "nanaff.nii", srow_x=row, sform_code=1, qform_code=0)
    return register(e, moving=p), r"nanaff\.nii: (invalid affine|cannot read)"


def uint64_label_ids(e):
    seg = (e.img > 0.5).astype(np.uint64) * np.uint64(2**63 + 5)
    nib.save(nib.Nifti1Image(seg, e.aff, dtype=np.uint64), str(e.src / "u64.nii.gz"))
    return (register(e, extra=["--moving_seg", e.src / "u64.nii.gz", "--fixed_seg", e.src / "fixed_seg.nii.gz"]),
            r"u64\.nii\.gz: label id \d+ is larger than 2\^63 - 1")


def mgz_corrupt(e):
    (e.src / "bad.mgz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    return register(e, moving=e.src / "bad.mgz"), r"bad\.mgz: cannot read as MGH/MGZ"


def nan_model_weights(e):
    from keyreg.models import load_model, save_model

    m = load_model(e.model)
    with torch.no_grad():
        for prm in m.parameters():
            prm.fill_(float("nan"))
    w, _ = save_model(m, e.src / "nanw")
    return register(e, model=w), r"the model gives non-finite keypoints"


# ------------------------------------------------------------------------------------------ devices

def device_nonsense(e):
    return register(e, extra=["--device", "nonsense"]), r"unknown device 'nonsense'"


def device_cuda_abc(e):
    return register(e, extra=["--device", "cuda:abc"]), r"unknown device 'cuda:abc'"


def device_mps(e):
    return register(e, extra=["--device", "mps"]), r"device 'mps' is not supported"


def device_meta(e):
    return register(e, extra=["--device", "meta"]), r"device 'meta' is not supported"


def apply_device_nonsense(e):
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz"), "--device", "nonsense"], r"unknown device 'nonsense'")


def groupwise_device_meta(e):
    return (["groupwise", str(e.src / "moving.nii.gz"), str(e.src / "fixed.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--device", "meta"], r"device 'meta' is not supported")


def evaluate_device_nonsense(e):
    return (["evaluate", "--images", str(e.src), "--segs", str(e.src), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--device", "gpu9"], r"unknown device 'gpu9'")


# ------------------------------------------------------------------------------------- model files

def _model_json(e, edit):
    import json

    cfg = json.loads(Path(str(e.model).replace(".safetensors", ".json")).read_text())
    doc = edit(cfg)
    (e.src / "tiny.json").write_text(json.dumps(doc))
    return register(e)


def model_json_is_a_list(e):
    return _model_json(e, lambda c: [c]), r"tiny\.json: invalid model config \(expected a JSON object, got a list\)"


def model_json_bad_format_version(e):
    return _model_json(e, lambda c: {**c, "format_version": "one"}), r"tiny\.json: invalid model config"


def model_json_string_voxel_size(e):
    def edit(c):
        c["preprocessing"]["grid"]["voxel_size"] = "2.0"
        return c
    return _model_json(e, edit), r"tiny\.json: invalid model config \(voxel_size must be 3 positive numbers"


def model_json_nan_voxel_size(e):
    def edit(c):
        c["preprocessing"]["grid"]["voxel_size"] = [float("nan")] * 3
        return c
    return _model_json(e, edit), r"tiny\.json: invalid model config \(voxel_size must be 3 positive numbers"


def model_json_string_keypoints(e):
    def edit(c):
        c["architecture"]["num_keypoints"] = "many"
        return c
    return _model_json(e, edit), r"tiny\.json: invalid model config"


def model_json_no_architecture(e):
    return _model_json(e, lambda c: {k: v for k, v in c.items() if k != "architecture"}), r"tiny\.json: invalid model config"


def h5_not_hdf5_nor_torch(e):
    (e.src / "model.h5").write_bytes(b"this is neither hdf5 nor a torch file" * 4)
    return register(e, model=e.src / "model.h5"), r"model\.h5: not a readable PyTorch checkpoint \("


def h5_real_hdf5(e):
    (e.src / "real.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    return register(e, model=e.src / "real.h5"), r"real\.h5: not a readable PyTorch checkpoint \(an HDF5 file"


# ------------------------------------------------------------------------------------------ training

def _train(e, *extra):
    return ["train", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--save_dir", str(e.out), "--steps", "1",
            "--grid_shape", "16", "--voxel_size", "4", "--device", "cpu", "--no_progress", *map(str, extra)]


def train_lr_nan(e):
    return _train(e, "--lr", "nan"), r"--lr must be a finite number > 0, got nan"


def train_lr_negative(e):
    return _train(e, "--lr", "-1"), r"--lr must be a finite number > 0"


def train_max_rotation_nan(e):
    return _train(e, "--max_rotation", "nan"), r"--max_rotation must be a finite number in \[0, 180\]"


def pretrain_max_rotation_inf(e):
    return ["pretrain", *_train(e, "--max_rotation", "inf")[1:]], r"--max_rotation must be a finite number"


def train_voxel_size_nan(e):
    return _train(e, "--voxel_size", "nan"), r"--voxel_size must be a finite number > 0"


def train_max_displacement_nan(e):
    return _train(e, "--max_displacement", "nan"), r"--max_displacement must be a finite number >= 0"


def pretrain_control_spacing_zero(e):
    return ["pretrain", *_train(e, "--control_spacing", "0")[1:]], r"--control_spacing must be a finite number > 0"


def train_corrupt_state_json(e):
    ck = e.out / "checkpoints" / "step_000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{not json")
    (e.out / "checkpoints" / "latest").write_text("step_000001\n")
    e.keep = [ck / "state.json", e.out / "checkpoints" / "latest"]
    return _train(e, "--resume"), r"state\.json: corrupt training state"


# ------------------------------------------------------------------------------------------- outputs

def same_stem_in_a_directory(e):
    d, f = e.src / "mov_dir", e.src / "fix_dir"
    d.mkdir()
    f.mkdir()
    for n in ("a.nii", "a.nii.gz"):
        _image(e, f"mov_dir/{n}", e.img)
        _image(e, f"fix_dir/{n}", e.img)
    return register(e, moving=d, fixed=f), r"a\.nii and a\.nii\.gz have the same name 'a'"


def save_dir_locked_by_another_run(e):
    import fcntl

    e.out.mkdir()
    fh = open(e.out / ".keyreg-0.lock", "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    e.hold = fh
    e.keep = [e.out / ".keyreg-0.lock"]
    return register(e), r"out: another keyreg run is writing into this directory"


def apply_output_is_its_input(e):
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.src / "." / "moving.nii.gz")], r"moving\.nii\.gz: the output would overwrite an input")


def apply_output_is_the_transform(e):
    (e.src / "pts.csv").write_text("label,x_ras,y_ras,z_ras\nK-1,1,2,3\n")
    return (["apply", str(e.src / "pts.csv"), "-t", str(e.src / "t_matrix.txt"), "-o", str(e.src / "pts.csv")],
            r"pts\.csv: the output would overwrite an input")


# ------------------------------------------------------------------------------------ transforms, points

def _tps_doc(e, **edit):
    import json

    pts = [[-8.0, 4, 2], [7, -5, 6], [1, 9, -7], [-3, -8, -4], [0, 0, 0], [5, 5, 5]]
    doc = {"format": "keyreg-tps", "format_version": 1, "lambda": 0.0, "center_ras": [0, 0, 0], "scale_mm": 20.0,
           "fixed_keypoints_ras": pts, "moving_keypoints_ras": pts, "weights": None}
    doc.update(edit)
    (e.src / "tps.json").write_text(json.dumps(doc))
    return e.src / "tps.json"


def _apply_tps(e, t):
    return ["apply", str(e.src / "moving.nii.gz"), "-t", str(t), "-r", str(e.src / "fixed.nii.gz"), "-o", str(e.out / "w.nii.gz")]


def tps_json_nan_keypoint(e):
    pts = [[-8.0, 4, 2], [7, -5, 6], [1, 9, -7], [-3, -8, -4], [0, 0, 0], [5, 5, float("nan")]]
    return _apply_tps(e, _tps_doc(e, moving_keypoints_ras=pts)), r"tps\.json: .*moving_keypoints_ras contains NaN or Inf"


def tps_json_zero_scale(e):
    return _apply_tps(e, _tps_doc(e, scale_mm=0)), r"tps\.json: .*scale_mm must be a finite number > 0"


def tps_json_negative_lambda(e):
    return _apply_tps(e, _tps_doc(e, **{"lambda": -1})), r"tps\.json: .*lambda must be a finite number >= 0"


def tps_json_negative_weights(e):
    return _apply_tps(e, _tps_doc(e, weights=[1, 1, 1, 1, 1, -1])), r"tps\.json: .*weights must be one positive number"


def tps_json_count_mismatch(e):
    return (_apply_tps(e, _tps_doc(e, moving_keypoints_ras=[[0, 0, 0]] * 5)),
            r"tps\.json: .*differ in number \(6 and 5\)")


def invert_tps_json_nan_center(e):
    return ["invert", str(_tps_doc(e, center_ras=[0, float("nan"), 0])), "-o", str(e.out / "i.json")], \
        r"tps\.json: .*center_ras contains NaN or Inf"


def points_at_1e300(e):
    (e.src / "far.csv").write_text("label,x_ras,y_ras,z_ras\nK-1,1e300,0,0\n")
    return (["apply", str(e.src / "far.csv"), "-t", str(e.src / "t_matrix.txt"), "-o", str(e.out / "q.csv")],
            r"far\.csv: coordinates up to 1e\+300 mm are not world positions")


def points_nan(e):
    (e.src / "nanp.csv").write_text("label,x_ras,y_ras,z_ras\nK-1,nan,0,0\n")
    return (["apply", str(e.src / "nanp.csv"), "-t", str(e.src / "t_matrix.txt"), "-o", str(e.out / "q.csv")],
            r"nanp\.csv: coordinates contain NaN or Inf")


def apply_pad_value_nan(e):
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz"), "--pad_value", "nan"], r"the pad value must be a finite number")


def apply_reference_not_an_image(e):
    (e.src / "ref.txt").write_text("hello\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-r", str(e.src / "ref.txt"),
             "-o", str(e.out / "w.nii.gz")], r"ref\.txt: not a NIfTI file name")


def invert_bad_iterations(e):
    return ["invert", str(e.src / "t_matrix.txt"), "--iterations", "0"], r"--iterations must be >= 1"


def invert_no_transform(e):
    return ["invert", "-o", str(e.out / "i.txt")], r"give the transform to invert once"


def invert_transform_twice(e):
    t = str(e.src / "t_matrix.txt")
    return ["invert", t, "-t", t, "-o", str(e.out / "i.txt")], r"give the transform to invert once"


# ------------------------------------------------------------------------------------ register options

def register_pad_value_inf(e):
    return register(e, extra=["--pad_value", "inf"]), r"the pad value must be a finite number"


def register_field_stride_negative(e):
    return register(e, extra=["--field_stride", "-3"]), r"the field stride must be an integer >= 1, got -3"


def exclude_leaves_too_few_keypoints(e):
    return (register(e, extra=["--exclude_keypoints", "K-1*", "K-[2-9]"]),
            r"excluding keypoints K-1\* K-\[2-9\] leaves 0 of 12 keypoints; an affine fit needs at least 4")


def exclude_empty_pattern(e):
    return register(e, extra=["--exclude_keypoints", ""]), r"keypoint exclusion patterns must be non-empty"


def tps_lambda_nan(e):
    return register(e, extra=["--list_of_aligns", "tps_nan"]), r"unknown align 'tps_nan'"


def moving_dir_without_images(e):
    (e.src / "empty_dir").mkdir()
    (e.src / "empty_dir2").mkdir()
    return register(e, moving=e.src / "empty_dir", fixed=e.src / "empty_dir2"), r"empty_dir: no \.nii, \.nii\.gz or \.mgz"


def file_and_directory(e):
    return register(e, fixed=e.src), r"--moving is a file but --fixed is a dir"


def all_pairs_with_files(e):
    return register(e, extra=["--all_pairs"]), r"--all_pairs needs directories"


def groupwise_field_stride_zero(e):
    return (["groupwise", str(e.src / "moving.nii.gz"), str(e.src / "fixed.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--field_stride", "0"], r"the field stride must be an integer >= 1, got 0")


def groupwise_empty_list_file(e):
    (e.src / "list.txt").write_text("# nothing\n")
    return (["groupwise", str(e.src / "list.txt"), "--load_path", str(e.model), "--save_dir", str(e.out)],
            r"list\.txt: the list of images is empty")


_KIND = ["--pair_kinds", "same_subject_cross_modality"]


def evaluate_rotation_nan(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--rotations", "nan", "--device", "cpu", *_KIND], r"rotation angles must be finite")


def evaluate_axis_zero(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--axis", "0", "0", "0", "--device", "cpu", *_KIND], r"--axis must be 3 numbers, not all zero")


def evaluate_scaling_too_large(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--scaling", "1.5", "--device", "cpu", *_KIND], r"--scaling must be in \[0, 1\)")


def evaluate_label_stride_zero(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--label_stride", "0", "--device", "cpu"], r"--label_stride must be >= 1")


def evaluate_field_stride_zero(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--field_stride", "0", "--device", "cpu", *_KIND], r"field stride must be an integer >= 1")


CASES = [missing_file, unreadable_file, corrupt_gzip, truncated_data, empty_file, not_a_nifti_name, image_2d,
         image_4d_several_volumes, image_nan, image_inf, constant_image, seg_grid_mismatch, seg_affine_mismatch,
         non_integer_labels,
         labels_nan, absurd_dimensions, checkpoint_text_file, checkpoint_other_architecture, keyreg_model_wrong_shapes,
         checkpoint_malicious_pickle, read_only_output_dir, output_below_a_file, disk_full, unknown_align,
         unknown_metric, tps_lambda_not_a_number, tps_lambda_negative, field_stride_zero, metric_needs_segmentations,
         apply_unknown_transform_type, apply_corrupt_itk_file, apply_without_reference_grid, apply_labels_with_linear,
         apply_points_without_coordinates, apply_corrupt_tps_json, invert_singular_matrix, groupwise_one_image,
         groupwise_missing_label_map, groupwise_bad_image,
         # issue 11
         header_unknown_datatype, header_binary_datatype, header_dim0_nine, rgb_image, complex_image, complex_label_map,
         image_huge_range, zero_pixdim, nan_affine, uint64_label_ids, mgz_corrupt, nan_model_weights, device_nonsense,
         device_cuda_abc, device_mps, device_meta, apply_device_nonsense, groupwise_device_meta, evaluate_device_nonsense,
         model_json_is_a_list, model_json_bad_format_version, model_json_string_voxel_size, model_json_nan_voxel_size,
         model_json_string_keypoints, model_json_no_architecture, h5_not_hdf5_nor_torch, h5_real_hdf5, train_lr_nan,
         train_lr_negative, train_max_rotation_nan, pretrain_max_rotation_inf, train_voxel_size_nan,
         train_max_displacement_nan, pretrain_control_spacing_zero, train_corrupt_state_json, same_stem_in_a_directory, save_dir_locked_by_another_run,
         apply_output_is_its_input, apply_output_is_the_transform, tps_json_nan_keypoint, tps_json_zero_scale,
         tps_json_negative_lambda, tps_json_negative_weights, tps_json_count_mismatch, invert_tps_json_nan_center,
         points_at_1e300, points_nan, apply_pad_value_nan, apply_reference_not_an_image, invert_bad_iterations,
         invert_no_transform, invert_transform_twice,
         register_pad_value_inf, register_field_stride_negative, exclude_leaves_too_few_keypoints, exclude_empty_pattern,
         tps_lambda_nan, moving_dir_without_images, file_and_directory, all_pairs_with_files,
         groupwise_field_stride_zero, groupwise_empty_list_file, evaluate_rotation_nan, evaluate_axis_zero,
         evaluate_scaling_too_large, evaluate_label_stride_zero, evaluate_field_stride_zero]


# issue 12: dense refinement
def refine_unknown_stage(e):
    return register(e, extra=["--refine", "bspline"]), r"unknown refinement 'bspline': use affine or deformable"


def refine_seconds_negative(e):
    return (register(e, extra=["--refine", "deformable", "--refine_seconds", "-5"]),
            r"refinement time budget must be > 0 seconds, got -5")


def refine_iterations_negative(e):
    return (register(e, extra=["--refine", "deformable", "--refine_iterations", "10", "-1"]),
            r"refinement iterations must be non-negative integers, got \[10, -1\]")


def refine_reg_weight_nan(e):
    return (register(e, extra=["--refine", "deformable", "--refine_reg_weight", "nan"]),
            r"regularisation weight must be >= 0, got nan")


def refine_unknown_similarity(e):
    return (register(e, extra=["--refine", "affine", "--refine_similarity", "mi"]),
            r"unknown refinement similarity 'mi': use mind or lncc")


def fixed_mask_wrong_grid(e):
    mask = _image(e, "mask.nii.gz", np.ones((10, 12, 14), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    return (register(e, extra=["--refine", "affine", "--fixed_mask", mask]),
            r"mask: fixed mask grid \(10, 12, 14\) does not match its image grid \(24, 26, 22\)")


def fixed_mask_empty(e):
    mask = _image(e, "mask.nii.gz", np.zeros(e.shape, np.uint8))
    return register(e, extra=["--refine", "affine", "--fixed_mask", mask]), r"mask: the fixed mask is empty"


def fixed_mask_of_one_voxel(e):
    one = np.zeros(e.shape, np.uint8)
    one[5, 7, 9] = 1
    mask = _image(e, "mask.nii.gz", one)
    return (register(e, extra=["--refine", "deformable", "--fixed_mask", mask]),
            r"the fixed mask is too small: no voxel of it is left on the refinement's \d+ mm grid; give a larger mask")


def fixed_mask_without_refine(e):
    mask = _image(e, "mask.nii.gz", np.ones(e.shape, np.uint8))
    return register(e, extra=["--fixed_mask", mask]), r"fixed mask limits the dense refinement's similarity"


def fixed_mask_missing(e):
    return (register(e, extra=["--refine", "affine", "--fixed_mask", e.src / "nomask.nii.gz"]),
            r"nomask\.nii\.gz: --fixed_mask does not exist")


CASES += [refine_unknown_stage, refine_seconds_negative, refine_iterations_negative, refine_reg_weight_nan,
          refine_unknown_similarity, fixed_mask_wrong_grid, fixed_mask_empty, fixed_mask_of_one_voxel, fixed_mask_without_refine,
          fixed_mask_missing]


def exclude_pattern_matches_nothing(e):
    return (register(e, extra=["--exclude_keypoints", "Left-Hippocampus"]),
            r"--exclude_keypoints 'Left-Hippocampus' matches no keypoint name \(names are case-sensitive, e\.g\. 'K-1'")


def exclude_none_with_patterns(e):
    return register(e, extra=["--exclude_keypoints", "none", "K-1"]), r"none \(use every keypoint\) cannot be combined"


def input_inside_the_pair_directory(e):
    inside = e.out / "pairs" / "m_to_fixed" / "m.nii.gz"  # the pair directory is replaced as a whole
    inside.parent.mkdir(parents=True)
    inside.write_bytes((e.src / "moving.nii.gz").read_bytes())
    e.keep = [inside]
    return register(e, moving=inside), r"m\.nii\.gz: an input inside the output directory .*pairs/m_to_fixed, which is replaced"


def apply_output_is_the_reference(e):
    e.keep = []
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "t_matrix.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.src / "fixed.nii.gz")], r"fixed\.nii\.gz: the output would overwrite an input")


def invert_output_is_its_input(e):
    return (["invert", str(e.src / "t_matrix.txt"), "-o", str(e.src / "t_matrix.txt")],
            r"t_matrix\.txt: the output would overwrite an input")


def field_of_view_below_a_network_voxel(e):
    tiny = e.aff.copy()
    tiny[:3, :] *= 0.001  # a header in metres read as mm
    return (register(e, moving=_image(e, "tiny.nii.gz", e.img, tiny)),
            r"tiny: field of view .* mm is smaller than two network voxels \(8 mm\); are the voxel sizes in mm\?")


def half_resolution_of_an_anatomical_model(e):
    return (register(e, model="keyreg-anatomy", extra=["--half_resolution"]),
            r"--half_resolution is not available for the anatomical model 'keyreg-anatomy'")


def train_empty_label_map(e):
    _image(e, "empty_seg.nii.gz", np.zeros(e.shape, np.int16))
    return (["pretrain", "--label_maps", str(e.src / "empty_seg.nii.gz"), "--save_dir", str(e.out), "--steps", "1",
             "--device", "cpu", "--no_progress"], r"empty_seg\.nii\.gz: label map is empty \(all background\)")


def header_scaling_overflows_float32(e):
    img = nib.Nifti1Image((np.asarray(e.img) * 200).astype(np.uint8), e.aff)
    img.header.set_slope_inter(1e38, 0)
    nib.save(img, e.src / "slope.nii.gz")
    return register(e, moving=e.src / "slope.nii.gz"), r"slope\.nii\.gz: \d+ voxels exceed float32's range .*scl_slope"


def points_with_image_options(e):
    (e.src / "p.csv").write_text("label,x_ras,y_ras,z_ras\nA,1,2,3\n")
    return (["apply", str(e.src / "p.csv"), "-t", str(e.src / "t_matrix.txt"), "--labels", "--pad_value", "0", "-o",
             str(e.out / "q.csv")], r"--labels and --pad_value: for images and label maps, not for points")


def points_frame_contradicts_csv_space(e):
    (e.src / "p.csv").write_text("label,x_ras,y_ras,z_ras\nA,1,2,3\n")
    return (["apply", str(e.src / "p.csv"), "-t", str(e.src / "t_matrix.txt"), "--csv_space", "LPS", "-o",
             str(e.out / "q.csv")], r"p\.csv: the columns x_ras,y_ras,z_ras are RAS, not the LPS given")


def voxels_too_small_for_an_affine(e):
    tiny = e.aff.copy()
    tiny[:3, :3] = np.eye(3) * 1e-5
    return (register(e, moving=_image(e, "micro.nii.gz", e.img, tiny)),
            r"micro\.nii\.gz: voxel sizes 1e-05 x 1e-05 x 1e-05 mm are too small .*are the voxel sizes in mm\?")


def evaluate_label_map_twice(e):
    (e.src / "copy_seg.nii.gz").write_bytes((e.src / "fixed_seg.nii.gz").read_bytes())
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), str(e.src / "copy_seg.nii.gz"),
             "--load_path", str(e.model), "--save_dir", str(e.out), "--device", "cpu", *_KIND],
            r"--label_maps lists the same file twice: .*fixed_seg\.nii\.gz and .*copy_seg\.nii\.gz")


def evaluate_csv_empty_seg_path(e):
    # a spreadsheet's "CSV UTF-8": a byte-order mark and CRLF line ends
    (e.src / "d.csv").write_bytes(b"\xef\xbb\xbfimg_path,seg_path,modality\r\nfixed.nii.gz,,t1\r\n")
    return (["evaluate", "--csv", str(e.src / "d.csv"), "--load_path", str(e.model), "--save_dir", str(e.out),
             "--device", "cpu", *_KIND], r"d\.csv:2: empty seg_path")


def evaluate_translation_inf(e):
    return (["evaluate", "--label_maps", str(e.src / "fixed_seg.nii.gz"), "--load_path", str(e.model),
             "--save_dir", str(e.out), "--translation", "inf", "--device", "cpu", *_KIND],
            r"--translation must be a finite number >= 0 mm, got inf")


CASES += [evaluate_label_map_twice, evaluate_csv_empty_seg_path, evaluate_translation_inf]
CASES += [voxels_too_small_for_an_affine]
CASES += [header_scaling_overflows_float32, points_with_image_options, points_frame_contradicts_csv_space]
CASES += [exclude_pattern_matches_nothing, exclude_none_with_patterns, input_inside_the_pair_directory,
          apply_output_is_the_reference, invert_output_is_its_input, field_of_view_below_a_network_voxel,
          half_resolution_of_an_anatomical_model, train_empty_label_map]


def apply_matrix_scaled_by_1e200(e):
    (e.src / "big.txt").write_text("1e200 0 0 0\n0 1e200 0 0\n0 0 1e200 0\n0 0 0 1\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "big.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz")], r"big\.txt: the matrix scales lengths by 1e\+200 to 1e\+200")


def apply_singular_matrix_to_an_image(e):
    (e.src / "flat.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 0 0\n0 0 0 1\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "flat.txt"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz")], r"flat\.txt: the matrix is singular")


def apply_matrix_in_metres(e):
    (e.src / "m.tfm").write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                                 "Parameters: 0.001 0 0 0 0.001 0 0 0 0.001 0 0 0\nFixedParameters: 0 0 0\n")
    (e.src / "p.csv").write_text("label,x_ras,y_ras,z_ras\nA,1,2,3\n")
    return (["apply", str(e.src / "p.csv"), "-t", str(e.src / "m.tfm"), "-o", str(e.out / "q.csv")],
            r"m\.tfm: the matrix scales lengths by 0\.001 to 0\.001")


def apply_lta_translating_200_metres(e):
    (e.src / "far.lta").write_text("type      = 1 # LINEAR_RAS_TO_RAS\nnxforms   = 1\nmean      = 0 0 0\nsigma     = 1\n"
                                   "1 4 4\n1 0 0 2e5\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    return (["apply", str(e.src / "moving.nii.gz"), "-t", str(e.src / "far.lta"), "-r", str(e.src / "fixed.nii.gz"),
             "-o", str(e.out / "w.nii.gz")], r"far\.lta: LTA: the matrix translates by 2e\+05 mm")


def field_stride_1000(e):
    return register(e, extra=["--field_stride", "1000"]), r"the field stride must be at most 8 voxels, got 1000"


CASES += [field_stride_1000]
CASES += [apply_matrix_scaled_by_1e200, apply_singular_matrix_to_an_image, apply_matrix_in_metres,
          apply_lta_translating_200_metres]


def _outputs(e) -> list[Path]:
    """Files anywhere that a failed command may have left: the output directory, temporaries, inverses
    (minus the files a case placed there itself, ``e.keep``)."""
    keep = set(getattr(e, "keep", []))
    found = [p for p in e.out.rglob("*") if p.is_file() and p not in keep] if e.out.is_dir() else []
    found += [p for p in e.tmp.rglob("*") if (".tmp" in p.name or "_inverse" in p.name) and p not in keep]
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_one_line_nonzero_no_partial_files(case, env, capsys, monkeypatch):
    argv, pattern = case(env)
    if getattr(env, "patch", None):
        monkeypatch.setattr(*env.patch)
    capsys.readouterr()
    try:
        rc = main(argv)
    finally:
        if env.out.is_dir():
            env.out.chmod(0o755)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]  # a removed progress bar leaves blanks
    assert rc != 0
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    command = argv[0]
    assert lines[0].startswith(f"keyreg {command}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert _outputs(env) == [], "partial output files were left behind"
    if getattr(env, "hold", None):
        env.hold.close()
    if hasattr(env, "marker"):
        assert not env.marker.exists(), "the malicious pickle ran code"


if __name__ == "__main__":  # print the table of cases and their messages (for the closing note)
    import io
    import sys
    import tempfile
    from contextlib import redirect_stderr

    class _Skip(Exception):
        pass

    pytest.skip = lambda msg: (_ for _ in ()).throw(_Skip(msg))  # type: ignore[assignment]
    counts = {"cases": 0, "skipped": 0, "exit 2": 0, "tracebacks": 0, "not one line": 0, "wrong message": 0,
              "partial files": 0}
    print("| case | exit | message |\n|---|---|---|")
    for case in CASES:
        counts["cases"] += 1
        with tempfile.TemporaryDirectory() as d:
            e = env.__wrapped__(Path(d))  # type: ignore[attr-defined]
            try:
                argv, pattern = case(e)
            except _Skip as s:
                print(f"| {case.__name__} | (skipped: {s}) |")
                counts["skipped"] += 1
                continue
            buf, restore = io.StringIO(), None
            if getattr(e, "patch", None):
                import importlib
                mod_name, attr = e.patch[0].rsplit(".", 1)
                mod = importlib.import_module(mod_name)
                restore = (mod, attr, getattr(mod, attr))
                setattr(mod, attr, e.patch[1])
            with redirect_stderr(buf):
                try:
                    rc = main(argv)
                except BaseException:  # noqa: BLE001 - counted, never expected
                    import traceback
                    buf.write("Traceback (most recent call last):\n" + traceback.format_exc())
                    rc = -1
            if restore:
                setattr(*restore)
            if getattr(e, "hold", None):
                e.hold.close()
            if e.out.is_dir():
                e.out.chmod(0o755)
            err = buf.getvalue()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            counts["exit 2"] += rc == 2
            counts["tracebacks"] += "Traceback" in err
            counts["not one line"] += len(lines) != 1
            counts["wrong message"] += not (lines and re.search(pattern, lines[0]))
            counts["partial files"] += bool(_outputs(e))
            msg = err.strip().replace(d, "…").replace("|", "\\|")
            print(f"| {case.__name__} | {rc} | `{msg}` |")
            sys.stdout.flush()
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()))
