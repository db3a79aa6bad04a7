"""``keyreg evaluate``: accuracy and robustness over many pairs and explicit, seeded perturbations."""

from __future__ import annotations

import argparse
import sys

from ._common import add_device_arguments, add_search_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pairing import PAIR_KINDS

    i = p.add_argument_group("inputs (give exactly one of --images, --csv, --label_maps)")
    i.add_argument("--images", help="directory of images (.nii/.nii.gz); needs --segs")
    i.add_argument("--segs", help="directory of their segmentations (same file names as --images)")
    i.add_argument("--modality", default="image", help="modality of the --images files (default: image)")
    i.add_argument("--name_pattern",
                   help="regex with named groups subject and/or modality, searched in each --images file name "
                        "(e.g. '(?P<subject>IXI\\d+)-.*-(?P<modality>T1|T2|PD)'); default: each file is a subject")
    i.add_argument("--csv", help="CSV with columns img_path,seg_path,modality[,subject] (paths relative to the CSV; "
                                 "without subject, images sharing a seg_path are one subject)")
    i.add_argument("--label_maps", nargs="+", metavar="PATH",
                   help="label maps (files or directories): each gives one synthetic image per --contrasts name")
    i.add_argument("--contrasts", nargs="+", default=["t1", "t2"], metavar="NAME",
                   help="names of seeded random contrast draws for --label_maps (default: t1 t2)")
    i.add_argument("--label_stride", type=int, default=1,
                   help="keep every N-th voxel of --label_maps (faster evaluation at lower resolution; default 1)")

    pr = p.add_argument_group("pairs and perturbations")
    pr.add_argument("--pair_kinds", nargs="+", default=list(PAIR_KINDS), choices=PAIR_KINDS, metavar="KIND",
                    help=f"any of {', '.join(PAIR_KINDS)} (default: all three); an image is never paired with itself")
    pr.add_argument("--max_pairs", type=int, default=None,
                    help="keep a seeded random subset of at most N pairs per kind")
    pr.add_argument("--rotations", nargs="+", type=float, default=[0, 45, 90, 135, 180], metavar="DEG",
                    help="rotation angles in degrees, each about ONE axis through the moving image's centre "
                         "(default: 0 45 90 135 180)")
    pr.add_argument("--axis", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                    help="rotation axis (RAS); default: a random unit axis per (pair, angle) drawn from --seed")
    pr.add_argument("--translation", type=float, default=0.0, metavar="MM",
                    help="random translation, each component uniform in [-MM, MM] (default 0)")
    pr.add_argument("--scaling", type=float, default=0.0, metavar="FRAC",
                    help="random isotropic scaling uniform in [1-FRAC, 1+FRAC] (default 0)")
    pr.add_argument("--perturb_mode", choices=["auto", "header", "resample"], default="auto",
                    help="header: change the moving image's affine (exact, no interpolation); resample: resample "
                         "image and segmentation on their grid; auto (default): resample for models whose network "
                         "grid follows the voxel axes (fov), header otherwise")
    pr.add_argument("--seed", type=int, default=0, help="seed of axes, translations, scalings, contrasts, pair subsets")

    m = p.add_argument_group("model and registration")
    m.add_argument("--load_path", "--model", dest="load_path",
                   help="model: bundled name, keyreg .safetensors/.json, or an official checkpoint "
                        "(default: the bundled default model)")
    m.add_argument("--weighted_kp_align", nargs="?", const="power", default=None, choices=["power", "none"],
                   help="weight keypoints by heatmap power in the fits (default: the model's setting)")
    add_search_argument(m)
    add_device_arguments(m)
    m.add_argument("--list_of_aligns", nargs="+", default=["rigid", "affine", "tps_0"], metavar="ALIGN",
                   help="rigid, affine, tps_<lambda> (default: rigid affine tps_0)")
    m.add_argument("--list_of_metrics", nargs="+", default=["harddice"], metavar="METRIC",
                   help="mse ncc harddice braindice softdice hausd jdstd jdlessthan0 (default: harddice)")
    m.add_argument("--label_interp", choices=["nearest", "labelwise"], default="nearest",
                   help="resampling of segmentations")
    m.add_argument("--field_stride", type=int, default=None, help="sub-grid stride of the dense TPS field, trilinear in between "
                        "(default: keyreg's default, 2; 1 = exact at every voxel; at most 8)")

    o = p.add_argument_group("outputs")
    o.add_argument("--save_dir", default="./evaluate_output",
                   help="writes evaluation.csv, summary.md, dice_vs_rotation.png (default ./evaluate_output)")
    o.add_argument("--quiet", "--no_progress", action="store_true", help="no progress bar and no per-task lines")


