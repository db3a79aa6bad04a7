"""``keyreg demo``: register a synthetic T2-like, rotated, deformed MNI152 to the T1 template."""

from __future__ import annotations

import argparse

from ._common import add_device_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save_dir", default="./keyreg_demo_output", help="output directory")
    p.add_argument("--load_path", "--model", dest="load_path", help="model (default: the bundled default)")
    p.add_argument("--list_of_aligns", nargs="+", default=["affine", "tps_1"], metavar="ALIGN")
    p.add_argument("--seed", type=int, default=0, help="seed of the bias field, noise and deformation")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..demo import TISSUES, TRUE_ROTATION_DEG, run_demo
    from ..metrics import mean_dice
    from ..transforms import parse_aligns

    aligns = tuple(s.name for s in parse_aligns(args.list_of_aligns))
    print(f"keyreg demo: moving = MNI152 made T2-like, rotated {TRUE_ROTATION_DEG:.0f}° about an oblique axis, "
          "translated, deformed,\n"
          "             on an oblique 1.3x1.2x1.8 mm LPS grid; fixed = the MNI152 T1 template (1 mm)")
    res = run_demo(args.save_dir, model=args.load_path, device=args.device, aligns=aligns, seed=args.seed)
    cols = ["before", *res.after]
    print("\nDice on tissue labels (fixed grid)")
    print("| tissue | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for lab, name in TISSUES.items():
        vals = [res.before.get(lab, float("nan"))] + [res.after[a].get(lab, float("nan")) for a in res.after]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    means = [mean_dice(res.before)] + [mean_dice(res.after[a]) for a in res.after]
    print("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    if res.rotation_error:
        print(f"\nrotation error (angle between the fitted and the true {TRUE_ROTATION_DEG:.0f}° rotation): " +
              ", ".join(f"{k} {v:.1f}°" for k, v in res.rotation_error.items()))
    t = res.seconds
    print(f"\ntime: build pair {t['build_pair']:.1f} s, registration {t['register']:.1f} s "
          f"(keypoints {t.get('keypoints', 0):.1f} s, fit {t.get('fit', 0):.2f} s, "
          f"dense field + warp {t.get('dense_field', 0) + t.get('warp', 0):.1f} s), writing {t['write']:.1f} s")
    qc = sorted(str(p) for k, p in res.files.items() if k.endswith("/qc"))
    print(f"\noutputs in {res.output_dir.resolve()}")
    for q in qc:
        print(f"  QC figure: {q}")
    return 0
