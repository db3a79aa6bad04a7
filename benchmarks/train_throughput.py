"""Training throughput (images/s) of one `keyreg pretrain` configuration on this machine.

Runs a few warm-up steps, then times ``--steps`` optimisation steps (synthesis + network + loss +
backward + Adam) and prints images/s and the share of each stage. Run it against two checkouts to
compare (``PYTHONPATH=<checkout>/src``); ``--legacy`` uses only options the older trainer knows.

    python benchmarks/train_throughput.py --maps ../shared/data/labelmaps --steps 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maps", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/labelmaps"))
    p.add_argument("--num_maps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=2, help="pairs per step (2 images each)")
    p.add_argument("--legacy", action="store_true", help="the previous default config (K=64, 64^3 at 3.5 mm)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from keyreg.train.trainer import TrainConfig, Trainer

    maps = [str(Path(args.maps) / f"training_seg_{i:02d}.nii.gz") for i in range(1, args.num_maps + 1)]
    common = dict(mode="pretrain", label_maps=maps, backbone="truncatedunet", num_levels=4, num_truncated=2,
                  f_maps=16, grid_shape=64, batch_size=args.batch_size, lr=1e-3, save_dir="/tmp/keyreg_throughput",
                  checkpoint_every=0)
    if args.legacy:
        cfg = TrainConfig(num_keypoints=64, voxel_size=3.5, **common)
    else:
        cfg = TrainConfig(num_keypoints=181, voxel_size=4.0, max_rotation=30, full_sphere_prob=0.5,
                          max_translation=20, max_displacement=2.0, **common)
    tr = Trainer(cfg)
    stages = {"sample": 0.0, "forward+loss": 0.0, "backward+step": 0.0}
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        batch = tr.pairs.sample(cfg.batch_size, tr.gen)
        t1 = time.perf_counter()
        loss, _ = tr.loss(batch)
        t2 = time.perf_counter()
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
        t3 = time.perf_counter()
        if step >= 2:  # warm-up excluded
            stages["sample"] += t1 - t0
            stages["forward+loss"] += t2 - t1
            stages["backward+step"] += t3 - t2
    total = sum(stages.values())
    images = 2 * cfg.batch_size * args.steps
    print(f"{'legacy' if args.legacy else 'current'}: K={tr.model.num_keypoints}, {images} images in {total:.1f} s "
          f"= {images / total:.2f} images/s; " + ", ".join(f"{k} {v / total:.0%}" for k, v in stages.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
