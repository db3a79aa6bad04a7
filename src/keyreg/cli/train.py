"""``keyreg train`` / ``keyreg pretrain``: flags mirror the official ``run.py``; runs under ``torchrun`` too."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the trainer (and torch.distributed) is imported only when a training command runs
    from ..train.trainer import TrainConfig


def add_arguments(p: argparse.ArgumentParser, *, mode: str = "train") -> None:
    """Training flags; defaults (None here) come from :class:`~keyreg.train.trainer.TrainConfig`."""
    d = p.add_argument_group("data")
    d.add_argument("--label_maps", nargs="+", default=[], metavar="PATH",
                   help="label maps (files or directories) to synthesise training images from")
    d.add_argument("--val_label_maps", nargs="+", default=None, metavar="PATH",
                   help="held-out label maps for validation (default: the training maps)")
    d.add_argument("--data_dir", help="real images: ROOT/<modality>/<name>.nii.gz (+ ROOT/<modality>_seg/) "
                                      "or a CSV with img_path, seg_path, modality, train columns")
    d.add_argument("--save_dir", default=f"./runs/{mode}", help="checkpoints, log.csv and the final model")

    m = p.add_argument_group("model")
    m.add_argument("--name", default=None, help="model name recorded in its config")
    m.add_argument("--backbone", choices=["conv", "unet", "truncatedunet"], default=None)
    m.add_argument("--num_keypoints", type=int, default=None)
    m.add_argument("--num_levels", type=int, default=None)
    m.add_argument("--num_truncated", type=int, default=None)
    m.add_argument("--f_maps", type=int, default=None)
    m.add_argument("--grid_shape", type=int, default=None, help="network input voxels per axis")
    m.add_argument("--voxel_size", type=float, default=None, help="network input voxel size (mm)")
    m.add_argument("--load_path", help="start from this model (keyreg or official checkpoint)")

    o = p.add_argument_group("objective")
    if mode == "train":
        o.add_argument("--kp_align_method", "--transform_type", dest="kp_align_method",
                       choices=["rigid", "affine", "tps", "mixed"], default=None)
        o.add_argument("--tps_lmbda", default=None,
                       help="a number, or uniform | lognormal | loguniform (sampled per step)")
        o.add_argument("--loss_fn", choices=["dice", "mse"], default=None)
        o.add_argument("--kpconsistency_coeff", type=float, default=None,
                       help="weight of the keypoint-consistency term: mean squared distance between the keypoints "
                            "of one anatomy in two contrasts, divided by (half the network field of view)^2 "
                            "(0 = off; ~100 makes a 10 mm disagreement cost about as much as the Dice loss)")
        o.add_argument("--max_train_keypoints", type=int, help="random subset of keypoints per TPS fit")
        o.add_argument("--weighted_kp_align", action="store_true", default=None, help="power-weighted fits")
    o.add_argument("--mix_modalities", action=argparse.BooleanOptionalAction, default=None,
                   help="fixed and moving get different contrasts")
    o.add_argument("--max_rotation", type=float, default=None,
                   help="degrees of random rotation (180 = any orientation)")
    o.add_argument("--max_translation", type=float, default=None,
                   help="mm of random translation per axis")
    o.add_argument("--full_sphere_prob", type=float, default=None,
                   help="share of images rotated over the whole sphere regardless of --max_rotation")
    o.add_argument("--max_displacement", type=float, default=None,
                   help="amplitude (mm) of the random nonlinear deformation")
    o.add_argument("--control_spacing", type=float, default=None,
                   help="mm between the control points of the random nonlinear deformation (default 32; larger: "
                        "smoother, lobe-sized shape changes)")
    o.add_argument("--mirror_maps", action=argparse.BooleanOptionalAction, default=None,
                   help="also train on the left-right mirror image of every label map (left and right "
                        "structures swapped): twice the subjects")
    o.add_argument("--brain_motion", type=float, default=None,
                   help="share of training images whose brain is also moved within the head (rotation up to "
                        "4 degrees, translation up to 3 mm, scaling up to 5 %%), so that the network places the "
                        "brain by its own anatomy rather than by the skull (label maps only)")
    o.add_argument("--fov_cut", type=float, default=None,
                   help="share of training images whose field of view ends within the head (a plane or a slab "
                        "cuts the image to 0, as a scan that misses part of the head; targets stay the true "
                        "positions), so that partial fields of view are read")
    if mode == "pretrain":
        o.add_argument("--regions", help="regions JSON (scripts/build_regions output) defining the anatomical "
                                         "keypoints (default: built from the training label maps)")
        o.add_argument("--dense_coeff", type=float, default=None,
                       help="weight of the term pulling each heatmap towards its region's mask")

    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", "--train_num_steps", dest="steps", type=int, default=None)
    t.add_argument("--stop_at", type=int, default=None,
                   help="stop after this step; the learning-rate schedule still spans --steps (a shortened run "
                        "of a longer schedule, resumable)")
    t.add_argument("--max_minutes", type=float, default=None,
                   help="stop after the step that ends past this many minutes of wall time, saving a checkpoint "
                        "and the model (resumable with --resume: the schedule still spans --steps)")
    t.add_argument("--batch_size", type=int, default=None, help="pairs per step and process")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--lr_schedule", choices=["constant", "cosine"], default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--use_amp", action="store_true", help="bf16 autocast on GPU")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU under torchrun, else best)")
    t.add_argument("--checkpoint_every", type=int, default=None, help="steps between checkpoints (0: none, "
                   "except where --max_minutes or --stop_at ends the run)")
    t.add_argument("--keep_checkpoints", type=int, default=None,
                   help="newest checkpoints kept in save_dir/checkpoints (default 5; 0 keeps all)")
    t.add_argument("--val_every", type=int, default=None)
    t.add_argument("--num_val_pairs", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue from save_dir/checkpoints/latest")
    if mode == "train":
        t.add_argument("--eval", action="store_true", help="only validate --load_path and print the table")
    t.add_argument("--use_wandb", action="store_true", help="log to Weights & Biases (pip install wandb)")
    t.add_argument("--no_progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, mode: str) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (flags not given keep the config's defaults)."""
    from ..train.trainer import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["mode"] = mode
    return TrainConfig(**values)


