"""``keyreg register``: the official ``register.py`` flags, in physical space, for files or directories."""

from __future__ import annotations

import argparse
import json
import math
import os
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
                   help="sub-grid stride for the dense TPS field (default 1 = exact at every voxel; 2 or 4 trade accuracy for speed, see docs/benchmarks.md)")

    o = p.add_argument_group("outputs")
    o.add_argument("--save_dir", default="./register_output", help="output directory (default ./register_output)")
    o.add_argument("--save_eval_to_disk", action="store_true",
                   help="write warped images/segmentations, transforms and keypoints per pair and align")
    o.add_argument("--visualize", action="store_true", help="write a QC PNG per pair and align")
    o.add_argument("--skip_existing", action="store_true",
                   help="resume an interrupted batch: a pair whose directory pairs/<pair>/ is complete (its done.json, "
                        "written last, records the same inputs and options) is not redone; its metrics are reused")


def _distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` without it)."""
    from ..errors import ConfigError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world, local


def _pair_config(pair, args: argparse.Namespace, aligns: list[str], metrics: list[str]) -> dict:
    """What a finished pair directory must record to be reused by ``--skip_existing``."""
    return {"moving": str(pair.moving), "fixed": str(pair.fixed),
            "moving_seg": str(pair.moving_seg) if pair.moving_seg else None,
            "fixed_seg": str(pair.fixed_seg) if pair.fixed_seg else None,
            "aligns": aligns, "metrics": metrics, "model": str(args.load_path),
            "label_interp": args.label_interp, "field_stride": args.field_stride,
            "weighted_kp_align": args.weighted_kp_align, "half_resolution": args.half_resolution,
            "save_eval_to_disk": args.save_eval_to_disk, "visualize": args.visualize}


def _completed(pair_dir: Path, config: dict) -> list[dict] | None:
    """The metric rows of a finished pair (``done.json`` with the same config), else ``None``."""
    try:
        done = json.loads((pair_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("config") != config or not isinstance(done.get("rows"), list):
        return None
    return done["rows"]


def _json_clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..api import Timer, detect_keypoints, register, resolve_device, resolve_model
    from ..errors import KeyregError
    from ..io import atomic_dir, atomic_write_text, load_volume
    from ..metrics import parse_metrics
    from ..pairing import build_pairs
    from ..transforms import DEFAULT_FIELD_STRIDE, parse_aligns

    aligns = [s.name for s in parse_aligns(args.list_of_aligns)]
    pairs, warnings = build_pairs(args.moving, args.fixed, args.moving_seg, args.fixed_seg,
                                  all_pairs=args.all_pairs)
    has_seg = any(p.moving_seg and p.fixed_seg for p in pairs)
    metrics = parse_metrics(args.list_of_metrics or (["mse", "harddice"] if has_seg else ["mse"]))
    stride = DEFAULT_FIELD_STRIDE if args.field_stride is None else args.field_stride
    if stride < 1:
        from ..errors import ConfigError
        raise ConfigError(f"--field_stride must be >= 1, got {stride}")
    rank, world, local_rank = _distributed()
    if rank == 0:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda" and device.index is None:  # one GPU per rank
        import torch

        device = resolve_device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
    timer = Timer()
    with timer("model"):
        net = resolve_model(args.load_path, device, half_resolution=args.half_resolution,
                            backbone=args.backbone, num_keypoints=args.num_keypoints)
    weighted = None if args.weighted_kp_align is None else args.weighted_kp_align == "power"
    save_dir = Path(args.save_dir)
    single = len(pairs) == 1 and world == 1  # a single pair fails with one line (exit 2); a batch skips bad pairs
    mine = list(range(rank, len(pairs), world))  # this rank's shard (all pairs without torchrun)
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    if not single:
        print(f"keyreg register: {tag}{len(mine)} of {len(pairs)} pair(s), model {net.config.name} "
              f"({net.config.architecture.describe()}), aligns {' '.join(aligns)}, device {device}",
              file=sys.stderr)
    dist, own_group = _init_distributed(world)

    cache: dict[Path, object] = {}
    results: list[tuple[int, list[dict]]] = []
    failures: list[tuple[int, str, str]] = []
    skipped = 0
    write_pairs = args.save_eval_to_disk or args.visualize or args.skip_existing
    bar = tqdm(mine, desc=f"{tag}pairs", unit="pair", file=sys.stderr, dynamic_ncols=True, disable=single)
    for index in bar:
        pair = pairs[index]
        pair_dir = save_dir / "pairs" / pair.name
        config = _pair_config(pair, args, aligns, metrics)
        if args.skip_existing:
            done = _completed(pair_dir, config)
            if done is not None:
                results.append((index, done))
                skipped += 1
                continue
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
            rows = [{"pair": pair.name, "moving": str(pair.moving), "fixed": str(pair.fixed), "align": align, **vals}
                    for align, vals in per_align.items()]
            if write_pairs:
                # everything goes to a temporary directory renamed to pairs/<pair> at the end; done.json is
                # written last, so an interrupted pair never looks complete
                with timer("write"), atomic_dir(pair_dir) as tmp:
                    if args.save_eval_to_disk or args.visualize:
                        reg.save(tmp, write_images=args.save_eval_to_disk, visualize=args.visualize)
                    atomic_write_text(tmp / "done.json", json.dumps(
                        {"config": config, "rows": _json_clean(rows)}, indent=1) + "\n")
        except KeyregError as e:
            if single:
                raise
            failures.append((index, pair.name, str(e)))
            tqdm.write(f"{tag}FAILED {pair.name}: {e}", file=sys.stderr)
            continue
        results.append((index, rows))
        summary = "  ".join(f"{a}: " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()
                                                if isinstance(v, float)) for a, vals in per_align.items())
        tqdm.write(f"{tag}{pair.name} ({time.perf_counter() - start:.1f} s)  {summary}", file=sys.stderr)
    bar.close()
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in timer.seconds.items())
    print(f"{tag}time per stage ({len(mine)} pair(s)): {stages}", file=sys.stderr)

    if dist is not None:  # every rank sends its shard; rank 0 writes the merged tables after the barrier
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (results, failures, skipped))
        dist.barrier()
        results = [r for part in gathered for r in part[0]]
        failures = [f for part in gathered for f in part[1]]
        skipped = sum(part[2] for part in gathered)
        if own_group:
            dist.destroy_process_group()
    results.sort(key=lambda r: r[0])
    failures.sort(key=lambda f: f[0])
    rows = [row for _, pair_rows in results for row in pair_rows]
    failed = [(name, msg) for _, name, msg in failures]

    if rank == 0:
        if skipped:
            print(f"{skipped} pair(s) were already complete and skipped (--skip_existing)", file=sys.stderr)
        if rows:
            paths = write_metric_tables(save_dir, rows, failed)
            print(format_summary(rows, aligns))
            print(f"\nmetrics written to {paths[0]} and {paths[1]}")
            if args.save_eval_to_disk or args.visualize:
                print(f"per-pair outputs in {save_dir / 'pairs'}")
        if failed:
            print(f"\n{len(failed)} of {len(pairs)} pair(s) failed:", file=sys.stderr)
            for name, msg in failed:
                print(f"  {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0


def _init_distributed(world: int):
    """``(torch.distributed, created)`` with a gloo group when run under torchrun with several
    processes (pairs are sharded by rank; only picklable Python objects are exchanged), else ``(None, False)``."""
    if world < 2:
        return None, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist, False
    dist.init_process_group("gloo")
    return dist, True
