"""Error and time of evaluating a TPS on a strided sub-grid (trilinear in between) versus exactly.

Keypoints: K points uniform in a brain-sized ellipsoid (semi-axes 70, 85, 65 mm) of a 256^3, 1 mm
grid; moving keypoints = a random affine of them plus N(0, sigma) mm noise (keypoint disagreement
between subjects).  For each lambda and stride, the dense field is compared with the exact TPS at
1M random voxel centres inside the head (the whole grid for stride 1 is exact by construction).

Usage:  python benchmarks/field_stride_error.py [--k 128 512] [--sigma 1.5] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _report import append_section, machine_line

from keyreg.transforms import fit_tps, sample_field


def ellipsoid_points(n: int, rng: np.random.Generator) -> np.ndarray:
    pts = []
    while len(pts) < n:
        p = rng.uniform(-1, 1, (4 * n, 3))
        pts.extend(p[(p ** 2).sum(1) <= 1])
    return np.asarray(pts[:n]) * np.array([70.0, 85.0, 65.0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    ap.add_argument("--strides", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--sigma", type=float, default=1.5, help="keypoint noise (mm)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = args.size
    affine = np.eye(4)
    affine[:3, 3] = -(n - 1) / 2  # 1 mm, centred
    idx = rng.uniform(0, n - 1, (args.samples, 3)).round()
    world = torch.as_tensor(idx + affine[:3, 3])[None]
    head = (world[0].pow(2) / torch.tensor([100.0, 115.0, 100.0]) ** 2).sum(1) <= 1
    rows = []
    for k in args.k:
        pf = ellipsoid_points(k, rng)
        lin = np.eye(3) + rng.normal(0, 0.05, (3, 3))
        pm = pf @ lin.T + rng.normal(0, 3, 3) + rng.normal(0, args.sigma, pf.shape)
        for lam in args.lambdas:
            tps = fit_tps(torch.as_tensor(pf)[None], torch.as_tensor(pm)[None], lam,
                          center=torch.zeros(3, dtype=torch.float64), scale=n / 2)
            exact = tps.map_points(world)[0]
            t0 = time.perf_counter()
            sample_field(tps, (n, n, n), affine, stride=1)
            t_exact = time.perf_counter() - t0
            for s in args.strides:
                t0 = time.perf_counter()
                field = sample_field(tps, (n, n, n), affine, stride=s)
                t_s = time.perf_counter() - t0
                err = (field.map_points(world.float()).double()[0] - exact).norm(dim=1)[head]
                rows.append((k, lam, s, float(err.max()), float(torch.quantile(err.float(), 0.999)),
                             float(err.mean()), t_s, t_exact))
                print(f"K={k:4d} lambda={lam:<4g} stride={s}: max {rows[-1][3]:.4f} vox, p99.9 {rows[-1][4]:.4f}, "
                      f"mean {rows[-1][5]:.5f}; {t_s:.1f} s vs exact {t_exact:.1f} s", flush=True)
    table = ["| K | lambda | stride | max error (voxel) | 99.9th pct | mean | time (s) | exact time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {k} | {lam:g} | {s} | {mx:.4f} | {p:.4f} | {m:.5f} | {t:.1f} | {te:.1f} |"
              for k, lam, s, mx, p, m, t, te in rows]
    text = "\n".join(table)
    print(text)
    if args.append:
        append_section(args.append, "Dense TPS field: strided evaluation error",
                       f"{machine_line()}\n\nKeypoints in a brain-sized ellipsoid, moving = affine + "
                       f"N(0, {args.sigma} mm) noise; 1 mm grid of {n}^3; error at {args.samples:,} random "
                       f"voxels inside the head, in voxels (= mm).\n\n{text}")


if __name__ == "__main__":
    main()
