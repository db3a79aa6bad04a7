"""Does the pair confidence mean something, and how much does the robust fit recover?

Held-out label maps (13, 14, 15 of ../shared/data/labelmaps, 2 mm) give synthetic images
(``keyreg.train.synth``): T1-like fixed images and T2-like moving images: each subject's T1 against its own T2 and against
the next subject's T2 (``--pairs all``: every ordered pair), the moving header rotated by a seeded random rotation (at most 30 degrees).
Each pair is registered as is ("clean") and with its moving image degraded on purpose:

* ``lesion``: a sphere of 25 mm radius with a random bright intensity (segmentation untouched);
* ``fov_half``: the upper half of the moving head cropped away (image set to 0 there);
* ``flipped``: the moving image and segmentation mirrored left-right in the data array (wrong
  anatomy: left and right labels swap);
* ``other_part``: a different body part: the lower back quarter of the moving map (cerebellum and
  brain stem) enlarged to fill the field of view (the header's voxel size doubled about the centre);
* ``noise``: Gaussian noise of standard deviation 0.5 (images are in [0, 1]).

For every pair and fit the mean hard Dice (labels of the moving segmentation warped onto the fixed
one, nearest neighbour) is measured.  A degraded pair "dropped" when its Dice is below the clean
pair's by more than ``--drop`` (0.05).  Printed: the ROC AUC of ``1 - confidence`` for telling
dropped pairs from the rest (clean pairs included), per degradation; and the Dice of the plain
and of the robust fit (``--robust``) on the degraded pairs.

Usage:
    python benchmarks/confidence.py [--maps 13 14 15] [--aligns affine tps_1] [--model NAME] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from keyreg.api import detect_keypoints, resolve_device, resolve_model  # noqa: E402
from keyreg.geometry import fov_center, fov_half_extent  # noqa: E402
from keyreg.io import Volume  # noqa: E402
from keyreg.metrics import dice_per_label, mean_dice  # noqa: E402
from keyreg.train.synth import synthesize_image  # noqa: E402
from keyreg.transforms import AffineTransform, fit_transform, parse_aligns, sample_field  # noqa: E402
from keyreg.transforms.residuals import CONFIDENCE_THRESHOLD, keypoint_confidence  # noqa: E402
from keyreg.transforms.robust import robust_fit  # noqa: E402
from keyreg.warp import warp_labels  # noqa: E402

LABELMAPS = ROOT.parent / "shared" / "data" / "labelmaps"
DEGRADATIONS = ("lesion", "fov_half", "flipped", "other_part", "noise")


def rotation_about(axis: np.ndarray, degrees: float, center: np.ndarray) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = center - r @ center
    return m


def load_map(index: int) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(LABELMAPS / f"training_seg_{index:02d}.nii.gz")
    lab = np.asarray(img.dataobj).astype(np.int64)[::2, ::2, ::2]
    return lab, img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])


def synth(lab: np.ndarray, contrast: str, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return synthesize_image(torch.from_numpy(lab)[None, None], g, contrast=contrast)[0, 0].numpy()


def world_axis(affine: np.ndarray, ras_axis: int) -> int:
    """The voxel axis closest to RAS axis ``ras_axis``."""
    return int(np.argmax(np.abs(affine[ras_axis, :3])))


def degrade(kind: str, image: np.ndarray, seg: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    """A degraded copy of the moving ``(image, seg, affine)``."""
    image, seg, affine = image.copy(), seg.copy(), affine.copy()
    shape = np.array(image.shape)
    vox = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (vox @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)
    brain = seg > 0
    centre = world[brain].mean(0)
    if kind == "lesion":
        inside = np.argwhere(brain)
        c = world[tuple(inside[rng.integers(len(inside))])]
        c = centre + 0.5 * (c - centre)  # well inside the brain
        ball = np.linalg.norm(world - c, axis=-1) < 25.0
        image[ball] = rng.uniform(0.8, 1.0) + 0.05 * rng.standard_normal(int(ball.sum()))
    elif kind == "fov_half":
        image[world[..., 2] > centre[2]] = 0.0
    elif kind == "flipped":
        ax = world_axis(affine, 0)
        image = np.flip(image, ax).copy()
        seg = np.flip(seg, ax).copy()
    elif kind == "other_part":
        # keep the inferior-posterior quarter and zoom it x2 about the FOV centre (a 'different body part')
        keep = (world[..., 2] < centre[2] - 10) & (world[..., 1] < centre[1])
        image = np.where(keep, image, 0.0)
        seg = np.where(keep, seg, 0)
        sub = world[keep].mean(0)
        zoom = np.eye(4)
        zoom[:3, :3] *= 2.0
        zoom[:3, 3] = centre - 2.0 * sub
        affine = zoom @ affine
    elif kind == "noise":
        image = image + 0.5 * rng.standard_normal(image.shape)
    else:
        raise ValueError(kind)
    return image.astype(np.float32), seg, affine


def dice(transform, moving_seg: np.ndarray, moving_aff: np.ndarray, fixed_seg: np.ndarray,
         fixed_aff: np.ndarray) -> float:
    dense = transform if isinstance(transform, AffineTransform) else \
        sample_field(transform, fixed_seg.shape, fixed_aff, stride=2)
    warped = warp_labels(torch.from_numpy(moving_seg)[None], moving_aff, fixed_seg.shape, fixed_aff, dense)[0]
    return mean_dice(dice_per_label(warped.numpy(), fixed_seg))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores higher than a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, nargs="+", default=[13, 14, 15])
    ap.add_argument("--aligns", nargs="+", default=["affine"])
    ap.add_argument("--pairs", choices=["ring", "all"], default="ring",
                    help="ring: each subject with itself and with the next one (default); all: every ordered pair")
    ap.add_argument("--model", default=None, help="model (default: the bundled default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--drop", type=float, default=0.05, help="Dice drop that counts as 'dropped'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from_log", help="recompute the tables from the per-pair lines a (possibly interrupted) "
                                       "run printed to stderr, instead of registering")
    args = ap.parse_args()
    if args.from_log:
        rows = rows_from_log(Path(args.from_log).read_text(), parse_aligns(args.aligns))
        report(rows, parse_aligns(args.aligns), args, float("nan"), f"(from the log {args.from_log})")
        return
    if not LABELMAPS.exists():
        sys.exit(f"needs {LABELMAPS}")
    t0 = time.perf_counter()
    dev = resolve_device(args.device)
    net = resolve_model(args.model, dev)
    specs = parse_aligns(args.aligns)
    rng = np.random.default_rng(args.seed)
    maps = {i: load_map(i) for i in args.maps}
    fixed = {i: (synth(lab, "t1", 100 + i), lab, aff) for i, (lab, aff) in maps.items()}
    fixed_kp = {i: detect_keypoints(net, [Volume(img, aff, name=f"f{i}")], device=dev)[0]
                for i, (img, lab, aff) in fixed.items()}
    rows = []
    ring = args.maps[1:] + args.maps[:1]
    pairs = [(i, i) for i in args.maps] + ([(i, j) for i, j in zip(args.maps, ring) if i != j]
                                           if args.pairs == "ring" else
                                           [(i, j) for i in args.maps for j in args.maps if i != j])
    for fi, mi in pairs:
        if True:
            f_img, f_seg, f_aff = fixed[fi]
            m_lab, m_aff0 = maps[mi]
            m_img0 = synth(m_lab, "t2", 200 + 10 * fi + mi)
            centre = fov_center(m_aff0, m_lab.shape)
            rot = rotation_about(rng.standard_normal(3), rng.uniform(0, 30), np.asarray(centre))
            for kind in ("clean",) + DEGRADATIONS:
                if kind == "clean":
                    m_img, m_seg, m_aff = m_img0, m_lab, m_aff0
                else:
                    m_img, m_seg, m_aff = degrade(kind, m_img0, m_lab, m_aff0, rng)
                m_aff = rot @ m_aff
                kf = fixed_kp[fi]
                km = detect_keypoints(net, [Volume(m_img, m_aff, name=f"m{mi}")], device=dev)[0]
                pf, pm = kf.points[None], km.points[None]
                c = torch.as_tensor(fov_center(kf.world_from_net, kf.grid_shape))
                s = fov_half_extent(kf.world_from_net, kf.grid_shape)
                conf = keypoint_confidence(pf, pm)
                row = {"fixed": fi, "moving": mi, "kind": kind, "confidence": float(conf["confidence"][0]),
                       "det": float(conf["affine_det"][0]),
                       "median_loo": float(conf["median_loo_mm"][0]), "inliers": float(conf["inlier_fraction"][0])}
                for spec in specs:
                    plain = fit_transform(spec, pf, pm, center=c, scale=s)
                    rob = robust_fit(spec, pf, pm, center=c, scale=s)
                    row[f"{spec.name}_plain"] = dice(plain, m_seg, m_aff, f_seg, f_aff)
                    row[f"{spec.name}_robust"] = dice(rob.transform, m_seg, m_aff, f_seg, f_aff)
                    row[f"{spec.name}_kept"] = float(rob.kept.double().mean())
                rows.append(row)
                print(f"  {fi}->{mi} {kind:10s} conf {row['confidence']:.3f} medLOO {row['median_loo']:6.1f} "
                      f"inl {row['inliers']:.2f} det {row['det']:+.2f} "
                      + " ".join(f"{sp.name} {row[sp.name + '_plain']:.3f}/{row[sp.name + '_robust']:.3f}"
                                 for sp in specs), file=sys.stderr, flush=True)
    report(rows, specs, args, time.perf_counter() - t0, net.config.name)


def rows_from_log(text: str, specs) -> list[dict]:
    """The rows of the per-pair lines ``  F->M kind conf C medLOO D inl I det X align plain/robust ...``."""
    import re

    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)->(\d+) (\w+)\s+conf ([\d.]+) medLOO\s+([\d.]+) inl ([\d.]+) det ([-+\d.]+) (.*)", line)
        if not m:
            continue
        row = {"fixed": int(m[1]), "moving": int(m[2]), "kind": m[3], "confidence": float(m[4]),
               "median_loo": float(m[5]), "inliers": float(m[6]), "det": float(m[7])}
        for name, plain, rob in re.findall(r"(\S+) ([\d.]+)/([\d.]+)", m[8]):
            row[f"{name}_plain"], row[f"{name}_robust"] = float(plain), float(rob)
        rows.append(row)
    # only pairs whose clean registration is in the log
    clean = {(r["fixed"], r["moving"]) for r in rows if r["kind"] == "clean"}
    return [r for r in rows if (r["fixed"], r["moving"]) in clean]


def report(rows, specs, args, seconds: float, model_name: str) -> None:
    ref = specs[0].name  # Dice drop judged on the first align
    clean = {(r["fixed"], r["moving"]): r for r in rows if r["kind"] == "clean"}
    for r in rows:
        r["dropped"] = r["kind"] != "clean" and \
            r[f"{ref}_plain"] < clean[(r["fixed"], r["moving"])][f"{ref}_plain"] - args.drop
    conf = np.array([r["confidence"] for r in rows])
    dropped = np.array([r["dropped"] for r in rows])
    flagged = conf < CONFIDENCE_THRESHOLD
    print(f"model {model_name}, maps {' '.join(map(str, args.maps))}, {len(rows)} pairs, "
          f"Dice drop > {args.drop} on {ref} = 'dropped', {seconds:.0f} s\n")
    print("| pairs | n | dropped | mean confidence | flagged `check` | AUC (confidence vs dropped, with the clean pairs) | "
          + " | ".join(f"{s.name} Dice plain | {s.name} Dice robust" for s in specs) + " |")
    print("|---|---|---|---|---|---|" + "---|---|" * len(specs))
    for kind in ("clean",) + DEGRADATIONS + ("all",):
        sel = np.array([kind == "all" or r["kind"] == kind for r in rows])
        if not sel.any():
            continue
        if kind in ("clean", "all"):
            auc_sel = np.ones(len(rows), bool) if kind == "all" else None
        else:
            auc_sel = sel | np.array([r["kind"] == "clean" for r in rows])
        auc = "" if auc_sel is None else f"{roc_auc(1 - conf[auc_sel], dropped[auc_sel]):.2f}"
        cells = []
        for s in specs:
            p = np.mean([r[f"{s.name}_plain"] for r, k in zip(rows, sel) if k])
            q = np.mean([r[f"{s.name}_robust"] for r, k in zip(rows, sel) if k])
            cells.append(f"{p:.3f} | {q:.3f}")
        print(f"| {kind} | {sel.sum()} | {int(dropped[sel].sum())} | {conf[sel].mean():.3f} | "
              f"{int(flagged[sel].sum())} | {auc} | " + " | ".join(cells) + " |")
    deg = np.array([r["kind"] != "clean" for r in rows])
    for s in specs:
        p = np.array([r[f"{s.name}_plain"] for r in rows])
        q = np.array([r[f"{s.name}_robust"] for r in rows])
        c = np.array([clean[(r["fixed"], r["moving"])][f"{s.name}_plain"] for r in rows])
        lost = (c - p)[deg & dropped].sum()
        back = (q - p)[deg & dropped].sum()
        frac = back / lost if lost > 0 else float("nan")
        print(f"\n{s.name}: robust fit on the dropped degraded pairs: Dice {p[deg & dropped].mean():.3f} -> "
              f"{q[deg & dropped].mean():.3f} (recovers {100 * frac:.0f}% of the Dice lost); "
              f"on clean pairs {p[~deg].mean():.3f} -> {q[~deg].mean():.3f}")


if __name__ == "__main__":
    main()
