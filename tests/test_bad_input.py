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
    return register(e, moving=_image(e, "nan.nii.gz", bad)), r"nan\.nii\.gz: 1 voxels are NaN or Inf"


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

    e.patch = ("nibabel.save", no_space)
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


CASES = [missing_file, unreadable_file, corrupt_gzip, truncated_data, empty_file, not_a_nifti_name, image_2d,
         image_4d_several_volumes, image_nan, image_inf, constant_image, seg_grid_mismatch, non_integer_labels,
         labels_nan, absurd_dimensions, checkpoint_text_file, checkpoint_other_architecture, keyreg_model_wrong_shapes,
         checkpoint_malicious_pickle, read_only_output_dir, output_below_a_file, disk_full, unknown_align,
         unknown_metric, tps_lambda_not_a_number, tps_lambda_negative, field_stride_zero, metric_needs_segmentations,
         apply_unknown_transform_type, apply_corrupt_itk_file, apply_without_reference_grid, apply_labels_with_linear,
         apply_points_without_coordinates, apply_corrupt_tps_json, invert_singular_matrix, groupwise_one_image,
         groupwise_missing_label_map, groupwise_bad_image]


def _outputs(e) -> list[Path]:
    """Files anywhere that a failed command may have left: the output directory, temporaries, inverses."""
    found = [p for p in e.out.rglob("*") if p.is_file()] if e.out.is_dir() else []
    found += [p for p in e.tmp.rglob("*") if ".tmp" in p.name or "_inverse" in p.name]
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
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            e = env.__wrapped__(Path(d))  # type: ignore[attr-defined]
            try:
                argv, _ = case(e)
            except _Skip as s:
                print(f"| {case.__name__} | (skipped: {s}) |")
                continue
            buf, restore = io.StringIO(), None
            if getattr(e, "patch", None):
                import importlib
                mod_name, attr = e.patch[0].rsplit(".", 1)
                mod = importlib.import_module(mod_name)
                restore = (mod, attr, getattr(mod, attr))
                setattr(mod, attr, e.patch[1])
            with redirect_stderr(buf):
                rc = main(argv)
            if restore:
                setattr(*restore)
            msg = buf.getvalue().strip().replace(d, "…")
            print(f"| {case.__name__} | {rc} | `{msg}` |")
            sys.stdout.flush()
