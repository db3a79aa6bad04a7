"""Seconds of the segmentation metrics on a 256^3 1 mm label map (issue 13): harddice and hausd for a
map against itself shifted by 1 and by 3 voxels along each axis (what a good and a fair registration
leave) and against the rotated moving map of ``benchmarks/speed_1mm.py``'s pair as it is (an
unregistered pair); jdstd of a smooth random displacement field on the same grid.

    python benchmarks/speed_metrics.py [--src OTHER_TREE/src] [--threads 1] [--repeats 2]

``--src`` imports keyreg from another checkout (e.g. a ``git worktree`` of an older commit) to compare
the same cases before and after a change; the values of both are printed as a checksum (the mean over
labels), so a change that alters values shows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=ROOT / "src", help="keyreg source tree to time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per case")
    args = p.parse_args()
    sys.path.insert(0, str(args.src))
    sys.path.insert(1, str(ROOT / "benchmarks"))
    import numpy as np
    import torch

    import keyreg
    from keyreg.io import load_volume
    from keyreg.metrics import dice_per_label, hausdorff95_per_label, jacobian_determinant_stats, mean_dice
    from keyreg.transforms.field import DisplacementField
    from speed_1mm import CACHE, build_pair

    torch.set_num_threads(args.threads)
    paths = build_pair(CACHE)
    fixed = load_volume(paths["fixed_seg"])
    a = np.rint(np.asarray(fixed.data)).astype(np.int16)
    moving = np.rint(np.asarray(load_volume(paths["moving_seg"]).data)).astype(np.int16)
    cases = {"shifted 1 voxel": np.roll(a, (1, -1, 1), axis=(0, 1, 2)),
             "shifted 3 voxels": np.roll(a, (3, -2, 2), axis=(0, 1, 2)),
             "unregistered (rotated 15°)": moving}

    def best(fn):
        times, value = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t)
        return min(times), value

    print(f"keyreg from {Path(keyreg.__file__).parent}; grid {a.shape}; torch threads {args.threads}; "
          f"best of {args.repeats}")
    print("| metric | case | seconds | value (mean over labels) |")
    print("|---|---|---|---|")
    for case, b in cases.items():
        for name, fn in (("harddice", lambda: dice_per_label(b, a)),
                         ("hausd", lambda: hausdorff95_per_label(b, a, fixed.spacing))):
            secs, per = best(fn)
            print(f"| {name} | {case} | {secs:.2f} | {mean_dice(per):.4f} |", flush=True)
    g = torch.Generator().manual_seed(0)
    disp = torch.nn.functional.interpolate(torch.randn(1, 3, 9, 9, 9, generator=g) * 5, size=a.shape,
                                           mode="trilinear", align_corners=True)
    field = DisplacementField(disp, torch.as_tensor(fixed.affine))
    secs, stats = best(lambda: jacobian_determinant_stats(field))
    print(f"| jdstd | smooth random field | {secs:.2f} | {stats['jdstd']:.4f} |")


if __name__ == "__main__":
    main()
