"""Training robustness: bad save directories, locks, resumes (log, process count, fresh runs), checkpoint
pruning, option checks and the training scripts' own checks.  Tiny CPU runs (16^3 grid, 2 levels)."""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _cfg, _write_map

from keyreg.cli import main
from keyreg.errors import CheckpointError, ConfigError, OutputError
from keyreg.train.trainer import RESUMABLE_CHANGES, TrainConfig, _prune_checkpoints, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    return [str(_write_map(d / f"map_{i}.nii.gz", i)) for i in range(3)]


def _steps(log: Path) -> list[int]:
    with open(log, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def _cli(maps, save_dir, *extra, cmd="train"):
    return [cmd, "--label_maps", *maps[:2], "--num_levels", "2", "--num_truncated", "1", "--f_maps", "4",
            "--grid_shape", "16", "--voxel_size", "3", "--steps", "1", "--batch_size", "1", "--no_progress",
            "--device", "cpu", "--save_dir", str(save_dir), *extra]


# -- 1, 5: the save directory ----------------------------------------------------------------------------------

def test_save_dir_that_is_a_file_is_refused_before_the_maps_are_read(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    missing = [str(tmp_path / "none.nii.gz")]  # never read: the save_dir is checked first
    for bad in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(OutputError, match="is a file, not a directory"):
            train(_cfg(missing * 2, bad), progress=False)
    assert main(_cli(missing * 2, tmp_path / "f" / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keyreg train: error: --save_dir")


def test_save_dir_locked_by_another_run(maps, tmp_path):
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".keyreg-0.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="another keyreg run"):
            train(_cfg(maps, tmp_path / "run"), progress=False)


def test_fresh_run_into_a_run_refused_resume_without_checkpoint_refused(maps, tmp_path):
    run = tmp_path / "run"
    train(_cfg(maps, run, steps=1), progress=False)
    assert not (run / ".keyreg-0.lock").exists()  # the lock is released
    with pytest.raises(OutputError, match=r"holds a run \(checkpoints/latest\); use --resume"):
        train(_cfg(maps, run, steps=1), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_cfg(maps, tmp_path / "empty"), resume=True, progress=False)


# -- 2, 3, 4, 12: resume and checkpoints -----------------------------------------------------------------------

def test_resume_cuts_the_log_back_to_the_checkpoint(maps, tmp_path):
    run = tmp_path / "run"
    train(_cfg(maps, run, steps=2), progress=False)
    with open(run / "log.csv", "a") as fh:  # a killed run logged steps past its last checkpoint
        fh.write("3,0.5,tps,1.0,\n4,0.5,tps,1.0,\n")
    train(_cfg(maps, run, steps=3), resume=True, progress=False)
    assert _steps(run / "log.csv") == [1, 2, 3]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left


def test_resume_with_another_number_of_processes_refused(maps, tmp_path):
    run = tmp_path / "run"
    train(_cfg(maps, run, steps=1), progress=False)
    state = run / "checkpoints" / "step_0000001" / "state.json"
    doc = json.loads(state.read_text())
    state.write_text(json.dumps(dict(doc, world_size=2)))
    missing = [str(tmp_path / "gone.nii.gz")] * 3  # paths may change on resume; never read: refused first
    with pytest.raises(CheckpointError, match="saved with 2 processes; resume with the same number"):
        train(_cfg(missing, run, steps=2), resume=True, progress=False)


def test_keep_checkpoints_prunes_the_oldest(maps, tmp_path):
    assert "keep_checkpoints" in RESUMABLE_CHANGES
    train(_cfg(maps, tmp_path / "k2", steps=4, keep_checkpoints=2), progress=False)
    ckpt = tmp_path / "k2" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000003", "step_0000004"]
    train(_cfg(maps, tmp_path / "all", steps=3, keep_checkpoints=0), progress=False)
    assert len(list((tmp_path / "all" / "checkpoints").glob("step_*"))) == 3
    # the checkpoint `latest` names is never removed, even when it is not among the newest
    root = tmp_path / "manual"
    for n in (1, 2, 3, 4):
        (root / f"step_{n:07d}").mkdir(parents=True)
    _prune_checkpoints(root, 1, "step_0000002")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000004"]
    with pytest.raises(ConfigError, match="--keep_checkpoints"):
        _cfg(maps, tmp_path, keep_checkpoints=-1).validate()


def test_max_minutes_stop_saves_a_checkpoint_without_checkpoint_every(maps, tmp_path):
    run = tmp_path / "run"
    train(_cfg(maps, run, steps=3, checkpoint_every=0, max_minutes=0), progress=False)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    train(_cfg(maps, run, steps=3, checkpoint_every=0), resume=True, progress=False)
    assert _steps(run / "log.csv") == [1, 2, 3]


# -- 8, 9, 10: option checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, flag", [
    (dict(num_val_pairs=0), "--num_val_pairs"), (dict(num_val_pairs=-2), "--num_val_pairs"),
    (dict(full_sphere_prob=1.5), "--full_sphere_prob"), (dict(full_sphere_prob=-0.1), "--full_sphere_prob"),
    (dict(max_translation=-1.0), "--max_translation"), (dict(max_translation=501.0), "--max_translation"),
    (dict(dense_coeff=-1.0), "--dense_coeff"), (dict(max_train_keypoints=0), "--max_train_keypoints"),
    (dict(val_every=-1), "--val_every"), (dict(checkpoint_every=-1), "--checkpoint_every"),
    (dict(lr=2.0), "--lr"), (dict(f_maps=0), "--f_maps"), (dict(f_maps=3, num_levels=4), "--f_maps 3"),
    (dict(grid_shape=16, num_levels=5), "--grid_shape 16 does not fit --num_levels 5"),
    (dict(grid_shape=20, num_levels=4), "multiple of 8"), (dict(grid_shape=4, num_levels=2), "--grid_shape"),
    (dict(backbone="conv", grid_shape=16), "does not fit the conv backbone"),
    (dict(num_keypoints=0), "num_keypoints"),
    (dict(device="banana"), "unknown device 'banana'"),
])
def test_absurd_values_refused(maps, tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")):
        _cfg(maps, tmp_path, **kw).validate()


def test_defaults_and_a_loaded_models_architecture_pass(maps, tmp_path):
    TrainConfig(label_maps=maps).validate()  # 64^3, 4 levels
    _cfg(maps, tmp_path, load_path="x.safetensors", grid_shape=20, num_levels=4).validate()  # not used


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(maps, tmp_path, capsys):
    assert main(_cli(maps, tmp_path / "run", "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is available" in err[0]
    assert not (tmp_path / "run").exists()


# -- 7, 11, 13: the command line ---------------------------------------------------------------------------------

def test_architecture_flags_with_load_path_refused(maps, tmp_path, capsys):
    argv = ["train", "--label_maps", *maps[:2], "--load_path", str(tmp_path / "m.safetensors"), "--grid_shape", "32",
            "--name", "x", "--weighted_kp_align", "--save_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["keyreg train: error: --load_path sets the architecture; drop --name, --grid_shape, "
                   "--weighted_kp_align"]


@pytest.mark.parametrize("extra, flags", [(["--val_every", "5"], "--val_every"),
                                          (["--num_val_pairs", "2"], "--num_val_pairs"),
                                          (["--val_label_maps", "x.nii.gz"], "--val_label_maps")])
def test_pretrain_refuses_validation_flags(maps, tmp_path, capsys, extra, flags):
    assert main(_cli(maps, tmp_path / "p", *extra, cmd="pretrain")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keyreg pretrain: error: pretrain does not validate; drop " + flags)


def test_validation_logged_once_and_model_line_on_rank_0_only(maps, tmp_path, capsys, monkeypatch):
    train(_cfg(maps, tmp_path / "v", steps=2, val_every=2), progress=False)
    with open(tmp_path / "v" / "log.csv", newline="") as fh:
        extra = json.loads(list(csv.DictReader(fh))[-1]["extra"])
    assert "val" not in extra and "val_dice_affine" in extra
    import keyreg.distributed

    monkeypatch.setattr(keyreg.distributed, "distributed_env", lambda: (1, 2, 1))  # the CLI's view only
    assert main(_cli(maps, tmp_path / "r1", "--val_every", "0", "--num_keypoints", "8",
                     "--kp_align_method", "affine")) == 0
    assert "model written to" not in capsys.readouterr().out


# -- 6, 14, 15: scripts ------------------------------------------------------------------------------------------

def test_train_default_skips_finished_stages_and_resumes_the_unfinished_one(tmp_path):
    """A stub ``keyreg`` records its calls and writes the stage's model."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "keyreg"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'while [[ $# -gt 0 ]]; do [[ "$1" == --save_dir ]] && d=$2; shift; done\n'
                    'mkdir -p "$d" && touch "$d/model.safetensors"\n')
    stub.chmod(0o755)
    save, calls = tmp_path / "anat", tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls))
    cmd = ["bash", str(ROOT / "scripts" / "train_default.sh"), str(tmp_path / "maps"), "10", str(save)]
    subprocess.run(cmd, env=env, check=True)
    assert len(calls.read_text().splitlines()) == 9  # stages 1-7, 9 and 12
    calls.unlink()
    subprocess.run(cmd, env=env, check=True)
    assert not calls.exists()  # every stage finished: nothing retrained
    (save / "stage6" / "model.safetensors").unlink()  # stage 6 interrupted with checkpoints
    (save / "stage6" / "checkpoints").mkdir()
    (save / "stage6" / "checkpoints" / "latest").write_text("step_0000025\n")
    subprocess.run(cmd, env=dict(env, RESUME="1"), check=True)
    (line,) = calls.read_text().splitlines()
    assert "stage6" in line and line.endswith("--resume")


def test_install_model_refuses_bad_names_and_missing_files(tmp_path, monkeypatch):
    from keyreg.models.checkpoint import PRETRAINED_DIR

    inst = _load_script("install_model")
    before = sorted(PRETRAINED_DIR.iterdir())

    def refused(*argv: str) -> str:  # SystemExit(message): one line on stderr, exit status 1
        monkeypatch.setattr(sys, "argv", ["install_model.py", "--steps", "1", "--images", "1", "--wall", "x", *argv])
        with pytest.raises(SystemExit) as e:
            inst.main()
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        return e.value.code

    for name in ("../escaped", ".hidden", "a/b", ""):
        assert "must be a plain file stem" in refused(str(tmp_path / "m.safetensors"), "--name", name)
    assert "m.safetensors: model weights file does not exist" in refused(str(tmp_path / "m.safetensors"))
    msg = refused(str(tmp_path / "m.safetensors"), "--regions_stats", str(tmp_path / "s.json"))
    assert "--regions_stats" in msg and "does not exist" in msg  # checked before the model is read
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert "m.json is missing" in refused(str(tmp_path / "m.safetensors"))  # an unreadable model: one line too
    assert sorted(PRETRAINED_DIR.iterdir()) == before


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_install_model_describes_the_models_network():
    from keyreg.models import load_model

    config = load_model("keyreg-anatomy").config
    assert _load_script("install_model").describe_network(config) == "truncated U-Net, 64^3 at 4 mm"


def test_calibrate_aligned_resolves_bundled_names_and_checks_options(tmp_path):
    from keyreg.models.checkpoint import PRETRAINED_DIR

    cal = _load_script("calibrate_aligned")
    assert cal.model_json("keyreg-anatomy") == PRETRAINED_DIR / "keyreg-anatomy.json"
    assert cal.model_json(str(tmp_path / "m.safetensors")) == tmp_path / "m.json"
    with pytest.raises(SystemExit, match="--write needs a keyreg model"):
        cal.model_json(str(tmp_path / "m.pth"))
    (tmp_path / "training_seg_01.nii.gz").write_bytes(b"")
    common = ["no-such-model", "--labelmaps", str(tmp_path)]  # refused before the model is loaded
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        cal.main([*common, "--maps", "1", "--threads", "0"])
    with pytest.raises(SystemExit, match="--maps 2 99: no training_seg_NN"):
        cal.main([*common, "--maps", "1", "2", "99"])