def run(args: argparse.Namespace) -> int:
    from ..api import resolve_device, resolve_model
    from ..errors import ConfigError
    from ..evaluate import (evaluate, format_evaluation_summary, images_from_csv, images_from_directories,
                            images_from_label_maps, make_pairs, write_outputs)
    from ..metrics import parse_metrics
    from ..transforms import parse_aligns

    given = [flag for flag, v in (("--images", args.images), ("--csv", args.csv), ("--label_maps", args.label_maps))
             if v]
    if len(given) != 1:
        raise ConfigError("give exactly one input: --images DIR --segs DIR, --csv FILE, or --label_maps PATHS"
                          + (f" (got {' and '.join(given)})" if given else ""))
    if bool(args.images) != bool(args.segs):
        raise ConfigError("--images and --segs go together")
    # validate cheap options before loading anything
    import math

    from ..evaluate import draw_perturbation
    from ..pipeline import RegistrationOptions

    RegistrationOptions(aligns=tuple(args.list_of_aligns), label_interp=args.label_interp,
                        field_stride=1 if args.field_stride is None else args.field_stride)
    if not args.rotations or not all(math.isfinite(r) and abs(r) <= 360 for r in args.rotations):
        raise ConfigError(f"rotation angles must be finite degrees in [-360, 360], got {args.rotations}")
    draw_perturbation(args.seed, "check", 0.0, axis=args.axis, translation=args.translation, scaling=args.scaling)
    aligns = [s.name for s in parse_aligns(args.list_of_aligns)]
    metrics = parse_metrics(args.list_of_metrics)
    device = resolve_device(args.device)
    net = resolve_model(args.load_path, device)

    synth = ""
    if args.images:
        images = images_from_directories(args.images, args.segs, modality=args.modality,
                                         name_pattern=args.name_pattern)
    elif args.csv:
        images = images_from_csv(args.csv)
    else:
        images, synth = images_from_label_maps(args.label_maps, args.contrasts, seed=args.seed,
                                               stride=args.label_stride)
    pairs = make_pairs(images, args.pair_kinds, max_pairs_per_kind=args.max_pairs, seed=args.seed)
    kinds_found = {p.kind for p in pairs}
    for kind in args.pair_kinds:
        if kind not in kinds_found:
            print(f"warning: no {kind} pairs among these {len(images)} images", file=sys.stderr)
    if not pairs:
        raise ConfigError(f"no pairs of the kinds {', '.join(args.pair_kinds)} among {len(images)} image(s) "
                          f"(subjects: {len({i.subject for i in images})}, "
                          f"modalities: {', '.join(sorted({i.modality for i in images}))})")
    print(f"keyreg evaluate: {len(images)} image(s), {len(pairs)} pair(s) x {len(args.rotations)} rotation(s), "
          f"aligns {' '.join(aligns)}, model {net.config.name}, device {device}", file=sys.stderr)
    weighted = None if args.weighted_kp_align is None else args.weighted_kp_align == "power"
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    result = evaluate(images, pairs, model=net, aligns=aligns, metrics=metrics, rotations=args.rotations,
                      axis=args.axis, translation=args.translation, scaling=args.scaling, seed=args.seed,
                      mode=args.perturb_mode, device=device, use_amp=args.use_amp, weighted=weighted,
                      label_interp=args.label_interp, field_stride=args.field_stride,
                      orientation_search=args.orientation_search, progress=not args.quiet, log=log)
    if synth:
        result.settings["synthesizer"] = synth
    if not result.rows:
        raise ConfigError(f"every task failed ({len(result.failures)}); first: {result.failures[0][1]}")
    paths = write_outputs(result, args.save_dir)
    print(format_evaluation_summary(result))
    print(f"written: {paths['csv']}, {paths['summary']}, {paths['plot']}")
    if result.failures:
        print(f"{len(result.failures)} task(s) failed (listed in {paths['summary']})", file=sys.stderr)
        return 1
    return 0
