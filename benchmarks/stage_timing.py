"""Time and peak memory of one keyreg registration, stage by stage, at several image sizes and K.

One TPS (lambda 0) registration of two synthetic head images (1 mm at 256^3, 2 mm at 128^3, same
256 mm field of view) with a random-weight keypoint model: load (two .nii.gz), preprocess (both
images onto the network grid), keypoints (one batched network pass + centre of mass), fit, dense
field (TPS on the fixed grid, stride 2), warp (trilinear), write (warped image, .nii.gz).

Every configuration runs in a fresh subprocess, so its memory numbers are its own.  Memory: CPU =
resident set size sampled every 2 ms (``benchmarks/_measure.py``); "extra" = a stage's peak minus
the RSS when it started; GPU = ``torch.cuda.max_memory_allocated`` minus the allocation at the
start of the stage.  Target: the TPS dense field at 256^3 with K = 512 within 1 GB of extra memory.

Usage:
    python benchmarks/stage_timing.py [--sizes 128 256] [--k 128 256 512] [--device cpu|cuda]
        [--arch bundled|keyreg|brainmorph-s|brainmorph-s-half] [--field_stride 2] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _data import head_image, random_model_config  # noqa: E402

STAGES = ["load", "preprocess", "keypoints", "fit", "dense_field", "warp", "write"]
MB_TARGET = 1024.0


def child(cfg: dict) -> dict:
    """One registration, measured (runs in its own process)."""
    import torch

    from _measure import StageMeter

    from keyreg.api import ImageKeypoints, fit_alignments
    from keyreg.geometry import apply_affine, normalized_to_voxel
    from keyreg.io import load_volume, save_volume
    from keyreg.models import ArchitectureConfig, KeypointDetector, ModelConfig
    from keyreg.preprocess import GridSpec, PreprocessConfig, to_network_input
    from keyreg.transforms import parse_aligns, sample_field
    from keyreg.warp import warp_image

    torch.manual_seed(0)
    dev = torch.device(cfg["device"])
    m = cfg["model"]
    config = ModelConfig("bench-random", ArchitectureConfig(m["backbone"], m["num_keypoints"],
                                                            num_levels=m["num_levels"],
                                                            num_truncated=m["num_truncated"], f_maps=m["f_maps"]),
                         PreprocessConfig(GridSpec("ras", (m["grid"],) * 3, (m["voxel"],) * 3)))
    net = KeypointDetector(config).to(dev).eval()
    if cfg.get("warmup", True):  # first-call kernel set-up is not part of any stage
        with torch.inference_mode():
            net(torch.zeros(2, 1, *config.preprocessing.grid.shape, device=dev))
    meter = StageMeter(str(dev))
    with meter("load"):
        fixed = load_volume(cfg["fixed"], kind="image")
        moving = load_volume(cfg["moving"], kind="image")
    with meter("preprocess"):
        inputs = [to_network_input(v, config.preprocessing, dev) for v in (fixed, moving)]
    with meter("keypoints"):
        x = torch.cat([i for i, _ in inputs])
        with torch.inference_mode():
            u, mass = net(x)
        kps = []
        for b, (_, aff) in enumerate(inputs):
            world = apply_affine(torch.as_tensor(aff, device=dev), normalized_to_voxel(u[b].double(), config.preprocessing.grid.shape))
            kps.append(ImageKeypoints(world, mass[b].float(), aff, config.preprocessing.grid.shape))
    with meter("fit"):
        tps = fit_alignments(kps[0], kps[1], parse_aligns(["tps_0"]))["tps_0"]
    with meter("dense_field"):
        field = sample_field(tps, fixed.shape, fixed.affine, stride=cfg["field_stride"], device=dev)
    with meter("warp"):
        warped = warp_image(moving.tensor(dev), moving.affine, fixed.shape, fixed.affine, field)
    with meter("write"):
        save_volume(warped[0, 0].cpu().numpy(), fixed, Path(cfg["out"]))
    meter.close()
    spread = float(kps[0].points.std(0).mean())
    return {"seconds": meter.seconds, "extra_mb": meter.extra_mb, "peak_mb": meter.peak_mb(),
            "keypoint_spread_mm": spread, "field_shape": list(field.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--k", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="bundled",
                    help="bundled (the bundled default model's shape, else keyreg), keyreg, brainmorph-s, "
                         "brainmorph-s-half")
    ap.add_argument("--field_stride", type=int, default=2)
    ap.add_argument("--no_warmup", action="store_true", help="do not run the network once before measuring")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    ap.add_argument("--append", help="append the tables to this markdown file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        cfg = json.loads(args._child)
        if cfg.get("threads"):
            import torch

            torch.set_num_threads(cfg["threads"])
        print("RESULT " + json.dumps(child(cfg)))
        return

    import torch

    from _report import append_section, machine_line

    arch_note = args.arch
    if args.arch == "bundled":
        from keyreg.models import list_pretrained
        from keyreg.models.checkpoint import _resolve_default

        models = list_pretrained()
        if models:
            c = models[_resolve_default()]
            a, g = c.architecture, c.preprocessing.grid
            base = {"backbone": a.backbone, "num_levels": a.num_levels, "num_truncated": a.num_truncated,
                    "f_maps": a.f_maps, "grid": g.shape[0], "voxel": g.voxel_size[0]}
            arch_note = f"bundled model {c.name}'s architecture, random weights"
        else:
            base = {k: v for k, v in random_model_config("keyreg", 1).items() if k != "num_keypoints"}
            arch_note = "keyreg (no bundled model installed: keyreg's training-default architecture)"
    else:
        base = {k: v for k, v in random_model_config(args.arch, 1).items() if k != "num_keypoints"}
    print(f"model: {arch_note}: {base}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="keyreg-bench-") as tmp:
        import nibabel as nib

        for size in args.sizes:
            voxel = 256.0 / size
            paths = {}
            for role, seed, shift in (("fixed", 0, (0, 0, 0)), ("moving", 1, (4.0, -3.0, 2.0))):
                data, aff = head_image(size, voxel, seed, shift_mm=shift)
                paths[role] = str(Path(tmp) / f"{role}_{size}.nii.gz")
                nib.save(nib.Nifti1Image(data, aff), paths[role])
                del data
            for k in args.k:
                cfg = {"device": args.device, "model": {**base, "num_keypoints": k}, "field_stride": args.field_stride,
                       "out": str(Path(tmp) / f"warped_{size}_{k}.nii.gz"), "threads": args.threads,
                       "warmup": not args.no_warmup, **paths}
                proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(cfg)],
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"size {size} K={k}: the measurement failed")
                r = json.loads(line[len("RESULT "):])
                results.append((size, k, r))
                s = r["seconds"]
                print(f"{size}^3 K={k}: " + ", ".join(f"{st} {s[st]:.2f} s" for st in STAGES) +
                      f"; dense field +{r['extra_mb']['dense_field']:.0f} MiB, peak {r['peak_mb']:.0f} MiB", flush=True)

    mem_label = "GPU allocated" if args.device.startswith("cuda") else "RSS"
    t1 = ["| size | K | " + " | ".join(STAGES) + " | total (s) |", "|---|---|" + "---|" * (len(STAGES) + 1)]
    t2 = ["| size | K | " + " | ".join(STAGES) + f" | peak {mem_label} (MiB) |", "|---|---|" + "---|" * (len(STAGES) + 1)]
    for size, k, r in results:
        s, e = r["seconds"], r["extra_mb"]
        t1.append(f"| {size}³ | {k} | " + " | ".join(f"{s[st]:.2f}" for st in STAGES) + f" | {sum(s.values()):.2f} |")
        t2.append(f"| {size}³ | {k} | " + " | ".join(f"{e[st]:.0f}" for st in STAGES) + f" | {r['peak_mb']:.0f} |")
    verdicts = []
    for size, k, r in results:
        if size == 256 and k == 512:
            extra = r["extra_mb"]["dense_field"]
            verdicts.append(f"TPS dense field at 256³, K = 512 (stride {args.field_stride}): {extra:.0f} MiB extra "
                            f"({'within' if extra <= MB_TARGET else 'OVER'} the 1 GiB target).")
    text = ("Time per stage (s):\n\n" + "\n".join(t1) + f"\n\nExtra memory per stage ({mem_label}, MiB above the "
            "stage's start; the last column is the run's peak):\n\n" + "\n".join(t2))
    if verdicts:
        text += "\n\n" + "\n".join(verdicts)
    print(text)
    if args.append:
        dev = torch.device(args.device)
        append_section(args.append, f"Stage timing and memory of one registration ({args.device})",
                       f"{machine_line(dev)}\n\nModel: {arch_note}, {base}; one TPS (λ = 0) registration of two "
                       f"synthetic heads; dense field stride {args.field_stride}; each configuration in a fresh "
                       f"process.\n\n{text}")


if __name__ == "__main__":
    main()
