"""keyreg versus the official KeyMorph code (``keymorph==2.0.1``), same checkpoint, same inputs.

The script creates a separate virtual environment (default ``.bench/keymorph-venv``, ignored by git)
with ``torch`` (the version running this script), ``keymorph==2.0.1``, and ``scikit-image``,
``matplotlib``, ``h5py`` and ``pyyaml`` (which keymorph imports without declaring them), unless it exists.  ONE
checkpoint in the official format is loaded by both implementations: the official truncated U-Net
fixture (``../shared/fixtures/official-keymorph/truncatedunet-l4-k32.pth.tar``, K = 32) by default,
or, with ``--k K``, a checkpoint with random weights of the same shape and K keypoints written by the
official code itself (``TruncatedUNet3D``, ``state_dict`` under ``module.`` + ``args``).

For each size n, two synthetic head images (n^3, float in [0, 1]) are fed to both as
``(1, 1, n, n, n)`` tensors (the network grid is the image grid, as in the official pipeline) and
three stages are timed, each implementation in its own fresh process:

* keypoints: network + centre of mass for the fixed and the moving image, one image per pass in
  both (official: ``KeyMorph.get_keypoints`` twice; keyreg: the detector twice, as
  ``detect_keypoints`` does, then world coordinates);
* TPS grid (lambda = 0): fit + dense transform on the fixed grid (official: ``TPS`` +
  ``get_flow_field(compute_on_subgrids=True)``, exact at every voxel; keyreg: ``fit_tps`` +
  ``sample_field`` with ``--field_stride``, default 2 here; ``keyreg register`` defaults to 1, exact);
* warp: official ``grid_sample`` (``keymorph.utils.align_img``); keyreg ``warp_image``.

Memory is the resident set size (``benchmarks/_measure.py``): the highest RSS during the three stages
minus the RSS before them.  The keypoints of the two implementations are compared (same weights:
they must agree to float precision).

Usage:
    python benchmarks/vs_official.py [--sizes 64 128] [--k 128] [--threads 1] [--field_stride 2]
        [--venv .bench/keymorph-venv] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-keymorph" / "truncatedunet-l4-k32.pth.tar"
STAGES = ["keypoints", "tps_grid", "warp"]


# ---------------------------------------------------------------------------------------------
# children (each runs in its own process)


def _inputs(cfg: dict):
    import numpy as np
    import torch

    f = torch.from_numpy(np.load(cfg["fixed"]))[None, None]
    m = torch.from_numpy(np.load(cfg["moving"]))[None, None]
    return f, m


def _official_backbone(num_keypoints: int, num_levels: int, num_truncated: int, f_maps: int):
    from keymorph.unet3d.model import TruncatedUNet3D

    # as the official scripts build it: GroupNorm-Conv-ReLU, 8 groups, logits out (no final activation)
    return TruncatedUNet3D(1, num_keypoints, num_truncated, final_sigmoid=False, f_maps=f_maps, layer_order="gcr",
                           num_groups=8, num_levels=num_levels, is_segmentation=False)


def child_make_checkpoint(cfg: dict) -> dict:
    """Random official-format checkpoint (official venv)."""
    import argparse as ap

    import torch

    torch.manual_seed(cfg["seed"])
    net = _official_backbone(cfg["k"], cfg["num_levels"], cfg["num_truncated"], cfg["f_maps"])
    args = ap.Namespace(num_keypoints=cfg["k"], backbone="truncatedunet",
                        num_truncated_layers_for_truncatedunet=cfg["num_truncated"],
                        num_levels_for_unet=cfg["num_levels"], dim=3)
    torch.save({"epoch": 0, "args": args, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "optimizer": {}}, cfg["out"])
    return {"path": cfg["out"]}


def child_theirs(cfg: dict) -> dict:
    import argparse as ap

    import numpy as np
    import torch
    from keymorph.keypoint_aligners import TPS
    from keymorph.model import KeyMorph
    from keymorph.utils import align_img

    from _measure import StageMeter

    torch.set_num_threads(cfg["threads"])
    with torch.serialization.safe_globals([ap.Namespace]):
        ck = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
    a = ck["args"]
    backbone = _official_backbone(a.num_keypoints, a.num_levels_for_unet, a.num_truncated_layers_for_truncatedunet,
                                  cfg["f_maps"])
    backbone.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    model = KeyMorph(backbone, a.num_keypoints, 3).eval()
    img_f, img_m = _inputs(cfg)
    with torch.no_grad():
        model.get_keypoints(torch.zeros(1, 1, 16, 16, 16))  # warm-up (kernel set-up)
        meter = StageMeter("cpu")
        with meter("keypoints"):
            points_f = model.get_keypoints(img_f)
            points_m = model.get_keypoints(img_m)
        with meter("tps_grid"):
            lmbda = torch.zeros(1)
            aligner = TPS(points_m=points_m, points_f=points_f, lmbda=lmbda, dim=3)
            grid = aligner.get_flow_field(img_f.shape, compute_on_subgrids=True)
        with meter("warp"):
            warped = align_img(grid, img_m)
        meter.close()
    np.save(cfg["points_out"], torch.stack([points_f[0], points_m[0]]).numpy())
    return {"seconds": meter.seconds, "extra_mb": meter.extra_mb, "overall_mb": meter.overall_extra_mb(),
            "peak_mb": meter.peak_mb(), "warped_mean": float(warped.mean())}


def child_ours(cfg: dict) -> dict:
    import numpy as np
    import torch

    from _measure import StageMeter

    from keyreg.geometry import apply_affine, fov_center, fov_half_extent, normalized_to_voxel
    from keyreg.models import load_model
    from keyreg.transforms import fit_tps, sample_field
    from keyreg.warp import warp_image

    torch.set_num_threads(cfg["threads"])
    net = load_model(cfg["checkpoint"])
    img_f, img_m = _inputs(cfg)
    n = img_f.shape[2:]
    affine = np.eye(4)  # 1 voxel = 1 mm, voxel axes = world axes: the official frame
    aff_t = torch.as_tensor(affine)
    with torch.inference_mode():
        net(torch.zeros(1, 1, 16, 16, 16))  # warm-up (kernel set-up)
        meter = StageMeter("cpu")
        with meter("keypoints"):  # one image per pass, as keyreg.api.detect_keypoints does by default
            u = torch.cat([net(img)[0] for img in (img_f, img_m)])
            world = apply_affine(aff_t, normalized_to_voxel(u.double(), n))
        with meter("tps_grid"):
            tps = fit_tps(world[:1], world[1:], 0.0, center=torch.as_tensor(fov_center(affine, n)),
                          scale=fov_half_extent(affine, n))
            field = sample_field(tps, n, affine, stride=cfg["field_stride"])
        with meter("warp"):
            warped = warp_image(img_m, affine, n, affine, field)
        meter.close()
    np.save(cfg["points_out"], u.float().numpy())
    return {"seconds": meter.seconds, "extra_mb": meter.extra_mb, "overall_mb": meter.overall_extra_mb(),
            "peak_mb": meter.peak_mb(), "warped_mean": float(warped.mean())}


# ---------------------------------------------------------------------------------------------
# driver


def ensure_venv(venv: Path) -> Path:
    """The official environment's python, created on first use."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import keymorph, keymorph.unet3d.model, torch"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    import torch

    torch_version = torch.__version__.split("+")[0]
    print(f"setting up {venv}: torch=={torch_version}, keymorph==2.0.1 and the modules it imports (one-time) ...", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}"], check=True)
    # keymorph imports scikit-image, matplotlib, h5py and yaml without declaring them
    subprocess.run([str(py), "-m", "pip", "install", "-q", "keymorph==2.0.1", "scikit-image", "matplotlib", "h5py",
                    "pyyaml"],
                   check=True)
    subprocess.run([str(py), "-c", "import keymorph, keymorph.unet3d.model, torch"], check=True)
    return py


