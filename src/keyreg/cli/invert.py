"""``keyreg invert``: exact inverse of a linear transform; approximate/numerical inverse of a TPS or field."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = "4x4 matrix .txt, ITK .tfm/.txt, ANTs .mat, .lta, displacement field .nii.gz, tps.json or an align output directory"
    p.add_argument("transform", nargs="?", help=what)
    p.add_argument("-t", "--transform", dest="transform_option", metavar="T",
                   help="the same, as `keyreg apply` takes it (give it once, either way)")
    p.add_argument("-o", "--output", help="output file; its suffix decides the format (default: <name>_inverse "
                                          "next to the input, in the input's format)")
    p.add_argument("--method", choices=["auto", "swap", "field"], default="auto",
                   help="TPS: swap (default) refits with fixed and moving keypoints swapped (approximate); field "
                        "computes a numerical inverse displacement field. Fields are inverted numerically, except "
                        "a refined align directory (<align>+<stage>), whose stored inverse_warp.nii.gz is used "
                        "unless --method field")
    p.add_argument("--fixed", help="the original fixed image (its grid), when the transform file does not record it")
    p.add_argument("--moving", help="the original moving image (its grid): where a numerical inverse is sampled")
    p.add_argument("--iterations", type=int, default=50, help="fixed-point iterations (default 50)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="fixed-point stopping residual in mm (default 1e-3)")


def run(args: argparse.Namespace) -> int:
    from ..apply import invert_saved_transform, load_saved_transform, save_inverse
    from ..atomic import check_not_overwriting
    from ..errors import ConfigError
    from ..io import read_grid

    given = [t for t in (args.transform, args.transform_option) if t is not None]
    if len(given) != 1:
        raise ConfigError("give the transform to invert once: `keyreg invert T` or `keyreg invert -t T`")
    if args.iterations < 1 or not args.tolerance > 0:
        raise ConfigError("--iterations must be >= 1 and --tolerance > 0")
    if args.output:
        check_not_overwriting(args.output, [given[0], args.fixed, args.moving])
    st = load_saved_transform(given[0])
    if args.fixed:
        st.fixed_grid = read_grid(args.fixed)
    if args.moving:
        st.moving_grid = read_grid(args.moving)
    inv = invert_saved_transform(st, method=args.method, iterations=args.iterations, tolerance=args.tolerance)
    out = save_inverse(inv, st, args.output)
    if inv.exact:
        print(f"wrote {out} (exact inverse)")
        return 0
    how = {"swapped_keypoints": "approximate: TPS refitted with swapped keypoints",
           "fixed_point": "numerical: fixed-point iteration",
           "stored": "the refinement's stored inverse, inverse_warp.nii.gz"}[inv.method]
    print(f"wrote {out} ({how}); residual |T(inverse(q)) - q| over {inv.points} points: "
          f"max {inv.residual_max_mm:.4g} mm, mean {inv.residual_mean_mm:.4g} mm")
    if inv.excluded:
        print(f"{inv.excluded} grid points whose inverse falls at or beyond the field's border, or whose iteration "
              f"went there without converging (no inverse there), are not counted; their residual reaches "
              f"{inv.excluded_max_mm:.4g} mm")
    return 0
