"""Validation of a keypoint model against the ceiling of its design and ANTs (the model card's table).

Protocol (issue: anatomical default model):
* held-out label maps 13-15 (../shared/data/labelmaps), resampled to 2 mm; every pair joins two
  different subjects (13->14, 14->15, 15->13; ``--all_pairs``: the 6 ordered pairs);
* contrast pairs fixed -> moving: T1 -> T2, T2 -> T1, T1 -> PD-like, T1 -> FLAIR-like (synthetic
  contrasts of ``keyreg.train.synth``, whole head, seeded);
* the moving image is rotated (header) by 0, 45, 90, 135, 180 degrees about a random axis (seeded
  per pair and angle) through its field-of-view centre;
* Dice: mean over FreeSurfer brain structures 2-60 present in either map (background excluded);
* ceiling: the same fits from the *true* region centroids of both label maps;
* ANTs Affine (antspyx, Mattes MI) on the same pairs (rotations given by ``--ants_rotations``);
* an already aligned pair: two contrasts of one map on one grid, before and after the affine;
* keypoint error: distance between detected and true centroids (median over keypoints and pairs);
* inference cost of one 256^3 1 mm image, orientation search included (``--time_1mm``).

Usage:
    python benchmarks/model_validation.py --model keyreg-anatomy [--ants] [--time_1mm] [--quick]
    python benchmarks/model_validation.py --only_time_1mm
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from keyreg.geometry import fov_center, fov_half_extent, rotation_about
from keyreg.io import Volume
from keyreg.metrics import brain_dice_per_label, mean_dice
from keyreg.models import load_model
from keyreg.models.inference import detect_image_keypoints
from keyreg.train.data import LabelMapBank
from keyreg.train.synth import contrast_image
from keyreg.transforms import (DEFAULT_FIELD_STRIDE, AffineTransform, fit_affine, fit_transform,
                               keep_identity_if_aligned, keypoint_motion_mm, parse_align, sample_field)
from keyreg.warp import warp_labels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "labelmaps"
CONTRAST_PAIRS = [("t1", "t2"), ("t2", "t1"), ("t1", "pd"), ("t1", "flair")]


def label_maps_2mm(maps) -> LabelMapBank:
    """The label maps ``training_seg_NN`` (``maps``: numbers) of ../shared at 2 mm (128^3); exits
    with a message when ../shared is absent."""
    if not SHARED.exists():
        raise SystemExit(f"needs {SHARED}")
    return LabelMapBank([SHARED / f"training_seg_{m:02d}.nii.gz" for m in maps], storage_voxel=2.0,
                        storage_shape=128)


def anatomical_model(name):
    """The model ``name`` (a file or a bundled name; ``None``: the default) in evaluation mode; exits
    with a message when it has no anatomical regions."""
    model = load_model(name).eval()
    if model.config.regions is None:
        raise SystemExit(f"{model.config.name}: not an anatomical model (no named regions)")
    return model


def fit_mask(model) -> np.ndarray:
    """``(K,)`` bools: the keypoints the model's fits use (its ``fit_exclude``; all when none)."""
    return np.asarray(model.config.fit_mask() or [True] * model.config.architecture.num_keypoints)


def fit_scale(model) -> float:
    """The fits' length scale for ``model``: half the extent of its network grid (mm)."""
    grid = model.config.preprocessing.grid
    return fov_half_extent(np.diag([*grid.voxel_size, 1.0]), grid.shape)


