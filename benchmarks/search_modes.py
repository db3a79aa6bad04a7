"""Orientation search modes of an anatomical model: does ``auto`` ever accept a wrong pose?

``auto`` reads an image as it is first and keeps that reading when its keypoints fit the model's
template and do not drift when the grid is turned (3-4 network passes); otherwise it runs the full
search of ``always`` (24 cube rotations, 25-33 passes).  Its risk is a wrongly turned head read as
upright and accepted.  This script looks for that failure where it is most likely: held-out label
maps (13-15, 2 mm), synthetic contrasts, each image presented in all 24 rotations of the cube (the
poses a scanner's axes can swap into) composed with a random tilt of up to ``--tilt`` degrees, and
in ``--random`` further uniformly random orientations.

For every presentation it prints the keypoint error of each mode against the true region centroids
of the label map (median over keypoints, mm), whether ``auto`` searched, and the passes.  A *wrong
pose* is a median error above ``--wrong_mm``: for ``auto``, a wrong pose that it accepted without
searching is the failure this script counts.

Usage:
    python benchmarks/search_modes.py [--model keyreg-anatomy] [--maps 13 14 15] [--contrasts t1 t2]
        [--tilt 20] [--random 4] [--modes auto always]
    python benchmarks/search_modes.py --summarize LOG   # the table of an earlier (interrupted) run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from model_validation import anatomical_model, label_maps_2mm, seed_of, synth

from keyreg.demo import rotation_angle
from keyreg.geometry import fov_center, rotation_about
from keyreg.io import Volume
from keyreg.models.inference import cube_rotations, detect_image_keypoints


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation ``(3, 3)`` (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def tilt(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation ``(3, 3)`` by a uniform angle in ``[0, max_degrees]`` about a random axis."""
    return rotation_about(rng.normal(size=3), rng.uniform(0, max_degrees))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--contrasts", nargs="+", default=["t1", "t2"])
    p.add_argument("--tilt", type=float, default=20.0, help="largest random tilt added to each cube rotation")
    p.add_argument("--random", type=int, default=4, help="uniformly random orientations per image, besides the 24")
    p.add_argument("--modes", nargs="+", choices=["auto", "always"], default=["auto", "always"])
    p.add_argument("--wrong_mm", type=float, default=15.0, help="median keypoint error of a wrong pose")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize", metavar="LOG", help="print the summary of the rows of an earlier (possibly "
                   "interrupted) run's output instead of running")
    args = p.parse_args(argv)
    if args.summarize:
        rows = read_rows(args.summarize)
        args.modes = [m for m in ("auto", "always") if rows and f"{m}_err" in rows[0]]
        args.maps = sorted({r["map"] for r in rows})
        print_summary(rows, args)
        return 0
    torch.set_num_threads(args.threads)
    model = anatomical_model(args.model)
    atlas = model.config.regions
    bank = label_maps_2mm(args.maps)
    print(f"model {model.config.name}; maps {args.maps}; contrasts {args.contrasts}; 24 cube rotations "
          f"+ tilt <= {args.tilt:g}° and {args.random} random orientations per image; modes {args.modes}")
    rows = []
    try:
        run(model, atlas, bank, args, rows)
    except KeyboardInterrupt:
        print(f"interrupted after {len(rows)} presentations", flush=True)
    print_summary(rows, args)
    return 0


def read_rows(log: str) -> list[dict]:
    """The per-presentation rows (``map=13 contrast=t1 ...`` lines) of a run's output."""
    rows = []
    for line in open(log):
        if line.startswith("map="):
            row = {}
            for kv in line.split():
                k, v = kv.split("=", 1)
                row[k] = (v == "True" if v in ("True", "False") else v if k == "contrast"
                          else int(v) if k in ("map", "n") or k.endswith("_passes") else float(v))
            rows.append(row)
    return rows


def run(model, atlas, bank, args, rows: list[dict]) -> None:
    for i, m in enumerate(args.maps):
        seg = bank.maps[i].numpy().astype(np.int64)
        aff = bank.affines[i].numpy()
        center = fov_center(aff, seg.shape)
        for c in args.contrasts:
            img = synth(bank.maps[i], c, seed_of(args.seed, m, c))
            rng = np.random.default_rng(seed_of(args.seed, "search", m, c))
            rots = [r @ tilt(rng, args.tilt) for r in cube_rotations()]
            rots += [random_rotation(rng) for _ in range(args.random)]
            for n, rot in enumerate(rots):
                pert = np.eye(4)
                pert[:3, :3] = rot
                pert[:3, 3] = center - rot @ center
                vol = Volume(img, pert @ aff, name=f"{m}{c}r{n}")
                truth = atlas.centroids(seg, pert @ aff)[0]
                row = {"map": m, "contrast": c, "n": n, "angle": rotation_angle(rot)}
                for mode in args.modes:
                    t0 = time.perf_counter()
                    det = detect_image_keypoints(model, vol, search=mode)
                    row[f"{mode}_s"] = time.perf_counter() - t0
                    row[f"{mode}_err"] = float(np.nanmedian(np.linalg.norm(det.points.numpy() - truth, axis=1)))
                    row[f"{mode}_passes"] = det.passes
                    row[f"{mode}_searched"] = det.searched
                rows.append(row)
                print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)


def print_summary(rows: list[dict], args) -> None:
    if not rows:
        return
    print(f"\n### Orientation search modes on {len(rows)} presentations (maps {args.maps}, 2 mm)\n")
    print("| mode | median kp error (mm) | p95 | max | wrong poses (> "
          f"{args.wrong_mm:g} mm) | searched | passes (mean) | s/image (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        err = np.array([r[f"{mode}_err"] for r in rows])
        wrong = int((err > args.wrong_mm).sum())
        searched = sum(r[f"{mode}_searched"] for r in rows)
        print(f"| {mode} | {np.median(err):.2f} | {np.percentile(err, 95):.2f} | {err.max():.2f} | {wrong} | "
              f"{searched} of {len(rows)} | {np.mean([r[f'{mode}_passes'] for r in rows]):.1f} | "
              f"{np.mean([r[f'{mode}_s'] for r in rows]):.2f} |")
    if "auto" in args.modes:
        accepted = [r for r in rows if not r["auto_searched"]]
        bad = [r for r in accepted if r["auto_err"] > args.wrong_mm]
        print(f"\n`auto` kept the image's own reading on {len(accepted)} of {len(rows)} presentations "
              f"(rotation angles {min((r['angle'] for r in accepted), default=float('nan')):.0f}–"
              f"{max((r['angle'] for r in accepted), default=float('nan')):.0f}°); wrong poses among them: "
              f"{len(bad)}" + "".join(f"\n- map {r['map']} {r['contrast']} #{r['n']} ({r['angle']:.0f}°): "
                                      f"{r['auto_err']:.1f} mm" for r in bad))
        if "always" in args.modes:
            diff = np.array([r["auto_err"] - r["always_err"] for r in rows])
            print(f"auto - always keypoint error per presentation: median {np.median(diff):+.2f} mm, "
                  f"max {diff.max():+.2f} mm")


if __name__ == "__main__":
    raise SystemExit(main())
