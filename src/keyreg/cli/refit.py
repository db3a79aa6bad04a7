"""``keyreg refit``: the outputs of ``keyreg register`` from (hand-edited) keypoint files, without the network."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs")
    io.add_argument("--fixed", required=True, help="fixed image")
    io.add_argument("--moving", required=True, help="moving image")
    io.add_argument("--fixed_keypoints", required=True,
                    help="fixed keypoints: keyreg CSV, Slicer .mrk.json or .fcsv (e.g. pairs/<pair>/keypoints_fixed.mrk.json)")
    io.add_argument("--moving_keypoints", required=True, help="moving keypoints (same formats)")
    io.add_argument("--fixed_seg", help="fixed segmentation (for Dice)")
    io.add_argument("--moving_seg", help="moving segmentation")

    a = p.add_argument_group("registration")
    a.add_argument("--list_of_aligns", nargs="+", default=["affine", "tps_0"], metavar="ALIGN",
                   help="rigid, affine, tps_<lambda>; default: affine tps_0")
    a.add_argument("--list_of_metrics", nargs="+", default=None, metavar="METRIC",
                   help="as for keyreg register (default: mse, plus harddice with segmentations)")
    a.add_argument("--robust", action="store_true", help="robust fits (see keyreg register --robust)")
    a.add_argument("--no_weights", action="store_true", help="ignore the weight column of keypoint CSVs")
    a.add_argument("--label_interp", choices=["nearest", "labelwise"], default="nearest")
    a.add_argument("--field_stride", type=int, default=None, help="sub-grid stride of the dense TPS field "
                   "(default 2; 1 = exact at every voxel; at most 8)")
    a.add_argument("--pad_value", type=float, default=None, help="intensity outside the moving image")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")

    o = p.add_argument_group("outputs")
    o.add_argument("--save_dir", default="./refit_output", help="output directory (default ./refit_output)")
    o.add_argument("--no_images", action="store_true", help="do not write warped images (transforms and tables only)")
    o.add_argument("--visualize", action="store_true", help="QC figures and the residual plot")


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_dir, atomic_write_text, check_inputs_outside
    from ..batch import json_clean, write_batch_report, write_metric_tables
    from ..metrics import before_metrics, parse_metrics
    from ..pairing import pair_name
    from ..refit import refit

    name = pair_name(Path(args.moving), Path(args.fixed))
    pair_dir = Path(args.save_dir) / "pairs" / name
    check_inputs_outside(pair_dir, [args.fixed, args.moving, args.fixed_keypoints, args.moving_keypoints,
                                    args.fixed_seg, args.moving_seg])
    both = bool(args.fixed_seg) and bool(args.moving_seg)
    if bool(args.fixed_seg) != bool(args.moving_seg):
        print("warning: a segmentation is ignored without the other one", file=sys.stderr)
    metrics = parse_metrics(args.list_of_metrics or (["mse", "harddice"] if both else ["mse"]))
    reg, matched = refit(args.moving, args.fixed, args.fixed_keypoints, args.moving_keypoints,
                         aligns=args.list_of_aligns, moving_seg=args.moving_seg if both else None,
                         fixed_seg=args.fixed_seg if both else None, robust=args.robust,
                         use_weights=not args.no_weights, device=args.device, label_interp=args.label_interp,
                         field_stride=args.field_stride, pad_value=args.pad_value)
    # with segmentations first "none": the same metrics before registration, as keyreg register writes
    before = before_metrics(metrics) if both else []
    per_align = {"none": reg.evaluate_before(before, label_interp=args.label_interp,
                                             pad_value=args.pad_value)} if before else {}
    per_align.update(reg.evaluate(metrics))
    conf = reg.confidence
    rows = [{"pair": name, "moving": str(args.moving), "fixed": str(args.fixed), "align": align, **conf, **vals}
            for align, vals in per_align.items()]
    save_dir = Path(args.save_dir)
    with atomic_dir(pair_dir) as tmp:
        reg.save(tmp, write_images=not args.no_images, visualize=args.visualize)
        atomic_write_text(tmp / "refit.json", json.dumps(json_clean({
            "fixed_keypoints": str(args.fixed_keypoints), "moving_keypoints": str(args.moving_keypoints),
            "used": matched.labels, "left_out": matched.left_out, "robust": args.robust,
            "rows": rows}), indent=1) + "\n")
    tables = write_metric_tables(save_dir, rows)
    thumbs = {}
    first = next(iter(reg), None)
    if first is not None and first.warped is not None:
        from ..report import overlay_thumbnail

        thumbs[name] = overlay_thumbnail(reg.fixed, first.warped)
    report = write_batch_report(save_dir, rows, [], thumbs, "keyreg refit from keypoint files")
    from ..batch import format_summary

    print(format_summary(rows, list(per_align)))
    print(f"\n{len(matched.labels)} keypoint pair(s) used" + _left_out_summary(matched.left_out))
    print(f"confidence {conf['confidence']:.3f} ({conf['flag']})")
    print(f"\noutputs in {pair_dir}; metrics in {tables[0]}; report: {report}")
    return 0


def _left_out_summary(left_out: dict[str, str], listed: int = 8) -> str:
    """``; left out: A (why), B (why)``; beyond ``listed`` points, a count per reason (refit.json has them all)."""
    if not left_out:
        return ""
    if len(left_out) <= listed:
        return f"; left out: {', '.join(f'{k} ({v})' for k, v in left_out.items())}"
    reasons: dict[str, int] = {}
    for why in left_out.values():
        reasons[why] = reasons.get(why, 0) + 1
    return f"; left out: {', '.join(f'{n} {why}' for why, n in reasons.items())} (listed in refit.json)"
