"""Streaming per align (issue 13): ``keyreg register`` warps, measures and writes one align at a time
and drops its arrays before the next; the outputs are those of the whole-registration path, and a
failure or an interrupt at any align leaves no partial pair directory."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from keyreg.batch import json_clean
from keyreg.cli import main
from keyreg.metrics import before_metrics
from keyreg.pipeline import Registrar
from test_cli_register import data  # noqa: F401  (fixture: two directories of oblique test images)

ALIGNS = ["rigid", "affine", "tps_0", "tps_1"]
METRICS = ["mse", "ncc", "harddice", "hausd", "jdstd", "jdlessthan0"]


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _same_files(a: Path, b: Path, skip: set[str] = frozenset()) -> int:
    fa = {k: v for k, v in _files(a).items() if k not in skip}
    fb = {k: v for k, v in _files(b).items() if k not in skip}
    assert fa.keys() == fb.keys()
    for rel, p in fa.items():
        if rel.endswith(".nii.gz"):  # the voxels and the header, not the gzip framing
            x, y = nib.load(str(p)), nib.load(str(fb[rel]))
            assert np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)), rel
            assert x.get_data_dtype() == y.get_data_dtype() and np.array_equal(x.affine, y.affine), rel
        assert p.read_bytes() == fb[rel].read_bytes(), rel
    return len(fa)


def _register_args(data, model, out, *extra, pair="a"):
    return ["register", "--moving", str(data / f"mov/{pair}.nii.gz"), "--fixed", str(data / f"fix/{pair}.nii.gz"),
            "--moving_seg", str(data / f"mov_seg/{pair}.nii.gz"), "--fixed_seg", str(data / f"fix_seg/{pair}.nii.gz"),
            "--load_path", str(model), "--list_of_aligns", *ALIGNS, "--list_of_metrics", *METRICS,
            "--save_eval_to_disk", "--save_dir", str(out), "--device", "cpu", *extra]


def test_streamed_outputs_equal_the_whole_registration_path(data, tiny_model_files, tmp_path):  # noqa: F811
    out = tmp_path / "streamed"
    assert main(_register_args(data, tiny_model_files, out, "--visualize")) == 0
    streamed = out / "pairs" / "a"

    # the same pair through the non-streamed API: every align warped, then measured, then saved
    reg_ = Registrar(str(tiny_model_files), device="cpu", aligns=ALIGNS)
    reg = reg_.register(data / "mov/a.nii.gz", data / "fix/a.nii.gz", moving_seg=data / "mov_seg/a.nii.gz",
                        fixed_seg=data / "fix_seg/a.nii.gz")
    assert all(r.warped is not None and r.warped_seg is not None for r in reg)
    whole = reg_.measure(reg, METRICS)
    reg_.save(reg, tmp_path / "whole", visualize=True)

    n = _same_files(streamed, tmp_path / "whole", skip={"done.json", "thumbnail.png"})
    assert n > 40
    rows = json.loads((streamed / "done.json").read_text())["rows"]
    assert [r["align"] for r in rows] == ["none", *ALIGNS]
    before = reg_.measure_before(reg, before_metrics(METRICS))  # not hausd nor the Jacobian statistics
    assert set(before) >= {"mse", "harddice"} and not set(before) & {"hausd", "jdstd", "jdlessthan0"}
    assert rows[0] == {**rows[0], **json_clean(before)}
    for r in rows[1:]:
        assert {k: r[k] for k in json_clean(whole[r["align"]])} == json_clean(whole[r["align"]])


def test_a_batch_streams_into_the_same_files_as_a_single_pair(data, tiny_model_files, tmp_path):  # noqa: F811
    single = tmp_path / "single"
    assert main(_register_args(data, tiny_model_files, single, pair="b")) == 0
    batch = tmp_path / "batch"
    assert main(["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--moving_seg",
                 str(data / "mov_seg"), "--fixed_seg", str(data / "fix_seg"), "--load_path", str(tiny_model_files),
                 "--list_of_aligns", *ALIGNS, "--list_of_metrics", *METRICS, "--save_eval_to_disk",
                 "--save_dir", str(batch), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (batch / "pairs").iterdir()) == ["a", "b"]
    assert _same_files(single / "pairs" / "b", batch / "pairs" / "b", skip={"done.json"}) > 30


def test_one_align_is_held_at_a_time(data, tiny_model_files, tmp_path, monkeypatch):  # noqa: F811
    real = Registrar.warp
    held: list[list[str]] = []

    def spy(self, reg, *, image=True, seg=True, aligns=None):
        held.append([r.name for r in reg if r.warped is not None or r.warped_seg is not None
                     or getattr(r, "_dense", None) is not None])
        return real(self, reg, image=image, seg=seg, aligns=aligns)

    monkeypatch.setattr(Registrar, "warp", spy)
    assert main(_register_args(data, tiny_model_files, tmp_path / "out")) == 0
    assert held == [[], [], [], []]  # when an align is warped, no other align's arrays are alive


def _fail_at_the_first_tps(monkeypatch, error: BaseException, pair: str | None = None) -> None:
    """Warping the first TPS align (the 3rd of ALIGNS, after rigid and affine were written) raises
    ``error`` (for the pair whose fixed image is named ``pair``, or any)."""
    from keyreg import pipeline
    from keyreg.transforms import AffineTransform

    real = pipeline.warp_volumes

    def warp_volumes(image, seg, reference, transform, **kw):
        if not isinstance(transform, AffineTransform) and pair in (None, reference.name):
            raise error
        return real(image, seg, reference, transform, **kw)

    monkeypatch.setattr(pipeline, "warp_volumes", warp_volumes)


def _no_leftovers(out: Path, complete: list[str]) -> None:
    pairs = out / "pairs"
    names = sorted(p.name for p in pairs.iterdir()) if pairs.exists() else []
    assert names == complete, names  # no partial directory, no hidden temporary
    for name in complete:
        assert (pairs / name / "done.json").is_file()


def test_a_failure_at_a_later_align_of_a_single_pair_leaves_nothing(data, tiny_model_files, tmp_path, monkeypatch,
                                                                    capsys):  # noqa: F811
    from keyreg.errors import ShapeError

    _fail_at_the_first_tps(monkeypatch, ShapeError("the field does not fit"))  # computing the 3rd align
    out = tmp_path / "out"
    assert main(_register_args(data, tiny_model_files, out)) == 2
    err = capsys.readouterr().err
    assert "error: the field does not fit" in err and "Traceback" not in err
    _no_leftovers(out, [])


def test_a_write_failure_at_a_later_align_of_a_single_pair_leaves_nothing(data, tiny_model_files, tmp_path,
                                                                          monkeypatch, capsys):  # noqa: F811
    import keyreg.export as export

    real = export.save_alignment

    def failing_save(res, directory, **kw):
        if res.name == "tps_0":  # rigid and affine are written by now
            raise OSError(28, "No space left on device")
        return real(res, directory, **kw)

    monkeypatch.setattr(export, "save_alignment", failing_save)
    out = tmp_path / "out"
    assert main(_register_args(data, tiny_model_files, out)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "No space left on device" in err and "Traceback" not in err
    assert str(out / "pairs" / "a") in err  # named by its final path, not the temporary one
    _no_leftovers(out, [])


def test_a_failure_at_a_later_align_in_a_batch_fails_that_pair_only(data, tiny_model_files, tmp_path, monkeypatch,
                                                                    capsys):  # noqa: F811
    _fail_at_the_first_tps(monkeypatch, RuntimeError("boom"), pair="b")
    out = tmp_path / "out"
    assert main(["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--moving_seg",
                 str(data / "mov_seg"), "--fixed_seg", str(data / "fix_seg"), "--load_path", str(tiny_model_files),
                 "--list_of_aligns", *ALIGNS, "--list_of_metrics", "harddice", "--save_eval_to_disk",
                 "--save_dir", str(out), "--device", "cpu"]) == 1
    assert "FAILED b:" in capsys.readouterr().err
    _no_leftovers(out, ["a"])
    assert [f["pair"] for f in json.loads((out / "metrics.json").read_text())["failures"]] == ["b"]


def test_an_interrupt_at_a_later_align_in_a_batch_leaves_no_temporary(data, tiny_model_files, tmp_path,
                                                                     monkeypatch):  # noqa: F811
    _fail_at_the_first_tps(monkeypatch, KeyboardInterrupt(), pair="b")
    out = tmp_path / "out"
    assert main(["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--moving_seg",
                 str(data / "mov_seg"), "--fixed_seg", str(data / "fix_seg"), "--load_path", str(tiny_model_files),
                 "--list_of_aligns", *ALIGNS, "--list_of_metrics", "harddice", "--save_eval_to_disk",
                 "--save_dir", str(out), "--device", "cpu"]) == 130
    _no_leftovers(out, ["a"])
    assert not (out / "metrics.csv").exists()
