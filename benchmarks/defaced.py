"""Keypoints of defaced scans: the face zeroed, as public datasets release them.

Protocol: held-out label maps 13-15 at 2 mm, T1/T2/PD/FLAIR-like (seeded), upright and turned by
``--rotations`` degrees; each image read as it is and defaced: every voxel outside the brain (label
0 or an extra-cerebral id >= 500) that lies more than ``--anterior`` mm in front of the brain's
centroid and below it is set to 0 (the anterior-inferior block that defacing tools remove: face,
nose, jaw). Per image: the median keypoint error over the keypoints used in fits and over all
keypoints (mm, against the true centroids of the whole head), the template residual and drift of
the reading (``keyreg.qc``'s flag facts), and whether the flags would fire.  Then the registrations
13->14, 14->15, 15->13 (fixed: the upright whole T1-like image; moving: each other upright contrast,
whole or defaced): the affine's Dice over brain structures 2-60 (as ``keyreg evaluate``).

Usage:
    python benchmarks/defaced.py [--model keyreg-anatomy] [--rotations 0 90]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from model_validation import (anatomical_model, brain_dice, fit, fit_mask, fit_scale, label_maps_2mm, rotation, seed_of,
                              synth, warp_seg)

from keyreg.geometry import fov_center
from keyreg.io import Volume
from keyreg.models.inference import detect_image_keypoints
from keyreg.qc import detection_concerns


def face_mask(seg: np.ndarray, affine: np.ndarray, anterior_mm: float) -> np.ndarray:
    """Voxels outside the brain, more than ``anterior_mm`` anterior to the brain's centroid and
    inferior to it (world RAS of ``affine``)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in seg.shape], indexing="ij"), -1).reshape(-1, 3)
    world = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*seg.shape, 3)
    brain = (seg > 0) & (seg < 500)
    centre = world[brain].mean(0)
    return ~brain & (world[..., 1] > centre[1] + anterior_mm) & (world[..., 2] < centre[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--contrasts", nargs="+", default=["t1", "t2", "pd", "flair"])
    p.add_argument("--rotations", nargs="+", type=float, default=[0.0, 90.0])
    p.add_argument("--anterior", type=float, default=20.0, help="mm in front of the brain's centroid")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = anatomical_model(args.model)
    atlas = model.config.regions
    in_fits = fit_mask(model)
    bank = label_maps_2mm(args.maps)
    rows = []
    points = {}  # (map, contrast, rotation, case) -> detected keypoints (world mm)
    for n, number in enumerate(args.maps):
        seg, aff = bank.maps[n].numpy().astype(np.int64), bank.affines[n].numpy()
        face = face_mask(seg, aff, args.anterior)
        for contrast in args.contrasts:
            image = synth(bank.maps[n], contrast, seed_of(args.seed, number, contrast))
            for degrees in args.rotations:
                pert = rotation(seed_of(args.seed, number, degrees), degrees, fov_center(aff, seg.shape))
                true = atlas.centroids(seg, pert @ aff)[0]
                for case, data in (("whole", image), ("defaced", np.where(face, 0.0, image))):
                    det = detect_image_keypoints(model, Volume(data.astype(np.float32), pert @ aff, name=case))
                    points[number, contrast, degrees, case] = det.points.numpy()
                    err = np.linalg.norm(det.points.numpy() - true, axis=1)
                    facts = {"detection_residual_mm": float(np.median(det.template_residual_mm)),
                             "detection_drift_mm": det.drift_mm}
                    row = {"map": number, "contrast": contrast, "rotation": degrees, "case": case,
                           "fit": float(np.nanmedian(err[in_fits])), "all": float(np.nanmedian(err)),
                           **facts, "flagged": bool(detection_concerns(facts)), "searched": bool(det.searched)}
                    rows.append(row)
                    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
    print(f"\n(face: {int(face.sum())} voxels of the last map, {args.anterior:g} mm in front of the brain's centroid)")
    print("\n| case | images | kp error in fits (median) | worst image | kp error, all | residual | drift | "
          "flagged | searched |")
    print("|---" * 9 + "|")
    for case in ("whole", "defaced"):
        sel = [r for r in rows if r["case"] == case]
        print(f"| {case} | {len(sel)} | {np.median([r['fit'] for r in sel]):.2f} | {max(r['fit'] for r in sel):.2f} "
              f"| {np.median([r['all'] for r in sel]):.2f} | {np.median([r['detection_residual_mm'] for r in sel]):.1f} "
              f"| {np.median([r['detection_drift_mm'] for r in sel]):.1f} | {sum(r['flagged'] for r in sel)} "
              f"| {sum(r['searched'] for r in sel)} |")
    pair_dice(model, bank, args, points, in_fits)
    return 0


def pair_dice(model, bank, args, points, in_fits) -> None:
    """Affine Dice of the upright pairs (fixed whole T1-like, moving each other contrast whole or defaced)."""
    if 0.0 not in args.rotations or "t1" not in args.contrasts or len(args.maps) < 2:
        return
    scale = fit_scale(model)
    segs = [m.numpy().astype(np.int64) for m in bank.maps]
    affs = [a.numpy() for a in bank.affines]
    dice = {"whole": [], "defaced": []}
    for fi, fixed_map in enumerate(args.maps):
        mi = (fi + 1) % len(args.maps)
        fixed = Volume(np.zeros(segs[fi].shape, np.float32), affs[fi])  # the grid of the fixed image
        for contrast in [c for c in args.contrasts if c != "t1"]:
            for case in dice:
                tr = fit("affine", points[fixed_map, "t1", 0.0, "whole"], points[args.maps[mi], contrast, 0.0, case],
                         fixed, scale, in_fits, model.config.aligned_tolerance_mm)
                dice[case].append(brain_dice(warp_seg(segs[mi], affs[mi], fixed, tr), segs[fi]))
    print(f"\naffine Dice, {len(dice['whole'])} upright pairs (fixed whole T1-like): whole "
          f"{np.mean(dice['whole']):.3f}, defaced {np.mean(dice['defaced']):.3f} "
          f"(per pair: {' '.join(f'{a:.3f}/{b:.3f}' for a, b in zip(dice['whole'], dice['defaced']))})")


if __name__ == "__main__":
    sys.exit(main())
