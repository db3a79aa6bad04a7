"""Error and CPU time of the dense TPS field at strides 1, 2 and 4 on a real 1 mm pair (issue 13).

The pair: two subjects of ``../shared/data/labelmaps`` (256^3, 1 mm; default ``--fixed 0 --moving 1``),
a synthetic T1-like contrast of the fixed label map and a T2-like contrast of the moving one (cached
under ``.bench/speed_1mm/``).  Keypoints from the default model (``keyreg.Registrar``, CPU), then for
each TPS align and stride ``s`` the dense field is sampled every ``s`` voxels and trilinearly
interpolated to the full grid (what the warp uses), and compared with the exact float32 TPS at every
voxel (stride 1):

* displacement error ``|u_s(p) - u_1(p)|`` in mm: max, 99.9th, 99th percentile and mean, over the
  whole grid and inside the head (fixed label > 0);
* the moving segmentation warped with each field: the fraction of voxels whose label differs from
  the stride-1 warp, and the change of the mean Dice against the fixed segmentation (and the largest
  change of any label's Dice);
* ``jdstd`` on the full grid;
* CPU time (``time.process_time``: user + system of this process, all threads) and wall time of
  sampling the field (stride > 1: + interpolation to the full grid).

The machine is shared: compare the CPU seconds and ratios of the same run, not absolute walls.

    python benchmarks/speed_field_stride.py [--aligns tps_0 tps_10] [--strides 2 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELMAPS = ROOT.parent / "shared" / "data" / "labelmaps"
CACHE = ROOT / ".bench" / "speed_1mm"


def build_inter_subject(fixed_i: int, moving_i: int) -> dict[str, Path]:
    """Synthetic T1 of label map ``fixed_i`` and T2 of label map ``moving_i`` (cached); with their maps."""
    name = f"inter_{fixed_i:02d}_{moving_i:02d}"
    paths = {k: CACHE / f"{name}_{k}.nii.gz" for k in ("fixed", "moving", "fixed_seg", "moving_seg")}
    if all(p.exists() for p in paths.values()):
        return paths
    import nibabel as nib
    import torch

    from keyreg.train.synth import IntensityAugment, synthesize_image

    src = sorted(LABELMAPS.glob("*.nii*"))
    if len(src) <= max(fixed_i, moving_i):
        raise SystemExit(f"need {max(fixed_i, moving_i) + 1} label maps under {LABELMAPS}")
    aug = IntensityAugment(resolution_prob=0.0, skull_strip_prob=0.0)
    g = torch.Generator().manual_seed(0)
    CACHE.mkdir(parents=True, exist_ok=True)
    for role, i, contrast in (("fixed", fixed_i, "t1"), ("moving", moving_i, "t2")):
        img = nib.load(src[i])
        labels = np.asarray(img.dataobj).round().astype(np.int16)
        lab_t = torch.from_numpy(labels.astype(np.int64))[None, None]
        data = synthesize_image(lab_t, g, contrast=contrast, augment=aug, skull_strip=False)[0, 0].numpy()
        nib.save(nib.Nifti1Image(data, img.affine), str(paths[role]))
        nib.save(nib.Nifti1Image(labels, img.affine), str(paths[f"{role}_seg"]))
    return paths


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixed", type=int, default=0, help="index of the fixed label map (sorted names)")
    p.add_argument("--moving", type=int, default=1, help="index of the moving label map")
    p.add_argument("--aligns", nargs="+", default=["tps_0", "tps_10"])
    p.add_argument("--strides", type=int, nargs="+", default=[2, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="model (default: the bundled default)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    from keyreg.metrics import dice_per_label, jacobian_determinant
    from keyreg.pipeline import Registrar
    from keyreg.results import warp_volumes
    from keyreg.transforms import sample_field

    paths = build_inter_subject(args.fixed, args.moving)
    reg = Registrar(args.model, device="cpu", aligns=tuple(args.aligns))
    r = reg.register(paths["moving"], paths["fixed"], moving_seg=paths["moving_seg"], fixed_seg=paths["fixed_seg"],
                     warp=False)
    fixed, fseg, mseg = r.fixed, r.fixed_seg, r.moving_seg
    head = np.asarray(fseg.data) > 0
    print(f"pair {paths['fixed'].name} <- {paths['moving'].name}: {reg.describe()}; "
          f"{len(r.fit_keypoints[0])} keypoints in the fits", flush=True)
    rows = []
    for res in r:
        tps = res.transform
        exact, c1, w1 = timed(lambda: sample_field(tps, fixed.shape, fixed.affine, stride=1))
        u1 = exact.displacement[0]
        mag = u1.norm(dim=0).numpy()
        seg1 = warp_volumes(None, mseg, fixed, exact)[1].data
        d1 = dice_per_label(seg1, fseg.data)
        jd1 = float(jacobian_determinant(exact).std())
        print(f"{res.name}: |u| max {mag.max():.2f} mm, mean in head {mag[head].mean():.2f} mm; stride 1: "
              f"{c1:.1f} CPU s, {w1:.1f} s wall; mean Dice {np.mean(list(d1.values())):.4f}; jdstd {jd1:.4f}",
              flush=True)
        rows.append((res.name, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, jd1, c1, w1))
        for s in args.strides:
            def coarse_then_full(s=s):
                return sample_field(tps, fixed.shape, fixed.affine, stride=s).upsample(fixed.shape, fixed.affine)

            full, cs, ws = timed(coarse_then_full)
            err = (full.displacement[0] - u1).norm(dim=0).numpy()
            e_head = err[head]
            q = [float(np.quantile(e_head, x)) for x in (0.99, 0.999)]
            seg_s = warp_volumes(None, mseg, fixed, full)[1].data
            changed = float(np.mean(seg_s != seg1))
            ds = dice_per_label(seg_s, fseg.data)
            diff = [abs(ds.get(k, 0.0) - v) for k, v in d1.items()]
            mean_change = float(np.mean(list(ds.values())) - np.mean(list(d1.values())))
            jds = float(jacobian_determinant(full).std())
            rows.append((res.name, s, float(err.max()), float(e_head.max()), q[1], q[0], float(e_head.mean()),
                         changed, mean_change, max(diff), 0, jds, cs, ws))
            print(f"{res.name} stride {s}: error max {err.max():.4f} mm (head {e_head.max():.4f}), p99.9 {q[1]:.4f}, "
                  f"p99 {q[0]:.4f}, mean {e_head.mean():.5f}; labels changed {changed:.2e}; mean Dice change "
                  f"{mean_change:+.2e}, largest label change {max(diff):.2e}; jdstd {jds:.4f} (stride 1 {jd1:.4f}); "
                  f"{cs:.1f} CPU s, {ws:.1f} s wall", flush=True)
            del full, err
    print(f"\nMachine: {platform.node() or 'vm'}, {os.cpu_count()} cores, {args.threads} threads; torch "
          f"{torch.__version__}; {time.strftime('%Y-%m-%d')}.  Command: `python benchmarks/{Path(__file__).name} "
          f"{' '.join(sys.argv[1:])}`\n")
    print("| align | stride | max error, grid (mm) | max, head | p99.9, head | p99, head | mean, head | "
          "labels changed | mean Dice change | largest label Dice change | jdstd | CPU s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (a, s, mx, mh, p999, p99, mean, ch, dm, dl, _, jd, c, w) in rows:
        if s == 1:
            print(f"| {a} | 1 (exact) | — | — | — | — | — | — | — | — | {jd:.4f} | {c:.1f} | {w:.1f} |")
        else:
            print(f"| {a} | {s} | {mx:.4f} | {mh:.4f} | {p999:.4f} | {p99:.4f} | {mean:.5f} | {ch:.1e} | "
                  f"{dm:+.1e} | {dl:.1e} | {jd:.4f} | {c:.1f} | {w:.1f} |")


if __name__ == "__main__":
    main()
