"""``keyreg register``: the official ``register.py`` flags, in physical space, for files or directories."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._common import add_device_arguments, format_summary, write_metric_tables


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
    m.add_argument("--half_resolution", action="store_true", help="run the network at half its resolution")
    m.add_argument("--weighted_kp_align", nargs="?", const="power", default=None, choices=["power", "none"],
                   help="weight keypoints by heatmap power in the fits (default: the model's setting)")
    add_device_arguments(m)

    a = p.add_argument_group("registration")
    a.add_argument("--list_of_aligns", nargs="+", default=["affine", "tps_0"], metavar="ALIGN",
                   help="rigid, affine, tps_<lambda> (e.g. tps_0 tps_1 tps_10); default: affine tps_0")
    a.add_argument("--list_of_metrics", nargs="+", default=None, metavar="METRIC",
                   help="mse ncc harddice softdice hausd jdstd jdlessthan0 "
                        "(default: mse, plus harddice with segmentations)")
    a.add_argument("--label_interp", choices=["nearest", "labelwise"], default="nearest",
                   help="resampling of segmentations (ids are never blended)")
    a.add_argument("--field_stride", type=int, default=None,
                   help="sub-grid stride for the dense TPS field (default 2; 1 = exact at every voxel)")

    o = p.add_argument_group("outputs")
    o.add_argument("--save_dir", default="./register_output", help="output directory (default ./register_output)")
    o.add_argument("--save_eval_to_disk", action="store_true",
                   help="write warped images/segmentations, transforms and keypoints per pair and align")
    o.add_argument("--visualize", action="store_true", help="write a QC PNG per pair and align")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..api import Timer, detect_keypoints, register, resolve_device, resolve_model
    from ..errors import KeyregError
    from ..io import load_volume
    from ..metrics import parse_metrics
    from ..pairing import build_pairs
    from ..transforms import DEFAULT_FIELD_STRIDE, parse_aligns

    aligns = [s.name for s in parse_aligns(args.list_of_aligns)]
    pairs, warnings = build_pairs(args.moving, args.fixed, args.moving_seg, args.fixed_seg,
                                  all_pairs=args.all_pairs)
    has_seg = any(p.moving_seg and p.fixed_seg for p in pairs)
    metrics = parse_metrics(args.list_of_metrics or (["mse", "harddice"] if has_seg else ["mse"]))
    stride = args.field_stride or DEFAULT_FIELD_STRIDE
    if stride < 1:
        from ..errors import ConfigError
        raise ConfigError(f"--field_stride must be >= 1, got {stride}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    device = resolve_device(args.device)
    timer = Timer()
    with timer("model"):
        net = resolve_model(args.load_path, device, half_resolution=args.half_resolution,
                            backbone=args.backbone, num_keypoints=args.num_keypoints)
    weighted = None if args.weighted_kp_align is None else args.weighted_kp_align == "power"
    save_dir = Path(args.save_dir)
    print(f"keyreg register: {len(pairs)} pair(s), model {net.config.name} "
          f"({net.config.architecture.describe()}), aligns {' '.join(aligns)}, device {device}",
          file=sys.stderr)

    cache: dict[Path, object] = {}
    rows: list[dict] = []
    failures: list[tuple[str, str]] = []
    single = len(pairs) == 1  # a single pair fails with one line (exit 2); a batch skips bad pairs
    bar = tqdm(pairs, desc="pairs", unit="pair", file=sys.stderr, dynamic_ncols=True, disable=single)
    for pair in bar:
        start = time.perf_counter()
        try:
            with timer("load"):
                fixed = load_volume(pair.fixed, kind="image")
                moving = load_volume(pair.moving, kind="image")
                fixed_seg = None if not (pair.fixed_seg and pair.moving_seg) else \
                    load_volume(pair.fixed_seg, kind="labels")
                moving_seg = None if fixed_seg is None else load_volume(pair.moving_seg, kind="labels")
            need = [p for p, v in ((pair.fixed, fixed), (pair.moving, moving)) if p not in cache]
            if need:
                with timer("keypoints"):
                    vols = {pair.fixed: fixed, pair.moving: moving}
                    for path, kp in zip(need, detect_keypoints(net, [vols[p] for p in need], device=device,
                                                               use_amp=args.use_amp)):
                        cache[path] = kp
            reg = register(moving, fixed, model=net, aligns=aligns, moving_seg=moving_seg, fixed_seg=fixed_seg,
                           weighted=weighted, device=device, label_interp=args.label_interp,
                           field_stride=stride, keypoints=(cache[pair.fixed], cache[pair.moving]))
            for k, v in reg.timings.items():
                if k not in ("load", "model"):
                    timer.seconds[k] = timer.seconds.get(k, 0.0) + v
            with timer("metrics"):
                per_align = reg.evaluate(metrics)
            if args.save_eval_to_disk or args.visualize:
                with timer("write"):
                    reg.save(save_dir / "pairs" / pair.name, write_images=args.save_eval_to_disk,
                             visualize=args.visualize)
        except KeyregError as e:
            if single:
                raise
            failures.append((pair.name, str(e)))
            tqdm.write(f"FAILED {pair.name}: {e}", file=sys.stderr)
            continue
        for align, vals in per_align.items():
            rows.append({"pair": pair.name, "moving": str(pair.moving), "fixed": str(pair.fixed),
                         "align": align, **vals})
        summary = "  ".join(f"{a}: " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()
                                                if isinstance(v, float)) for a, vals in per_align.items())
        tqdm.write(f"{pair.name} ({time.perf_counter() - start:.1f} s)  {summary}", file=sys.stderr)
    bar.close()

    if rows:
        paths = write_metric_tables(save_dir, rows, failures)
        print(format_summary(rows, aligns))
        print(f"\nmetrics written to {paths[0]} and {paths[1]}")
        if args.save_eval_to_disk or args.visualize:
            print(f"per-pair outputs in {save_dir / 'pairs'}")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in timer.seconds.items())
    print(f"time per stage (all pairs): {stages}", file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} of {len(pairs)} pair(s) failed:", file=sys.stderr)
        for name, msg in failures:
            print(f"  {name}: {msg}", file=sys.stderr)
        return 1
    return 0