def run_child(python: str, mode: str, cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.get("threads", 1)))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, __file__, f"--_child_{mode}", json.dumps(cfg)], capture_output=True, text=True,
                          env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{mode} ({cfg.get('size', '')}): the run failed")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--k", type=int, default=None,
                    help="write a random-weight official checkpoint with K keypoints (default: the K=32 fixture)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an official truncated U-Net checkpoint to use")
    ap.add_argument("--num_levels", type=int, default=4)
    ap.add_argument("--num_truncated", type=int, default=1)
    ap.add_argument("--f_maps", type=int, default=32)
    ap.add_argument("--field_stride", type=int, default=2, help="keyreg's dense-field stride (1 = exact)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both implementations")
    ap.add_argument("--venv", type=Path, default=ROOT / ".bench" / "keymorph-venv")
    ap.add_argument("--append", help="append the table to this markdown file")
    for mode in ("ours", "theirs", "make_checkpoint"):
        ap.add_argument(f"--_child_{mode}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for mode, fn in (("ours", child_ours), ("theirs", child_theirs), ("make_checkpoint", child_make_checkpoint)):
        value = getattr(args, f"_child_{mode}")
        if value:
            print("RESULT " + json.dumps(fn(json.loads(value))))
            return

    import numpy as np
    import torch

    from _data import head_image
    from _report import append_section, machine_line

    official_py = str(ensure_venv(args.venv))
    rows = []
    with tempfile.TemporaryDirectory(prefix="keyreg-vs-official-") as tmp_name:
        tmp = Path(tmp_name)
        if args.k is not None:
            ckpt = tmp / f"random-truncatedunet-k{args.k}.pth.tar"
            run_child(official_py, "make_checkpoint", {"k": args.k, "num_levels": args.num_levels,
                                                       "num_truncated": args.num_truncated, "f_maps": args.f_maps,
                                                       "seed": 0, "out": str(ckpt)})
            ckpt_note = (f"random-weight official checkpoint written by keymorph (truncated U-Net L{args.num_levels} "
                         f"t={args.num_truncated} f_maps {args.f_maps}, K = {args.k})")
        else:
            ckpt = args.checkpoint or FIXTURE
            if not ckpt.exists():
                raise SystemExit(f"{ckpt} not found: pass --checkpoint or --k")
            ckpt_note = f"`{ckpt.name}` (official format, truncated U-Net L4 t=1 f_maps 32, K = 32)"
        print(f"checkpoint: {ckpt_note}", flush=True)
        for n in args.sizes:
            paths = {}
            for role, seed, shift in (("fixed", 0, (0, 0, 0)), ("moving", 1, (4.0, -3.0, 2.0))):
                data, _ = head_image(n, 256.0 / n, seed, shift_mm=shift)
                paths[role] = str(tmp / f"{role}_{n}.npy")
                np.save(paths[role], data)
            res = {}
            for mode, py in (("theirs", official_py), ("ours", sys.executable)):
                cfg = {**paths, "size": n, "checkpoint": str(ckpt), "threads": args.threads, "f_maps": args.f_maps,
                       "field_stride": args.field_stride, "points_out": str(tmp / f"points_{mode}_{n}.npy")}
                res[mode] = run_child(py, mode, cfg)
                s = res[mode]["seconds"]
                print(f"{n}^3 {mode:6s}: " + ", ".join(f"{st} {s[st]:.2f} s" for st in STAGES) +
                      f"; +{res[mode]['overall_mb']:.0f} MiB", flush=True)
            p_theirs = np.load(tmp / f"points_theirs_{n}.npy")
            p_ours = np.load(tmp / f"points_ours_{n}.npy")
            rows.append((n, res["ours"], res["theirs"], float(np.abs(p_theirs - p_ours).max())))

    head = ("| size | impl. | keypoints (s) | TPS grid (s) | warp (s) | total (s) | extra memory (MiB) | "
            "time ours/theirs | memory ours/theirs | max keypoint difference |")
    table = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for n, ours, theirs, diff in rows:
        to, tt = sum(ours["seconds"].values()), sum(theirs["seconds"].values())
        for name, r, ratio in (("official", theirs, ""), ("keyreg", ours,
                                f"{to / tt:.3f} | {ours['overall_mb'] / max(theirs['overall_mb'], 1e-9):.3f} | "
                                f"{diff:.1e} |")):
            s = r["seconds"]
            cells = " | ".join(f"{s[st]:.2f}" for st in STAGES)
            table.append(f"| {n}³ | {name} | {cells} | {sum(s.values()):.2f} | {r['overall_mb']:.0f} | "
                         + (ratio if ratio else "| | |"))
    stage_ratio = ["", "Per-stage time ratio ours/theirs: " + "; ".join(
        f"{n}³: " + ", ".join(f"{st} {o['seconds'][st] / t['seconds'][st]:.2f}" for st in STAGES)
        for n, o, t, _ in rows) + ".",
        "", "Per-stage extra memory (MiB, official / keyreg): " + "; ".join(
        f"{n}³: " + ", ".join(f"{st} {t['extra_mb'][st]:.0f} / {o['extra_mb'][st]:.0f}" for st in STAGES)
        for n, o, t, _ in rows) + "."]
    text = "\n".join(table + stage_ratio)
    print(text)
    if args.append:
        append_section(args.append, "keyreg vs the official KeyMorph code (CPU)",
                       f"{machine_line(torch.device('cpu'))}\n\nCheckpoint: {ckpt_note}, loaded by both. "
                       f"Torch threads: {args.threads} in both. keyreg dense field stride {args.field_stride} "
                       f"(official: exact at every voxel). Max keypoint difference in normalised units "
                       f"([-1, 1]).\n\n{text}")


if __name__ == "__main__":
    main()
