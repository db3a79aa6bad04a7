"""``keyreg apply``: resample an image or label map, or map points, through saved transform(s)."""

from __future__ import annotations

import argparse
from pathlib import Path

POINT_SUFFIXES = (".csv", ".json", ".fcsv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="image or label map (.nii/.nii.gz) in the moving space, or points "
                                 "(.csv, .mrk.json, .fcsv; world coordinates)")
    p.add_argument("-t", "--transform", action="append", required=True, metavar="T",
                   help="4x4 matrix .txt, ITK .tfm/.txt, ANTs .mat, .lta, displacement field .nii.gz, tps.json or "
                        "an align output directory; repeat to compose: -t T1 -t T2 resamples once through "
                        "T1(T2(p)) (antsApplyTransforms order: the transform nearest the moving image first)")
    p.add_argument("-o", "--output", required=True, help="output .nii/.nii.gz, or .csv/.mrk.json/.fcsv for points")
    p.add_argument("-r", "--reference", help="output grid (NIfTI); default: the fixed grid recorded with the last "
                                             "transform (field grid, LTA dst, tps.json, align directory)")
    p.add_argument("--labels", action="store_true", help="the input is a label map (ids never blended)")
    p.add_argument("--interp", choices=["linear", "cubic", "nearest", "labelwise"],
                   help="images: linear (default), cubic, nearest; labels: nearest (default), labelwise")
    p.add_argument("--points_direction", choices=["moving_to_fixed", "fixed_to_moving"], default="moving_to_fixed",
                   help="points: moving_to_fixed (default) maps moving-space points into the fixed space with the "
                        "INVERSE of the stored moving_from_fixed transform (so they follow the warped image); "
                        "fixed_to_moving applies the transform itself")
    p.add_argument("--csv_space", choices=["RAS", "LPS"], default=None,
                   help="frame of plain x,y,z CSV columns (default RAS; x_ras/x_lps columns say their own frame, "
                        "and --csv_space must agree with it)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] for resampling")
    p.add_argument("--pad_value", type=float, default=None,
                   help="image intensity outside the input (default: 0, or the input's minimum when its background "
                        "is negative, e.g. -1024 for CT air); label maps get 0")


def _is_points(path: Path) -> bool:
    return path.name.lower().endswith(POINT_SUFFIXES)


def run(args: argparse.Namespace) -> int:
    from ..apply import apply_transform, load_saved_transform, transform_points
    from ..atomic import check_not_overwriting
    from ..errors import ConfigError
    from ..io import is_nifti_path, save_volume

    src, out = Path(args.input), Path(args.output)
    check_not_overwriting(out, [src, *args.transform, args.reference])
    points = _is_points(src)
    if points and not _is_points(out):
        raise ConfigError(f"{out}: points are written as .csv, .mrk.json or .fcsv")
    if not points and not is_nifti_path(out):
        raise ConfigError(f"{out}: output image name must end in .nii or .nii.gz")
    if args.labels and args.interp in ("linear", "cubic"):
        raise ConfigError(f"--interp {args.interp} would blend label ids: use nearest or labelwise with --labels")
    if not args.labels and args.interp == "labelwise":
        raise ConfigError("--interp labelwise is for label maps: add --labels")
    if points:
        image_only = [opt for opt, given in (("--labels", args.labels), ("--interp", args.interp is not None),
                                             ("-r", args.reference is not None),
                                             ("--pad_value", args.pad_value is not None)) if given]
        if image_only:
            raise ConfigError(f"{' and '.join(image_only)}: for images and label maps, not for points")
    elif args.csv_space is not None:
        raise ConfigError("--csv_space is for points CSV files")
    saved = [load_saved_transform(t) for t in args.transform]
    if points:
        return _apply_points(args, src, out, saved, transform_points)
    kind = "labels" if args.labels else "image"
    vol = apply_transform(src, saved, kind=kind, interp=args.interp, reference=args.reference, device=args.device,
                          pad_value=args.pad_value)
    save_volume(vol.data, vol, out)
    mode = args.interp or ("nearest" if args.labels else "linear")
    grid = "x".join(map(str, vol.shape))
    print(f"wrote {out} ({kind}, {mode}, {len(saved)} transform(s) in one resampling, grid {grid})")
    return 0


def _apply_points(args, src: Path, out: Path, saved, transform_points) -> int:
    import numpy as np

    from ..errors import ImageContentError
    from ..formats import read_point_set, write_markups_fcsv, write_markups_json, write_points_csv

    ps = read_point_set(src, args.csv_space)
    pts, labels, weights = ps.points, ps.labels, ps.weights
    big = np.abs(pts).max(initial=0.0)
    if big > 1e6:
        raise ImageContentError(f"{src}: coordinates up to {big:.3g} mm are not world positions of an image")
    mapped, residual = transform_points(pts, saved, direction=args.points_direction)
    if not np.all(np.isfinite(mapped)):
        bad = int((~np.isfinite(mapped).all(axis=1)).sum())
        raise ImageContentError(f"{src}: {bad} point(s) map to non-finite coordinates (points far outside any "
                                f"image, e.g. 1e300 mm?)")
    name = out.name.lower()
    if name.endswith(".csv"):
        write_points_csv(out, mapped, labels=labels, weights=weights)
    elif name.endswith(".fcsv"):
        write_markups_fcsv(out, mapped, labels=labels)
    else:
        write_markups_json(out, mapped, labels=labels)
    res = f"; inverse residual max {residual.max():.2e} mm" if len(residual) and residual.max() > 0 else ""
    print(f"wrote {out} ({len(mapped)} points, {args.points_direction}{res})")
    return 0
