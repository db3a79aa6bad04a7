"""``keyreg register``: the official ``register.py`` flags, in physical space, for files or directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_device_arguments, add_exclude_argument, add_search_argument, parse_exclusions


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs")
    io.add_argument("--moving", required=True, help="moving image (.nii/.nii.gz) or directory of images")
    io.add_argument("--fixed", required=True, help="fixed image or directory (paired by identical file names)")
    io.add_argument("--moving_seg", help="moving segmentation (file or directory, same names as images)")
    io.add_argument("--fixed_seg", help="fixed segmentation (file or directory)")
    io.add_argument("--all_pairs", action="store_true",
                    help="register every moving image to every fixed image (keypoints detected once per image)")

    m = p.add_argument_group("model")
    m.add_argument("--load_path", "--model", dest="load_path",
                   help="model: bundled name (see `keyreg models`), keyreg .safetensors/.json, or an official "
                        ".h5/.pth.tar checkpoint (default: the bundled default model)")
    m.add_argument("--num_keypoints", type=int, help="check that the model has this many keypoints")
    m.add_argument("--backbone", choices=["conv", "unet", "truncatedunet"], help="check the model's backbone")
    m.add_argument("--half_resolution", action="store_true", help="run the network at half its resolution (KeyMorph-style models; not anatomical ones such as keyreg-anatomy)")
    m.add_argument("--weighted_kp_align", nargs="?", const="power", default=None, choices=["power", "none"],
                   help="weight keypoints by heatmap power in the fits (default: the model's setting)")
    add_search_argument(m)
    add_device_arguments(m)

    a = p.add_argument_group("registration")
    a.add_argument("--list_of_aligns", nargs="+", default=["affine", "tps_0"], metavar="ALIGN",
                   help="rigid, affine, tps_<lambda> (e.g. tps_0 tps_1 tps_10); default: affine tps_0")
    a.add_argument("--list_of_metrics", nargs="+", default=None, metavar="METRIC",
                   help="mse ncc harddice braindice softdice hausd jdstd jdlessthan0 "
                        "(default: mse, plus harddice with segmentations)")
    a.add_argument("--label_interp", choices=["nearest", "labelwise"], default="nearest",
                   help="resampling of segmentations (ids are never blended)")
    a.add_argument("--field_stride", type=int, default=None,
                   help="sub-grid stride of the dense TPS field: the TPS is evaluated every STRIDE voxels and "
                        "interpolated trilinearly in between (default 2: 8x fewer kernel evaluations, error under "
                        "0.1 mm and Dice within 0.001 of exact at 1 mm, measured in docs/benchmarks.md; 1 = exact "
                        "at every voxel; at most 8)")
    add_exclude_argument(a)
    a.add_argument("--robust", action="store_true",
                   help="robust fits: leave out keypoints that the other keypoints do not predict (leave-one-out "
                        "error above 4 robust standard deviations, at most half of them); a pair without such "
                        "keypoints gets exactly the ordinary fit")
    a.add_argument("--pad_value", type=float, default=None,
                   help="intensity of warped voxels that fall outside the moving image (default: 0, or the "
                        "moving image's minimum when it is negative, e.g. -1024 for CT air)")

    r = p.add_argument_group("dense refinement (README: Dense refinement)")
    r.add_argument("--refine", nargs="+", default=[], metavar="STAGE",
                   help="refine every align by dense instance optimisation on the images: affine (a 12-parameter "
                        "correction) and/or deformable (that correction, then a diffeomorphic velocity field); "
                        "each gives one more align <align>+<stage> (e.g. affine+deformable) in the tables and "
                        "outputs. A refinement that worsens the optimised similarity or the mutual information on the "
                        "fixed mask is rejected and its start kept (the console and refine.json say why)")
    r.add_argument("--fixed_mask", help="mask on the fixed grid (file, or directory with the fixed images' names): "
                                        "only its non-zero voxels drive the refinement's similarity (skull, "
                                        "electrodes, lesions left out)")
    r.add_argument("--refine_similarity", default="mind", metavar="{mind,lncc}",
                   help="mind (MIND-SSC descriptors, multi-modal; default) or lncc (local normalised "
                        "cross-correlation, same contrast)")
    r.add_argument("--refine_iterations", nargs="+", type=int, default=None, metavar="N",
                   help="deformable Adam iterations per level, coarse to fine; the number of values is the number "
                        "of levels (default 40 20 8: similarity grids of 12, 6 and 3 mm; levels after the first stop early once converged)")
    r.add_argument("--refine_reg_weight", type=float, default=None,
                   help="weight of the velocity field's smoothness (diffusion) penalty (default 1.0)")
    r.add_argument("--refine_seconds", type=float, default=None,
                   help="wall-clock budget of each refinement (one align, one stage), shared by its levels "
                        "(default: none, every iteration runs)")

    o = p.add_argument_group("outputs")
    o.add_argument("--save_dir", default="./register_output", help="output directory (default ./register_output)")
    o.add_argument("--save_eval_to_disk", action="store_true",
                   help="write warped images/segmentations, transforms and keypoints per pair and align")
    o.add_argument("--visualize", action="store_true", help="write a QC PNG per pair and align")
    o.add_argument("--skip_existing", action="store_true",
                   help="resume an interrupted batch: a pair whose directory pairs/<pair>/ is complete (its done.json, "
                        "written last, records the same inputs and options) is not redone; its metrics are reused")
    o.add_argument("--no_progress", action="store_true",
                   help="no progress bars (they are shown on terminals only)")


def run(args: argparse.Namespace) -> int:
    from ..prefetch import prefetch

    prefetch([args.fixed, args.moving, args.fixed_seg, args.moving_seg])  # inflated while torch is imported
    from ..batch import register_batch
    from ..pipeline import RegistrationOptions
    from ..transforms import DEFAULT_FIELD_STRIDE

    if bool(args.moving_seg) != bool(args.fixed_seg):
        given, missing = ("--moving_seg", "--fixed_seg") if args.moving_seg else ("--fixed_seg", "--moving_seg")
        print(f"warning: {given} is ignored without {missing} (segmentation metrics and warped "
              f"segmentations need both)", file=sys.stderr)
    options = RegistrationOptions(
        aligns=tuple(args.list_of_aligns), weighted=None if args.weighted_kp_align is None else
        args.weighted_kp_align == "power", label_interp=args.label_interp,
        field_stride=DEFAULT_FIELD_STRIDE if args.field_stride is None else args.field_stride,
        half_resolution=args.half_resolution, use_amp=args.use_amp, pad_value=args.pad_value,
        exclude_keypoints=parse_exclusions(args.exclude_keypoints), robust=args.robust, refine=tuple(args.refine),
        refine_similarity=args.refine_similarity, refine_seconds=args.refine_seconds,
        orientation_search=args.orientation_search,
        **{k: v for k, v in (("refine_iterations", args.refine_iterations),
                             ("refine_reg_weight", args.refine_reg_weight)) if v is not None})
    res = register_batch(args.moving, args.fixed, moving_seg=args.moving_seg, fixed_seg=args.fixed_seg,
                         fixed_mask=args.fixed_mask, all_pairs=args.all_pairs, model=args.load_path, device=args.device, backbone=args.backbone,
                         num_keypoints=args.num_keypoints, options=options, save_dir=args.save_dir,
                         metrics=args.list_of_metrics, save_eval_to_disk=args.save_eval_to_disk,
                         visualize=args.visualize, skip_existing=args.skip_existing,
                         progress=not args.no_progress and sys.stderr.isatty())
    return report(res, Path(args.save_dir), args.save_eval_to_disk or args.visualize)


def report(res, save_dir: Path, per_pair: bool) -> int:
    """Print what a batch did; the exit status: 1 if a pair failed, else 0."""
    from ..batch import format_summary

    tag = f"[rank {res.rank}/{res.world}] " if res.world > 1 else ""
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in res.seconds.items())
    print(f"{tag}time per stage ({res.mine} pair(s)): {stages}", file=sys.stderr)
    if res.rank != 0:
        return 1 if res.failures else 0
    if res.skipped:
        print(f"{res.skipped} pair(s) were already complete and skipped (--skip_existing)", file=sys.stderr)
    if res.rows:
        print(format_summary(res.rows, res.aligns))
    if res.rows:
        from ..qc import DETECTION_DRIFT_LIMIT_MM, DETECTION_RESIDUAL_LIMIT_MM
        from ..transforms.residuals import CONFIDENCE_THRESHOLD

        flagged = res.flagged
        n_pairs = len({r["pair"] for r in res.rows})
        limits = [f"confidence below {CONFIDENCE_THRESHOLD:g}"]
        if any("detection_residual_mm" in r for r in res.rows):
            limits.append(f"detection_residual_mm above {DETECTION_RESIDUAL_LIMIT_MM:g}")
        if any("detection_drift_mm" in r for r in res.rows):
            limits.append(f"detection_drift_mm above {DETECTION_DRIFT_LIMIT_MM:g}")
        why = ", ".join(limits[:-1]) + (" or " if len(limits) > 1 else "") + limits[-1]
        reason = {r["pair"]: r.get("flag_reason", "") for r in res.rows}
        shown = [f"{p} ({reason[p]})" if reason.get(p) else p for p in flagged[:20]]
        print(f"\n{why}, flagged check: {len(flagged)} of {n_pairs} pair(s)"
              + (": " + ", ".join(shown) + (" ..." if len(flagged) > 20 else "") if flagged else ""))
    notes = [r for r in res.rows if r.get("refine_safeguard")]
    if notes:  # the refinement safeguard: a kept start (or a Dice drop it missed) is never silent
        print(f"\nrefinement safeguard: {len(notes)} note(s)", file=sys.stderr)
        for r in notes[:50]:
            print(f"  {r['pair']} {r['align']}: {r['refine_safeguard']}", file=sys.stderr)
    if res.tables:
        print(f"\nmetrics written to {res.tables[0]} and {res.tables[1]}")
    if res.report:
        print(f"report: {res.report}")
    if res.rows and per_pair:
        print(f"per-pair outputs in {save_dir / 'pairs'}")
    if res.failures:
        print(f"\n{len(res.failures)} of {res.pairs} pair(s) failed:", file=sys.stderr)
        for name, msg in res.failures:
            print(f"  {name}: {msg}", file=sys.stderr)
    return 1 if res.failures else 0
