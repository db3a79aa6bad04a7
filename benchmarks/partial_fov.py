"""Registration of scans whose field of view misses part of the head (a clinical slab, a cut cerebellum).

Protocol: held-out label maps 13-15 at 2 mm, pairs of different subjects (13->14, 14->15, 15->13);
the fixed image T1-like and whole; the moving image T2-like (``--moving_contrast``), its grid
cropped along the superior-inferior axis (voxel axis k of these RAS grids: the scan ends there, as
a real partial acquisition does, not an image zeroed beyond a plane):

* ``whole``: no crop (the reference row);
* ``inferior N%``: the lowest N % of the head's extent is missing (15: the lower brain stem; 30: most
  of the cerebellum; 45: the cerebellum and the temporal poles);
* ``superior 20%``: the vertex is missing;
* ``slab 60mm`` / ``slab 90mm``: only an axial slab centred on the brain's centroid;
* ``--rotation DEG`` also turns each cropped moving image (header) about a random axis.

Per case: affine Dice (FreeSurfer brain structures 2-60, as ``keyreg evaluate``) with the model's
keypoints, the ceiling (true region centroids), the Dice before, the median keypoint error of the
moving image for regions whose true centroid lies inside / outside its field of view, whether the
orientation search ran, the rotation error of the affine (degrees, against the true centroids'
affine), the larger template residual and drift of the two images (``detection_residual_mm``,
``detection_drift_mm``) and whether the pipeline flags the pair ``check`` (``keyreg.qc``).  ``affine_inside`` fits only the keypoints whose detected position lies inside both images' grids
(a rule the pipeline does not apply: it did not help, docs/models.md).

Usage:
    python benchmarks/partial_fov.py [--model keyreg-anatomy] [--rotation 0] [--moving_contrast t2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from model_validation import (anatomical_model, brain_dice, fit, fit_mask, fit_scale, label_maps_2mm, rotation, seed_of,
                              synth, warp_seg)

from keyreg.geometry import fov_center
from keyreg.io import Volume
from keyreg.models.inference import detect_image_keypoints
from keyreg.qc import detection_concerns, pair_confidence_of

CASES = ["whole", "inferior 15%", "inferior 30%", "inferior 45%", "superior 20%", "slab 90mm", "slab 60mm"]


def crop(seg: np.ndarray, image: np.ndarray, affine: np.ndarray, case: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image, affine)`` of the moving scan restricted along voxel axis k (superior-inferior) as ``case`` says."""
    ks = np.flatnonzero((seg > 0).any(axis=(0, 1)))
    lo, hi = int(ks.min()), int(ks.max()) + 1
    extent = hi - lo
    vox = float(affine[2, 2])
    if case == "whole":
        a, b = 0, seg.shape[2]
    elif case.startswith("inferior"):
        a, b = lo + int(round(float(case.split()[1][:-1]) / 100 * extent)), seg.shape[2]
    elif case.startswith("superior"):
        a, b = 0, hi - int(round(float(case.split()[1][:-1]) / 100 * extent))
    else:  # a slab centred on the brain's centroid
        width = int(round(float(case.split()[1][:-2]) / vox))
        brain = np.flatnonzero(((seg > 0) & (seg < 500)).any(axis=(0, 1)))
        centre = int(round(np.average(np.arange(seg.shape[2]), weights=((seg > 0) & (seg < 500)).sum((0, 1)))))
        a = max(int(brain.min()), centre - width // 2)
        b = a + width
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, a]) + affine[:3, 3]
    return np.ascontiguousarray(image[:, :, a:b]), out