def seed_of(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def brain_dice(warped: np.ndarray, fixed: np.ndarray) -> float:
    return mean_dice(brain_dice_per_label(warped, fixed))


def synth(labels: torch.Tensor, contrast: str, seed: int) -> np.ndarray:
    return contrast_image(labels, contrast, seed)


def rotation(seed: int, degrees: float, center: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    r = rotation_about(axis / np.linalg.norm(axis), degrees)[:3, :3] if degrees else np.eye(3)
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = center - r @ center
    return out


def warp_seg(seg: np.ndarray, seg_affine: np.ndarray, fixed: Volume, transform) -> np.ndarray:
    if transform is not None and not isinstance(transform, AffineTransform):  # as the pipeline does
        transform = sample_field(transform, fixed.shape, fixed.affine, stride=DEFAULT_FIELD_STRIDE)
    out = warp_labels(torch.from_numpy(seg.astype(np.int64))[None], seg_affine, fixed.shape, fixed.affine, transform)
    return out[0].numpy()


def fit(align: str, kf: np.ndarray, km: np.ndarray, fixed: Volume, model_scale: float, mask=None,
        tolerance_mm: float = 0.0):
    """The pipeline's fit: the model's keypoint selection (``fit_exclude``), the closed-form fit and the
    already-aligned check (with the model's ``aligned_tolerance_mm``)."""
    ok = np.isfinite(kf).all(1) & np.isfinite(km).all(1)
    if mask is not None:
        ok &= np.asarray(mask)
    center = torch.as_tensor(fov_center(fixed.affine, fixed.shape))
    pf, pm = torch.from_numpy(kf[ok])[None], torch.from_numpy(km[ok])[None]
    tr = fit_transform(parse_align(align), pf, pm, center=center, scale=model_scale)
    return keep_identity_if_aligned({align: tr}, pf, pm, tolerance_mm=tolerance_mm)[align]


def ants_affine(fixed: Volume, moving: Volume, moving_seg: np.ndarray, tmp: Path) -> tuple[np.ndarray, float]:
    import ants
    import nibabel as nib

    paths = {}
    for name, arr, aff in (("f", fixed.data, fixed.affine), ("m", moving.data, moving.affine),
                           ("ms", moving_seg.astype(np.float32), moving.affine)):
        paths[name] = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), aff), paths[name])
    f, m, ms = (ants.image_read(str(paths[k])) for k in ("f", "m", "ms"))
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="Affine", aff_metric="mattes", random_seed=1)
    secs = time.perf_counter() - t0
    out = ants.apply_transforms(f, ms, reg["fwdtransforms"], interpolator="nearestNeighbor")
    return np.rint(out.numpy()).astype(np.int64), secs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--rotations", nargs="+", type=float, default=[0, 45, 90, 135, 180])
    p.add_argument("--aligns", nargs="+", default=["rigid", "affine", "tps_1", "tps_10"])
    p.add_argument("--contrasts", nargs="+", default=[f"{a}:{b}" for a, b in CONTRAST_PAIRS])
    p.add_argument("--ceiling_aligns", nargs="+", default=["affine", "tps_1"])
    p.add_argument("--ants", action="store_true", help="ANTs Affine (antspyx) on the same pairs")
    p.add_argument("--ants_rotations", nargs="+", type=float, default=[0])
    p.add_argument("--time_1mm", action="store_true", help="time the keypoints of a 256^3 1 mm image")
    p.add_argument("--only_time_1mm", action="store_true", help="only that timing, without the validation")
    p.add_argument("--quick", action="store_true", help="one contrast pair (T1 -> T2)")
    p.add_argument("--all_pairs", action="store_true",
                   help="every ordered pair of different maps (default: each map to the next, cyclically)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fit_exclude", nargs="*", help="keypoint name patterns left out of fits (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", choices=["always", "auto"], help="orientation search mode (default: the model's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not SHARED.exists():
        print(f"needs {SHARED}", file=sys.stderr)
        return 2
    contrasts = [tuple(c.split(":")) for c in args.contrasts]
    if args.quick:
        contrasts = contrasts[:1]
    model = load_model(args.model).eval()
    if args.search:
        model.config.orientation_search = args.search
    atlas = model.config.regions
    mask = model.config.fit_mask(args.fit_exclude)
    tol = model.config.aligned_tolerance_mm
    scale = fit_scale(model)
    print(f"model {model.config.name}: {model.config.architecture.describe()}, "
          f"{len(atlas) if atlas else 0} named regions; orientation search {model.config.orientation_search}; "
          f"maps {args.maps}; contrasts {contrasts}")
    if args.only_time_1mm:
        time_1mm(model, args)
        return 0
    bank = label_maps_2mm(args.maps)
    segs = [m.numpy().astype(np.int64) for m in bank.maps]
    affs = [a.numpy() for a in bank.affines]
    kp_cache: dict = {}
    rows = []
    t_detect, searched, n_detect = 0.0, 0, 0

    def keypoints(key, vol: Volume) -> np.ndarray:
        nonlocal t_detect, searched, n_detect
        if key not in kp_cache:
            t0 = time.perf_counter()
            det = detect_image_keypoints(model, vol)
            t_detect += time.perf_counter() - t0
            searched += int(det.searched)
            n_detect += 1
            kp_cache[key] = det.points.numpy()
        return kp_cache[key]

    images = {}
    for i, m in enumerate(args.maps):
        for c in {c for pair in contrasts for c in pair}:
            images[(i, c)] = synth(bank.maps[i], c, seed_of(args.seed, m, c))
    tmp = Path(tempfile.mkdtemp(prefix="keyreg_val_"))
    n = len(args.maps)
    pairs = [(f, m) for f in range(n) for m in range(n) if f != m] if args.all_pairs else \
        [(f, (f + 1) % n) for f in range(n)]
    for fi, mi in pairs:
        if True:
            for cf, cm in contrasts:
                fixed = Volume(images[(fi, cf)], affs[fi], name=f"{args.maps[fi]}{cf}")
                true_f = atlas.centroids(segs[fi], affs[fi])[0] if atlas else None
                kf = keypoints(("f", fi, cf), fixed)
                for deg in args.rotations:
                    pert = rotation(seed_of(args.seed, fi, mi, cf, cm, deg), deg, fov_center(affs[mi], segs[mi].shape))
                    m_aff = pert @ affs[mi]
                    moving = Volume(images[(mi, cm)], m_aff, name=f"{args.maps[mi]}{cm}r{deg:g}")
                    km = keypoints(("m", mi, cm, deg), moving)
                    row = {"fixed": args.maps[fi], "moving": args.maps[mi], "pair": f"{cf}->{cm}", "rot": deg,
                           "none": brain_dice(warp_seg(segs[mi], m_aff, fixed, None), segs[fi])}
                    for a in args.aligns:
                        row[a] = brain_dice(warp_seg(segs[mi], m_aff, fixed, fit(a, kf, km, fixed, scale, mask, tol)), segs[fi])
                    if atlas is not None:
                        true_m = atlas.centroids(segs[mi], m_aff)[0]
                        err = np.concatenate([np.linalg.norm(km - true_m, axis=1), np.linalg.norm(kf - true_f, axis=1)])
                        row["kp_err_median"] = float(np.nanmedian(err))
                        for a in args.ceiling_aligns:
                            row[f"ceiling_{a}"] = brain_dice(warp_seg(segs[mi], m_aff, fixed,
                                                                      fit(a, true_f, true_m, fixed, scale, mask)), segs[fi])
                    if args.ants and deg in args.ants_rotations:
                        warped, secs = ants_affine(fixed, moving, segs[mi], tmp)
                        row["ants_affine"] = brain_dice(warped, segs[fi])
                        row["ants_s"] = secs
                    rows.append(row)
                    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
    # an already aligned pair: two contrasts of one map on one grid
    aligned = []
    for i, m in enumerate(args.maps):
        a, b = contrasts[0]
        fixed = Volume(images[(i, a)], affs[i], name="f")
        moving = Volume(images[(i, b)], affs[i], name="m")
        kf, km = keypoints(("f", i, a), fixed), keypoints(("m", i, b, 0.0), moving)
        before = brain_dice(warp_seg(segs[i], affs[i], fixed, None), segs[i])
        after = brain_dice(warp_seg(segs[i], affs[i], fixed, fit("affine", kf, km, fixed, scale, mask, tol)), segs[i])
        ok = np.isfinite(kf).all(1) & np.isfinite(km).all(1) & (np.asarray(mask) if mask is not None else True)
        pf, pm = torch.from_numpy(kf[ok])[None], torch.from_numpy(km[ok])[None]
        motion = float(keypoint_motion_mm(pf, fit_affine(pf, pm))[0])
        aligned.append((m, before, after, motion))
    print_tables(rows, args, aligned, t_detect / max(n_detect, 1), searched, n_detect, tol)
    if args.time_1mm:
        time_1mm(model, args)
    return 0


def _mean(rows, key):
    v = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    return (float(np.mean(v)), len(v)) if v else (float("nan"), 0)


def print_tables(rows, args, aligned, t_mean, searched, n_detect, tol) -> None:
    aligns = args.aligns
    print("\n### Mean Dice (brain structures 2-60) by rotation, all contrast pairs\n")
    head = ["rotation", "n", "before"] + aligns + ["ceiling affine", "affine / ceiling", "kp error median (mm)"]
    if args.ants:
        head += ["ANTs Affine", "ANTs s/pair"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    means = {}
    for deg in args.rotations:
        sel = [r for r in rows if r["rot"] == deg]
        cells = [f"{deg:g}°", str(len(sel)), f"{_mean(sel, 'none')[0]:.3f}"]
        cells += [f"{_mean(sel, a)[0]:.3f}" for a in aligns]
        ceil = _mean(sel, "ceiling_affine")[0]
        aff = _mean(sel, "affine")[0]
        means[deg] = aff
        cells += [f"{ceil:.3f}", f"{aff / ceil:.3f}" if ceil == ceil else "-", f"{_mean(sel, 'kp_err_median')[0]:.2f}"]
        if args.ants:
            a, n = _mean(sel, "ants_affine")
            cells += [f"{a:.3f}" if n else "-", f"{_mean(sel, 'ants_s')[0]:.1f}" if n else "-"]
        print("| " + " | ".join(cells) + " |")
    flat = max(means.values()) - min(means.values())
    print(f"\naffine flatness (max - min of the rotation means): {flat:.3f}")
    print("\n### By contrast pair (all rotations)\n")
    print("| pair | n | before | " + " | ".join(aligns) + " | ceiling affine |")
    print("|" + "---|" * (len(aligns) + 4))
    for pair in sorted({r["pair"] for r in rows}):
        sel = [r for r in rows if r["pair"] == pair]
        print(f"| {pair} | {len(sel)} | {_mean(sel, 'none')[0]:.3f} | " +
              " | ".join(f"{_mean(sel, a)[0]:.3f}" for a in aligns) + f" | {_mean(sel, 'ceiling_affine')[0]:.3f} |")
    print("\n### Already aligned pairs (one map, two contrasts, one grid)\n")
    print(f"aligned_tolerance_mm of the model: {tol:g}\n")
    print("| map | before | affine | affine fit's keypoint motion (mm) |\n|---|---|---|---|")
    for m, b, a, motion in aligned:
        print(f"| {m} | {b:.3f} | {a:.3f} | {motion:.2f} |")
    print(f"\nkeypoint detection: {n_detect} images at 2 mm, mean {t_mean:.2f} s/image, "
          f"orientation search ran on {searched}")


def time_1mm(model, args) -> None:
    from keyreg.io import load_volume

    seg = load_volume(SHARED / f"training_seg_{args.maps[0]:02d}.nii.gz", kind="labels")
    img = synth(torch.from_numpy(seg.data.astype(np.int64)), "t1", 7)
    print("\n### Keypoints of one 256^3 1 mm image (2 threads)\n")
    print("| rotation | seconds | CPU seconds | network passes | search |\n|---|---|---|---|---|")
    for deg in (0.0, 90.0, 135.0, 180.0):
        pert = rotation(seed_of("time", deg), deg, fov_center(seg.affine, seg.shape))
        vol = Volume(img, pert @ seg.affine, name="t1")
        detect_image_keypoints(model, vol)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        det = detect_image_keypoints(model, vol)
        print(f"| {deg:g}° | {time.perf_counter() - t0:.2f} | {time.process_time() - c0:.2f} | {det.passes} | "
              f"{det.searched} |")


if __name__ == "__main__":
    raise SystemExit(main())
