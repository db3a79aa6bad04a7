"""Batch runs of ``keyreg register``: resuming with --skip_existing, determinism, torchrun sharding."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keyreg.cli import main
from test_cli_register import data  # noqa: F401  (fixture: two directories of oblique test images)


def _args(data, model, out, *extra):
    return ["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--all_pairs",
            "--load_path", str(model), "--list_of_aligns", "affine", "--save_dir", str(out), "--device", "cpu",
            *map(str, extra)]


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_skip_existing_resumes_an_interrupted_batch(data, tiny_model_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    import keyreg.export as export
    from keyreg.io import nifti_stem
    from keyreg.pipeline import Registrar

    out = tmp_path / "out"
    args = _args(data, tiny_model_files, out, "--save_eval_to_disk", "--skip_existing")
    real_save = export.save_alignment
    saved: list[Path] = []

    def interrupted_save(res, directory, **kw):  # the 3rd pair is interrupted half-way through its files
        saved.append(directory)
        files = real_save(res, directory, **kw)
        if len(saved) == 3:
            raise KeyboardInterrupt
        return files

    monkeypatch.setattr(export, "save_alignment", interrupted_save)
    assert main(args) == 130
    pairs = out / "pairs"
    done = sorted(p.parent.name for p in pairs.glob("*/done.json"))
    assert done == ["a", "a_to_b"]
    assert sorted(p.name for p in pairs.iterdir()) == ["a", "a_to_b"], "the interrupted pair left files behind"
    assert not (out / "metrics.csv").exists()
    # a hard kill of an older run may leave an incomplete directory and a stale temporary one
    (pairs / "b" / "affine").mkdir(parents=True)
    (pairs / "b" / "affine" / "warped.nii.gz").write_bytes(b"half written")
    (pairs / ".b_to_a.x1y2.tmp").mkdir()
    mtime = (pairs / "a" / "done.json").stat().st_mtime_ns

    monkeypatch.setattr(export, "save_alignment", real_save)
    real_register = Registrar.register
    redone: list[str] = []

    def counting_register(self, moving, fixed, **kw):
        redone.append(f"{nifti_stem(moving)}->{nifti_stem(fixed)}")
        return real_register(self, moving, fixed, **kw)

    monkeypatch.setattr(Registrar, "register", counting_register)
    capsys.readouterr()
    assert main(args) == 0
    assert "2 pair(s) were already complete and skipped" in capsys.readouterr().err
    assert sorted(redone) == ["b->a", "b->b"]  # only the unfinished pairs (b_to_a, b) are computed
    assert (pairs / "a" / "done.json").stat().st_mtime_ns == mtime
    assert sorted(p.parent.name for p in pairs.glob("*/done.json")) == ["a", "a_to_b", "b", "b_to_a"]
    assert nib.load(str(pairs / "b" / "affine" / "warped.nii.gz")).shape == (28, 32, 24)
    resumed = _table(out / "metrics.csv")
    assert [r["pair"] for r in resumed] == ["a", "a_to_b", "b_to_a", "b"]

    # the resumed table equals an uninterrupted run's
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(Registrar, "register", real_register)
    assert main(_args(data, tiny_model_files, fresh, "--save_eval_to_disk")) == 0
    assert _table(fresh / "metrics.csv") == resumed

    # other options: nothing is reused
    redone.clear()
    monkeypatch.setattr(Registrar, "register", counting_register)
    assert main([*args, "--list_of_metrics", "mse", "ncc"]) == 0
    assert len(redone) == 4


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_inputs_give_bit_identical_outputs_on_cpu(data, tiny_model_files, tmp_path):  # noqa: F811
    runs = []
    for name in ("run1", "run2"):
        out = tmp_path / name
        assert main(["register", "--moving", str(data / "mov/a.nii.gz"), "--fixed", str(data / "fix/b.nii.gz"),
                     "--moving_seg", str(data / "mov_seg/a.nii.gz"), "--fixed_seg", str(data / "fix_seg/b.nii.gz"),
                     "--load_path", str(tiny_model_files), "--list_of_aligns", "rigid", "affine", "tps_0", "tps_1",
                     "--list_of_metrics", "mse", "ncc", "harddice", "jdstd", "--save_eval_to_disk",
                     "--save_dir", str(out), "--device", "cpu"]) == 0
        runs.append(_files(out))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 30
    arrays = 0
    for rel, p1 in runs[0].items():
        p2 = runs[1][rel]
        if rel.endswith(".nii.gz"):
            a, b = nib.load(str(p1)), nib.load(str(p2))
            assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), rel
            assert np.array_equal(a.affine, b.affine) and a.get_data_dtype() == b.get_data_dtype(), rel
            arrays += 1
        else:  # transforms, keypoints, tps.json, metrics: byte for byte
            assert p1.read_bytes() == p2.read_bytes(), rel
    assert arrays >= 10


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    except OSError as e:
        pytest.skip(f"cannot open a local TCP port for torch.distributed ({e})")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_shard_and_merge(data, tiny_model_files, tmp_path):  # noqa: F811
    """``torchrun --nproc_per_node 2 -m keyreg.cli register ...``: 2 CPU processes, gloo, pairs[rank::2]."""
    port = _free_port()
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "keyreg.cli",
           *_args(data, tiny_model_files, out, "--save_eval_to_disk")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish in 600 s")
    if proc.returncode != 0 and ("Address already in use" in proc.stderr or "EADDRINUSE" in proc.stderr):
        pytest.skip(f"the rendezvous port {port} was taken")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank registered its own shard of the 4 pairs (pairs[rank::2])
    assert "[rank 0/2] 2 of 4 pair(s)" in proc.stderr and "[rank 1/2] 2 of 4 pair(s)" in proc.stderr
    assert "[rank 0/2] a (" in proc.stderr and "[rank 1/2] a_to_b (" in proc.stderr
    assert proc.stdout.count("| affine | 4 |") == 1  # only rank 0 prints the merged summary
    merged = _table(out / "metrics.csv")
    assert [r["pair"] for r in merged if r["align"] == "affine"] == ["a", "a_to_b", "b_to_a", "b"]
    assert sorted(p.parent.name for p in (out / "pairs").glob("*/done.json")) == ["a", "a_to_b", "b", "b_to_a"]
    # the same numbers as one process
    single = tmp_path / "single"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): CPU convolutions differ in the last bits otherwise
    try:
        assert main(_args(data, tiny_model_files, single)) == 0
    finally:
        torch.set_num_threads(threads)
    for r1, r2 in zip(merged, _table(single / "metrics.csv"), strict=True):
        assert r1 == r2  # bit-identical: keypoints do not depend on which rank or batch processed an image
    assert json.loads((out / "metrics.json").read_text())["failures"] == []


def test_one_torchrun_environment_reader(monkeypatch):
    from keyreg import batch, distributed
    from keyreg.errors import ConfigError
    from keyreg.train import trainer

    assert batch.distributed_env is distributed.distributed_env
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.distributed_env() == (0, 1, 0) == trainer._distributed()
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert trainer._distributed() == (0, 1, 3)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="must be integers"):
        trainer._distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="invalid RANK=2"):
        trainer._distributed()


def test_skip_existing_reuses_pairs_of_a_run_without_it(data, tiny_model_files, tmp_path, capsys):  # noqa: F811
    """Every run that writes pair directories records the model, so a later --skip_existing run reuses them."""
    out = tmp_path / "out"
    assert main(_args(data, tiny_model_files, out, "--save_eval_to_disk")) == 0
    done = json.loads(next((out / "pairs").glob("*/done.json")).read_text())
    assert len(done["config"]["model"]) == 64  # the model's SHA-256
    capsys.readouterr()
    assert main(_args(data, tiny_model_files, out, "--save_eval_to_disk", "--skip_existing")) == 0
    assert "were already complete and skipped" in capsys.readouterr().err


def test_a_broken_link_fails_its_pair_only(data, tiny_model_files, tmp_path, capsys):  # noqa: F811
    (data / "mov" / "c.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (data / "fix" / "c.nii.gz").write_bytes((data / "fix" / "a.nii.gz").read_bytes())
    out = tmp_path / "out"
    rc = main(["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--load_path",
               str(tiny_model_files), "--list_of_aligns", "affine", "--save_dir", str(out), "--device", "cpu"])
    assert rc == 1
    assert "c.nii.gz: broken symbolic link" in capsys.readouterr().err
    assert [r["pair"] for r in json.loads((out / "metrics.json").read_text())["results"]] == ["a", "b"]