def inside_grid(points: np.ndarray, shape: Sequence[int], affine: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
    """``(N,)`` bools: which world points ``(N, 3)`` (mm) lie inside an image's grid (voxel centres
    ± half a voxel, shrunk by ``margin_mm``): where a keypoint can be seen, not guessed."""
    aff = np.asarray(affine, dtype=np.float64)
    vox = (np.asarray(points, dtype=np.float64) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    size = np.linalg.norm(aff[:3, :3], axis=0)
    pad = 0.5 - margin_mm / size
    return ((vox >= -pad) & (vox <= np.asarray(shape[:3], dtype=np.float64) - 1 + pad)).all(1)


def rotation_error(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) between the rotation parts (polar decomposition) of two affines."""
    def rot(m):
        u, _, vt = np.linalg.svd(m[:3, :3])
        return u @ vt
    r = rot(a) @ rot(b).T
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--cases", nargs="+", default=CASES)
    p.add_argument("--rotation", type=float, default=0.0, help="also turn the moving image by this many degrees")
    p.add_argument("--moving_contrast", default="t2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = anatomical_model(args.model)
    atlas = model.config.regions
    mask, scale, tol = fit_mask(model), fit_scale(model), model.config.aligned_tolerance_mm
    bank = label_maps_2mm(args.maps)
    segs = [m.numpy().astype(np.int64) for m in bank.maps]
    affs = [a.numpy() for a in bank.affines]
    print(f"model {model.config.name}; maps {args.maps}; moving {args.moving_contrast}; rotation {args.rotation:g}")
    rows = []
    n = len(args.maps)
    for fi in range(n):
        mi = (fi + 1) % n
        fixed = Volume(synth(bank.maps[fi], "t1", seed_of(args.seed, args.maps[fi], "t1")), affs[fi], name="fixed")
        det_f = detect_image_keypoints(model, fixed)
        kf, res_f, drift_f = det_f.points.numpy(), float(np.median(det_f.template_residual_mm)), det_f.drift_mm
        true_f = atlas.centroids(segs[fi], affs[fi])[0]
        full = synth(bank.maps[mi], args.moving_contrast, seed_of(args.seed, args.maps[mi], args.moving_contrast))
        for case in args.cases:
            img, aff = crop(segs[mi], full, affs[mi], case)
            pert = rotation(seed_of(args.seed, fi, mi, case, args.rotation), args.rotation,
                            fov_center(affs[mi], segs[mi].shape))
            m_aff, seg_aff = pert @ aff, pert @ affs[mi]
            moving = Volume(img, m_aff, name=case)
            t0 = time.perf_counter()
            det = detect_image_keypoints(model, moving)
            secs = time.perf_counter() - t0
            km = det.points.numpy()
            true_m = atlas.centroids(segs[mi], seg_aff)[0]  # the whole head's centroids (world mm)
            vox = np.linalg.solve(m_aff, np.c_[true_m, np.ones(len(true_m))].T).T[:, :3]
            seen = ((vox > -0.5) & (vox < np.array(img.shape) - 0.5)).all(1)
            err = np.linalg.norm(km - true_m, axis=1)
            row = {"pair": f"{args.maps[fi]}->{args.maps[mi]}", "case": case,
                   "before": brain_dice(warp_seg(segs[mi], seg_aff, fixed, None), segs[fi])}
            tr = fit("affine", kf, km, fixed, scale, mask, tol)
            row["affine"] = brain_dice(warp_seg(segs[mi], seg_aff, fixed, tr), segs[fi])
            truth = fit("affine", true_f, true_m, fixed, scale, mask)
            row["ceiling"] = brain_dice(warp_seg(segs[mi], seg_aff, fixed, truth), segs[fi])
            row["rot_err"] = rotation_error(tr.matrix[0].numpy(), truth.matrix[0].numpy())
            keep = mask & inside_grid(km, img.shape, m_aff) & inside_grid(kf, fixed.shape, fixed.affine)
            if keep.sum() >= 4:
                tr_in = fit("affine", kf, km, fixed, scale, keep, tol)
                row["affine_inside"] = brain_dice(warp_seg(segs[mi], seg_aff, fixed, tr_in), segs[fi])
            row["kept"] = int(keep.sum())
            row["kp_err_seen"] = float(np.nanmedian(err[seen])) if seen.any() else float("nan")
            row["kp_err_unseen"] = float(np.nanmedian(err[~seen])) if (~seen).any() else float("nan")
            row["unseen"] = int((~seen).sum())
            row["detection_residual"] = max(float(np.median(det.template_residual_mm)), res_f)
            row["detection_drift"] = max(det.drift_mm, drift_f)
            conf = pair_confidence_of(kf[mask], km[mask])
            row["flagged"] = conf["flag"] == "check" or bool(detection_concerns(
                {"detection_residual_mm": row["detection_residual"], "detection_drift_mm": row["detection_drift"]}))
            row["searched"] = bool(det.searched)
            row["s"] = secs
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    keys = ["before", "affine", "affine_inside", "ceiling", "rot_err",
            "kp_err_seen", "kp_err_unseen", "unseen", "detection_residual", "detection_drift"]
    print(f"\n| case (rotation {args.rotation:g}°) | n | " + " | ".join(keys) + " | rot_err max | searched | flagged |")
    print("|---" * (len(keys) + 5) + "|")
    for case in args.cases:
        sel = [r for r in rows if r["case"] == case]
        vals = []
        for k in keys:
            v = np.array([r.get(k, np.nan) for r in sel], dtype=float)
            vals.append(float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan"))
        print(f"| {case} | {len(sel)} | " + " | ".join(f"{v:.3f}" if k in ("before", "affine", "affine_inside", "ceiling")
                                                     else f"{v:.1f}" for k, v in zip(keys, vals))
              + f" | {max(r['rot_err'] for r in sel):.1f} | {sum(r['searched'] for r in sel)} of {len(sel)} "
              f"| {sum(r['flagged'] for r in sel)} of {len(sel)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