#: flags that define a new network; a loaded model (--load_path) brings its own
ARCHITECTURE_FLAGS = ("name", "backbone", "num_keypoints", "num_levels", "num_truncated", "f_maps", "grid_shape",
                      "voxel_size", "weighted_kp_align")


def check_flags(args: argparse.Namespace, mode: str) -> None:
    """:class:`~keyreg.errors.ConfigError` for flags that would be silently ignored."""
    from ..errors import ConfigError

    if mode == "pretrain" and args.num_keypoints is not None:
        raise ConfigError("pretrain: the regions set the number of keypoints (one per region); --num_keypoints "
                          "does not apply (--regions chooses the regions)")
    if mode == "pretrain":
        given = [f"--{k}" for k in ("val_label_maps", "num_val_pairs") if getattr(args, k) is not None]
        given += ["--val_every"] if args.val_every else []  # 0 (no validation) is what pretrain does
        if given:
            raise ConfigError(f"pretrain does not validate; drop {', '.join(given)} (keyreg train --eval "
                              "--load_path validates a model)")
    if args.load_path:
        given = [f"--{k}" for k in ARCHITECTURE_FLAGS if getattr(args, k, None) is not None]
        if given:
            raise ConfigError(f"--load_path sets the architecture; drop {', '.join(given)}")


def run(args: argparse.Namespace, mode: str = "train") -> int:
    from pathlib import Path

    from ..distributed import distributed_env
    from ..train.trainer import Trainer, train

    check_flags(args, mode)
    cfg = config_from_args(args, mode)
    if getattr(args, "eval", False):
        if not cfg.load_path:
            from ..errors import ConfigError

            raise ConfigError("--eval needs --load_path")
        scores = Trainer(cfg).validate()
        print("| align | mean Dice |\n|---|---|")
        for k, v in scores.items():
            print(f"| {k} | {v:.3f} |")
        return 0
    last = train(cfg, resume=args.resume, progress=not args.no_progress)
    model = Path(cfg.save_dir) / "model.safetensors"
    if model.exists() and distributed_env()[0] == 0:  # under torchrun: once
        print(f"model written to {model} (+ .json); last step: " +
              ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in last.items() if k != "val"))
    return 0
