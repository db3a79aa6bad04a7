"""``keyreg groupwise``: register a group of images to the mean of their keypoints (a template)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_device_arguments, add_exclude_argument, add_search_argument, parse_exclusions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_LIST",
                   help="a directory of .nii/.nii.gz images, a text file listing one image per line, or the images")
    p.add_argument("--segs", nargs="+", metavar="DIR_OR_LIST",
                   help="label maps: a directory (same file names as the images), a list file, or the files in order")
    p.add_argument("--load_path", "--model", dest="load_path", help="model (bundled name or file; default: bundled)")
    p.add_argument("--align", default="affine", help="rigid, affine or tps_<lambda> (default affine)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="stop when no mean keypoint moves more than this (mm, default 0.01)")
    p.add_argument("--max_iterations", type=int, default=100, help="iteration limit (default 100)")
    p.add_argument("--template_grid", help="output grid (NIfTI); default: the first image's grid, moved to the template")
    p.add_argument("--label_interp", choices=["nearest", "labelwise"], default="nearest")
    p.add_argument("--field_stride", type=int, default=None,
                   help="sub-grid stride of dense TPS fields (default: the library's, 2; 1 = exact at every voxel; at most 8)")
    p.add_argument("--save_dir", default="./groupwise_output", help="output directory (default ./groupwise_output)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (they are shown on terminals only)")
    add_exclude_argument(p)
    add_search_argument(p)
    add_device_arguments(p)


def _expand(items: list[str], what: str) -> list[Path]:
    """A directory -> its NIfTI files; a non-NIfTI file -> the paths it lists (relative to it); else the files."""
    from ..errors import ImageIOError
    from ..io import is_nifti_path
    from ..pairing import list_nifti

    if len(items) == 1:
        p = Path(items[0])
        if p.is_dir():
            return list_nifti(p)
        if p.is_file() and not is_nifti_path(p):
            try:
                lines = [ln.strip() for ln in p.read_text().splitlines()]
            except (OSError, UnicodeError) as e:
                raise ImageIOError(f"{p}: cannot read the list of {what} ({e})") from None
            paths = [Path(ln) if Path(ln).is_absolute() else p.parent / ln
                     for ln in lines if ln and not ln.startswith("#")]
            if not paths:
                raise ImageIOError(f"{p}: the list of {what} is empty")
            return paths
    return [Path(x) for x in items]


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, ImageIOError
    from ..groupwise import groupwise
    from ..transforms import DEFAULT_FIELD_STRIDE

    images = _expand(args.inputs, "images")
    segs = None
    if args.segs:
        if len(args.segs) == 1 and Path(args.segs[0]).is_dir():
            segs = [Path(args.segs[0]) / img.name for img in images]
            missing = [s for s in segs if not s.exists()]
            if missing:
                raise ImageIOError(f"{missing[0]}: no label map for image {missing[0].name} "
                                   f"({len(missing)} missing in {args.segs[0]})")
        else:
            segs = _expand(args.segs, "label maps")
    if args.max_iterations < 1 or not args.tolerance > 0:
        raise ConfigError("--max_iterations must be >= 1 and --tolerance > 0")
    res = groupwise(images, model=args.load_path, align=args.align, segs=segs, save_dir=args.save_dir,
                    tolerance=args.tolerance, max_iterations=args.max_iterations,
                    template_grid=args.template_grid, label_interp=args.label_interp,
                    field_stride=DEFAULT_FIELD_STRIDE if args.field_stride is None else args.field_stride, device=args.device, use_amp=args.use_amp,
                    orientation_search=args.orientation_search,
                    exclude_keypoints=parse_exclusions(args.exclude_keypoints), progress=not args.no_progress and sys.stderr.isatty())
    s = res.metrics["summary"]
    state = "converged" if s["converged"] else "did NOT converge"
    left_out = s["keypoints_left_out"]
    print(f"{len(images)} images, {len(res.fit.template_keypoints)} keypoints in the fit"
          f"{f' ({len(left_out)} left out by --exclude_keypoints or the model default)' if left_out else ''}, "
          f"{s['align']}: {state} after {s['iterations']} iteration(s) (last mean shift {res.fit.shifts[-1]:.3g} mm)")
    if "pairwise_dice_mean" in s:
        print(f"pairwise Dice of the label maps: {s['pairwise_dice_before_mean']:.4f} ± "
              f"{s['pairwise_dice_before_std']:.4f} before (on the first image's grid), "
              f"{s['pairwise_dice_mean']:.4f} ± {s['pairwise_dice_std']:.4f} aligned")
    print(f"template, per-image outputs and metrics in {res.save_dir}")
    if not s["converged"]:
        print(f"warning: the mean keypoints still moved {res.fit.shifts[-1]:.3g} mm at the last iteration",
              file=sys.stderr)
    return 0
