"""Training: tiny CPU smoke runs of pretrain and train, exact resume, and 2-process DDP (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from keyreg.cli import main
from keyreg.errors import ConfigError
from keyreg.models.checkpoint import load_model
from keyreg.train.trainer import TrainConfig, Trainer, sample_lambda, train


def _write_map(path: Path, shift: int) -> Path:
    lab = np.zeros((40, 36, 32), np.int16)
    lab[4:36, 4:32, 4:28] = 502
    lab[7:33, 7:29, 6:26] = 24
    lab[9:31 - shift, 9:27, 8:24] = 3
    lab[9:20, 11:25, 10:22] = 2
    lab[20:31 - shift, 11:25, 10:22] = 41
    lab[14:18 + shift, 15:20, 14:18] = 4
    aff = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -16], [0, -1.0, 0, 18], [0, 0, 0, 1]])  # LIA-like
    nib.save(nib.Nifti1Image(lab, aff), path)
    return path


@pytest.fixture(scope="module")
def label_maps(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    return [str(_write_map(d / f"map_{i}.nii.gz", i)) for i in range(3)]


def _cfg(maps, save_dir, **kw):
    base = dict(label_maps=list(maps[:2]), val_label_maps=list(maps[2:]), save_dir=str(save_dir), num_keypoints=8,
                num_levels=2, num_truncated=1, f_maps=4, grid_shape=16, voxel_size=3.0, steps=2, batch_size=1,
                checkpoint_every=1, val_every=0, num_val_pairs=1, max_displacement=2.0)
    base.update(kw)
    return TrainConfig(**base)


def test_sample_lambda_specs():
    g = torch.Generator().manual_seed(0)
    assert sample_lambda("0.5", g) == 0.5
    draws = [sample_lambda("loguniform", g) for _ in range(200)]
    assert min(draws) == 0.0 and 0 < max(draws) <= 10
    assert all(0 <= sample_lambda("uniform", g) <= 10 for _ in range(20))
    with pytest.raises(ConfigError, match="tps_lmbda"):
        sample_lambda("often", g)
    with pytest.raises(ConfigError, match=">= 0"):
        sample_lambda("-1", g)


def test_pretrain_reduces_keypoint_error(label_maps, tmp_path):
    cfg = _cfg(label_maps, tmp_path, mode="pretrain", steps=30, lr=3e-3, max_rotation=20, checkpoint_every=0)
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(99)
    probe = [trainer.pairs.sample(1, g) for _ in range(4)]

    def probe_loss():
        with torch.no_grad():
            return float(sum(trainer.loss(b)[0] for b in probe))

    before = probe_loss()
    trainer.fit(progress=False)
    assert probe_loss() < before
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.json").exists()
    # a new anatomical model searches orientations and averages the search's check view by default
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["orientation_search"] == "always" and saved["check_view_ensemble"] is True


@pytest.mark.parametrize("kw", [dict(kp_align_method="tps", loss_fn="dice", kpconsistency_coeff=0.1),
                                dict(kp_align_method="affine", loss_fn="mse", mix_modalities=False),
                                dict(kp_align_method="rigid", max_train_keypoints=6, weighted_kp_align=True)])
def test_train_step_and_validation(label_maps, tmp_path, kw):
    cfg = _cfg(label_maps, tmp_path, val_every=2, **kw)
    last = train(cfg, progress=False)
    assert np.isfinite(last["loss"])
    assert set(last["val"]) == {"none", "rigid", "affine", "tps_0", "tps_10"}
    assert all(0 <= v <= 1 for v in last["val"].values())
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 3


def test_resume_continues_exactly(label_maps, tmp_path):
    straight = _cfg(label_maps, tmp_path / "a", steps=4)
    train(straight, progress=False)
    first = _cfg(label_maps, tmp_path / "b", steps=2)
    train(first, progress=False)
    ckpt = tmp_path / "b" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert not list(ckpt.glob(".tmp*"))
    second = _cfg(label_maps, tmp_path / "b", steps=4)
    train(second, resume=True, progress=False)
    a = load_model(tmp_path / "a" / "model.safetensors").state_dict()
    b = load_model(tmp_path / "b" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _stop_then_resume_equals_straight(label_maps, tmp_path, steps: int, stopped_at: int, **stop) -> None:
    """A cosine run of ``steps`` ended early by ``stop`` (at ``stopped_at``, with a checkpoint and the model
    saved there), then resumed, ends with exactly the weights of the straight run."""
    train(_cfg(label_maps, tmp_path / "a", steps=steps, lr_schedule="cosine"), progress=False)
    train(_cfg(label_maps, tmp_path / "b", steps=steps, lr_schedule="cosine", **stop), progress=False)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    assert (tmp_path / "b" / "model.safetensors").exists()
    train(_cfg(label_maps, tmp_path / "b", steps=steps, lr_schedule="cosine"), resume=True, progress=False)
    a = load_model(tmp_path / "a" / "model.safetensors").state_dict()
    b = load_model(tmp_path / "b" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_at_shortens_a_run_of_the_same_schedule(label_maps, tmp_path):
    # a cosine schedule over 4 steps, stopped at 2 and resumed, is the straight 4-step run; --stop_at is checked
    _stop_then_resume_equals_straight(label_maps, tmp_path, 4, 2, stop_at=2)
    with pytest.raises(ConfigError, match="--stop_at"):
        _cfg(label_maps, tmp_path / "c", steps=4, stop_at=5).validate()


def test_max_minutes_stops_cleanly_and_resumes_the_same_schedule(label_maps, tmp_path):
    # a budget of 0 minutes ends the run after its first step, with a checkpoint and the model there; resuming
    # without a budget finishes the 3-step cosine schedule exactly as a straight run does
    _stop_then_resume_equals_straight(label_maps, tmp_path, 3, 1, max_minutes=0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="--max_minutes"):
            _cfg(label_maps, tmp_path / "c", max_minutes=bad).validate()


def test_cli_train_and_pretrain(label_maps, tmp_path, capsys):
    common = ["--label_maps", *label_maps[:2], "--num_levels", "2", "--num_truncated", "1",
              "--f_maps", "4", "--grid_shape", "16", "--voxel_size", "3", "--steps", "1", "--batch_size", "1", "--no_progress",
              "--val_every", "0"]
    assert main(["pretrain", *common, "--save_dir", str(tmp_path / "p")]) == 0
    assert main(["pretrain", *common, "--num_keypoints", "8", "--save_dir", str(tmp_path / "p8")]) == 2
    assert "--num_keypoints does not apply" in capsys.readouterr().err  # the regions set K
    loaded = ["--label_maps", *label_maps[:2], "--steps", "1", "--batch_size", "1", "--no_progress", "--val_every", "0"]
    assert main(["train", *loaded, "--save_dir", str(tmp_path / "t"), "--load_path",  # the model brings its architecture
                 str(tmp_path / "p" / "model.safetensors"), "--transform_type", "tps", "--tps_lmbda", "lognormal"]) == 0
    assert "model written to" in capsys.readouterr().out
    assert main(["train", *common, "--save_dir", str(tmp_path / "x"), "--tps_lmbda", "sometimes"]) == 2
    assert "error: --tps_lmbda must be" in capsys.readouterr().err
    assert main(["train", "--save_dir", str(tmp_path / "y"), "--steps", "1"]) == 2
    assert "no training data" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(label_maps, tmp_path):
    try:
        port = _free_port()
    except OSError as e:  # pragma: no cover
        pytest.skip(f"cannot open a local port for the gloo rendezvous: {e}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "keyreg.cli", "train", "--label_maps", *label_maps[:2],
           "--num_keypoints", "8", "--num_levels", "2", "--num_truncated", "1", "--f_maps", "4", "--grid_shape", "16",
           "--voxel_size", "3", "--steps", "2", "--batch_size", "1", "--checkpoint_every", "1", "--val_every", "0", "--no_progress",
           "--save_dir", str(tmp_path / "ddp"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[:3000] + "\n...\n" + out.stderr[-2000:]  # the failing rank speaks first
    from safetensors.torch import load_file

    rng = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000002" / "rng.safetensors"))
    assert {"generator_rank0", "generator_rank1"} <= set(rng)
    assert not torch.equal(rng["generator_rank0"], rng["generator_rank1"])  # ranks draw different pairs
    assert (tmp_path / "ddp" / "model.safetensors").exists()


def test_train_on_real_images_directory_layout(label_maps, tmp_path):
    """ROOT/<modality>/<name>.nii.gz + ROOT/<modality>_seg/<name>.nii.gz, as in the official run.py."""
    rng = np.random.default_rng(0)
    for modality, scale in (("T1", 1.0), ("T2", -1.0)):
        (tmp_path / "data" / modality).mkdir(parents=True)
        (tmp_path / "data" / f"{modality}_seg").mkdir(parents=True)
        for k, path in enumerate(label_maps):
            img = nib.load(path)
            lab = np.asarray(img.dataobj)
            vals = np.where(lab > 0, 100 + scale * 20 * (lab % 7), 0) + rng.normal(0, 1, lab.shape)
            nib.save(nib.Nifti1Image(vals.astype(np.float32), img.affine), tmp_path / "data" / modality / f"s{k}.nii.gz")
            nib.save(img, tmp_path / "data" / f"{modality}_seg" / f"s{k}.nii.gz")
    cfg = _cfg([], tmp_path / "run", label_maps=[], data_dir=str(tmp_path / "data"), val_every=2, steps=2)
    last = train(cfg, progress=False)
    assert np.isfinite(last["loss"]) and set(last["val"]) >= {"none", "affine"}
    pre = _cfg([], tmp_path / "pre", label_maps=[], data_dir=str(tmp_path / "data"), mode="pretrain")
    with pytest.raises(ConfigError, match="anatomical keypoints from label maps"):
        train(pre, progress=False)
    with pytest.raises(ConfigError, match="either --label_maps or --data_dir"):
        _cfg(label_maps, tmp_path / "x", data_dir=str(tmp_path / "data")).validate()


def test_pair_csv_uses_only_the_listed_pairs(label_maps, tmp_path):
    from keyreg.train.data import ImagePairs, read_image_table
    from keyreg.preprocess import GridSpec

    rows = ["fixed_img_path,moving_img_path,fixed_seg_path,moving_seg_path,train"]
    for f, m, t in ((0, 1, 1), (1, 2, 1), (2, 0, 0)):
        rows.append(f"{label_maps[f]},{label_maps[m]},{label_maps[f]},{label_maps[m]},{t}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    train_rows = read_image_table(tmp_path / "pairs.csv")
    assert len(train_rows) == 3 and [r["moving_partners"] for r in train_rows] == [[1], [2], []]
    held_out = read_image_table(tmp_path / "pairs.csv", train=False)
    assert len(held_out) == 2 and held_out[0]["moving_partners"] == [1]
    # label maps stand in for images here: only the pairing is under test
    pairs = ImagePairs(train_rows, GridSpec("ras", (12, 12, 12), (4.0, 4.0, 4.0)))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        b = pairs.sample(1, g)
        seen.add((b.fixed_index[0], b.moving_index[0]))
    assert seen == {(0, 1), (1, 2)}


def _write_two_hemisphere_map(path: Path, shift: int) -> Path:
    """A head with left (world x < 0) and right cerebral cortex, white matter and ventricle."""
    lab = np.zeros((40, 36, 32), np.int16)
    lab[4:36, 4:32, 4:28] = 502
    lab[7:33, 7:29, 6:26] = 24
    lab[20:31 - shift, 9:27, 8:24], lab[20:28 - shift, 11:25, 10:22], lab[21:25, 15:20 + shift, 14:18] = 3, 2, 4
    lab[9:20, 9:27, 8:24], lab[12 + shift:20, 11:25, 10:22], lab[15:19, 15:20, 14:18] = 42, 41, 43
    aff = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -16], [0, -1.0, 0, 18], [0, 0, 0, 1]])  # LIA-like: x = 20 - i
    nib.save(nib.Nifti1Image(lab, aff), path)
    return path


def test_mirror_maps_add_the_left_right_mirror_of_every_map(tmp_path):
    from keyreg.train.data import LabelMapBank, mirror_label_map

    maps = [str(_write_two_hemisphere_map(tmp_path / f"map_{i}.nii.gz", i)) for i in range(3)]
    plain = LabelMapBank([Path(p) for p in maps[:2]], storage_shape=24)
    both = LabelMapBank([Path(p) for p in maps[:2]], storage_shape=24, mirror=True)
    assert (len(plain), len(both), both.num_sources) == (2, 4, 2) and both.ids == plain.ids
    orig, mirrored = both.maps[1], both.maps[3]
    assert torch.equal(both.affines[3], both.affines[1]) and both.affines[1][0, 0] > 0  # axis 0 is world x
    # x reversed, left and right cerebral ids swapped (2 <-> 41, 3 <-> 42, 4 <-> 43); the rest kept
    swap = {2: 41, 41: 2, 3: 42, 42: 3, 4: 43, 43: 4}
    expect = orig.flip(0).clone()
    for a, b in swap.items():
        expect[orig.flip(0) == a] = b
    assert torch.equal(mirrored, expect) and not torch.equal(mirrored, orig)
    assert torch.equal(mirror_label_map(mirrored), orig)
    # a mirrored subject's left white matter lies where the original's right one does, reflected
    x = torch.arange(24, dtype=torch.float64)[:, None, None]
    centre_x = lambda lab, i: float((x * (lab == i)).sum() / (lab == i).sum())  # noqa: E731
    assert centre_x(mirrored, 2) == pytest.approx(23 - centre_x(orig, 41))
    # the regions of a new model come from the maps read, never from their mirror images
    cfg = _cfg(maps, tmp_path / "m", mode="pretrain", num_keypoints=None, steps=1, mirror_maps=True)
    trainer = Trainer(cfg)
    assert len(trainer.bank) == 4 and len(trainer.bank.region_maps) == 4
    ref = Trainer(_cfg(maps, tmp_path / "ref", mode="pretrain", num_keypoints=None, steps=1))
    assert trainer.model.config.regions.names == ref.model.config.regions.names
    np.testing.assert_array_equal(trainer.model.config.regions.template, ref.model.config.regions.template)
    with pytest.raises(ConfigError, match="mirror_maps"):
        TrainConfig(data_dir=str(tmp_path), mirror_maps=True).validate()


def test_brain_motion_moves_the_brain_within_the_head(tmp_path):
    from keyreg.train.data import LabelMapBank
    from keyreg.train.synth import SpatialAugment, brain_weight, random_brain_motion, warp_labels_on_grid

    path = _write_two_hemisphere_map(tmp_path / "map.nii.gz", 0)
    bank = LabelMapBank([path], storage_voxel=1.0, storage_shape=48)
    lab, aff = bank.maps[0], bank.affines[0]
    w = brain_weight(lab, 1.0, falloff_mm=4.0)
    brain = torch.isin(lab, torch.tensor([2, 3, 4, 41, 42, 43]))
    assert bool((w[brain] == 1).all()) and bool((w[~brain] < 1).all()) and float(w.min()) == 0
    assert 0 < float(w[lab == 502].max()) < 1 and float(w[lab == 502].min()) == 0
    eye = torch.eye(4, dtype=torch.float64)[None]
    plain = warp_labels_on_grid(lab[None, None], aff, lab.shape, aff, eye)
    assert torch.equal(warp_labels_on_grid(lab[None, None], aff, lab.shape, aff, eye, None, (w, eye)), plain)
    # a weight of 1 everywhere composes the motion with the matrix exactly
    shift = eye.clone()
    shift[0, :3, 3] = torch.tensor([0.0, 2.0, -1.0])
    ones = torch.ones_like(w)
    assert torch.equal(warp_labels_on_grid(lab[None, None], aff, lab.shape, aff, eye, None, (ones, shift)),
                       warp_labels_on_grid(lab[None, None], aff, lab.shape, aff, shift))
    # the brain moves rigidly (content at y comes from motion(y)), the scalp 4 mm away stays put
    shift[0, :3, 3] = torch.tensor([0.0, 1.0, -1.0])
    moved = warp_labels_on_grid(lab[None, None], aff, lab.shape, aff, eye, None, (w, shift))[0, 0]
    vox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in lab.shape], indexing="ij"), -1)
    world = vox @ aff[:3, :3].T.double() + aff[:3, 3].double()
    centre = lambda m, ids: world[torch.isin(m, torch.tensor(ids))].mean(0)  # noqa: E731
    for ids in ([2, 41], [3, 42], [4, 43]):
        assert int(torch.isin(moved, torch.tensor(ids)).sum()) == int(torch.isin(lab, torch.tensor(ids)).sum())
        torch.testing.assert_close(centre(moved, ids) - centre(lab, ids), -shift[0, :3, 3], atol=1e-9, rtol=0)
    outer = w == 0
    assert torch.equal(moved[outer], lab[outer]) and bool((lab[outer] == 502).any())
    # the random motions: small, about the brain's centre, the identity with probability 1 - p
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    spec = SpatialAugment(brain_motion_prob=1.0, brain_rotation=4.0, brain_translation=3.0, brain_scale=0.05)
    mats = random_brain_motion(64, g, c, spec)
    sv = torch.linalg.svdvals(mats[:, :3, :3])
    assert bool((sv.max(1).values / sv.min(1).values - 1).abs().max() < 1e-9)  # isotropic: rotation x scale
    assert bool(((sv[:, 0] - 1).abs() <= 0.05 + 1e-9).all()) and bool((sv[:, 0] != 1).all())
    rot = mats[:, :3, :3] / sv[:, :1, None]
    angle = torch.rad2deg(torch.arccos(((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(angle.max()) <= 4.0 + 1e-6 and float(angle.max()) > 1.0
    assert bool(((mats[:, :3, :3] @ c + mats[:, :3, 3] - c).abs() <= 3.0 + 1e-9).all())
    none = random_brain_motion(8, g, c, SpatialAugment(brain_motion_prob=0.0))
    assert torch.equal(none, torch.eye(4, dtype=torch.float64).expand(8, 4, 4))
    # the flag: a probability, label maps only; a pretraining step runs with it
    with pytest.raises(ConfigError, match="brain_motion"):
        TrainConfig(label_maps=[str(path)], brain_motion=1.5).validate()
    with pytest.raises(ConfigError, match="brain_motion"):
        TrainConfig(data_dir=str(tmp_path), brain_motion=0.5).validate()
    maps = [str(_write_two_hemisphere_map(tmp_path / f"m_{i}.nii.gz", i)) for i in range(3)]
    trainer = Trainer(_cfg(maps, tmp_path / "run", mode="pretrain", num_keypoints=None, steps=1, brain_motion=1.0))
    assert len(trainer.pairs.brains) == 2 and trainer.pairs.spatial.brain_motion_prob == 1.0
    batch = trainer.pairs.sample(2, torch.Generator().manual_seed(0))
    assert batch.fixed_regions is not None and int(batch.fixed_regions.max()) > 0


def test_control_spacing_sets_how_smooth_the_deformation_is(tmp_path):
    """``--control_spacing``: the spacing of the deformation's control points reaches the sampler, and a
    wider spacing at the same amplitude is a smoother field (smaller voxel-to-voxel changes)."""
    from keyreg.train.synth import SpatialAugment, random_smooth_field

    def roughness(spacing: float) -> float:
        g = torch.Generator().manual_seed(3)
        f = random_smooth_field(16, (32, 32, 32), 4.0, g, SpatialAugment(max_displacement=8.0, control_spacing=spacing))
        return float((f[..., 1:] - f[..., :-1]).abs().mean() / f.abs().mean())

    assert roughness(64.0) < 0.6 * roughness(32.0)
    maps = [str(_write_two_hemisphere_map(tmp_path / f"m_{i}.nii.gz", i)) for i in range(3)]
    trainer = Trainer(_cfg(maps, tmp_path / "run", mode="pretrain", num_keypoints=None, steps=1, control_spacing=64.0))
    assert trainer.pairs.spatial.control_spacing == 64.0
    with pytest.raises(ConfigError, match="control_spacing"):
        TrainConfig(label_maps=maps, control_spacing=0.0).validate()


def test_resume_refuses_changed_options_and_damaged_checkpoints(label_maps, tmp_path):
    from keyreg.errors import CheckpointError

    train(_cfg(label_maps, tmp_path / "b", steps=2, lr_schedule="cosine"), progress=False)
    with pytest.raises(CheckpointError, match=r"differ from the checkpoint's run: --lr 0\.5 \(the run: "):
        train(_cfg(label_maps, tmp_path / "b", steps=2, lr_schedule="cosine", lr=0.5), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"--steps 4 \(the run: 2\)"):  # a cosine schedule spans --steps
        train(_cfg(label_maps, tmp_path / "b", steps=4, lr_schedule="cosine"), resume=True, progress=False)
    latest = tmp_path / "b" / "checkpoints" / (tmp_path / "b" / "checkpoints" / "latest").read_text().strip()
    (latest / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
        train(_cfg(label_maps, tmp_path / "b", steps=2, lr_schedule="cosine"), resume=True, progress=False)
