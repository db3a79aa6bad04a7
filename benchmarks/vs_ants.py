"""keyreg versus ANTs (``antspyx``): Dice, time, and Dice vs rotation on the same pairs.

Data: the shared label maps ``training_seg_13..15`` (256^3, 1 mm), kept every ``--label_stride``-th
voxel, each with seeded synthetic contrasts (``--contrasts``, via ``keyreg.evaluate``, i.e. the
training generator ``keyreg.train.synth`` when installed).  Pairs and perturbations are those of
``keyreg evaluate`` with the same seed: ``--max_pairs`` per pair kind, each moving image rotated by
each ``--rotations`` angle about its own random axis (header mode: the affine changes, the voxels do
not), so both tools see identical files.  Dice: mean hard Dice over the labels present in either
segmentation (background excluded), on the fixed grid.

ANTs runs in a separate virtual environment (default ``.bench/ants-venv``, created with
``pip install antspyx`` on first use; antspyx is an optional dependency of the benchmarks only):
``ants.registration`` with ``Affine``, ``SyN`` and ``antsRegistrationSyNQuick[s]`` (defaults of
antspyx, mutual information, centre-of-mass initialisation), then ``ants.apply_transforms`` with
``genericLabel`` on the moving segmentation.  ITK threads and torch threads: ``--threads`` for both.

keyreg uses the bundled default model (``resolve_model(None)``) or ``--model``; without one, only the
ANTs rows are produced and the output says so.

Usage:
    python benchmarks/vs_ants.py [--label_stride 3] [--rotations 0 45 90 135 180] [--max_pairs 1]
        [--methods Affine SyN antsRegistrationSyNQuick[s]] [--model PATH] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

LABELMAPS = ROOT.parent / "shared" / "data" / "labelmaps"


def child_ants(jobs: list[dict]) -> list[dict]:
    """Run ANTs on every job (ANTs venv): register, warp the moving segmentation, time it."""
    import ants

    out = []
    for job in jobs:
        fixed = ants.image_read(job["fixed"])
        moving = ants.image_read(job["moving"])
        moving_seg = ants.image_read(job["moving_seg"])
        res = {"id": job["id"], "method": job["method"]}
        t0 = time.perf_counter()
        try:
            reg = ants.registration(fixed, moving, type_of_transform=job["method"],
                                    outprefix=job["out_prefix"])
            res["seconds"] = time.perf_counter() - t0
            warped = ants.apply_transforms(fixed, moving_seg, reg["fwdtransforms"], interpolator="genericLabel")
            ants.image_write(warped, job["out_seg"])
            res["out_seg"] = job["out_seg"]
        except Exception as e:  # an ANTs failure is a result to report, not a crash
            res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        out.append(res)
        print(f"ANTS {job['id']} {job['method']} {res.get('seconds', float('nan')):.1f} s", file=sys.stderr, flush=True)
    return out


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import ants"], capture_output=True).returncode == 0:
        return py
    print(f"setting up {venv} with antspyx (one-time) ...", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "antspyx"], check=True)
    return py


def _stats(vals):
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label_maps", nargs="+", type=Path,
                    default=[LABELMAPS / f"training_seg_{i:02d}.nii.gz" for i in (13, 14, 15)])
    ap.add_argument("--label_stride", type=int, default=3, help="keep every N-th voxel (1 = full 256^3)")
    ap.add_argument("--contrasts", nargs="+", default=["t1", "t2"])
    ap.add_argument("--pair_kinds", nargs="+", default=["cross_subject_cross_modality"])
    ap.add_argument("--max_pairs", type=int, default=2, help="pairs per kind (seeded subset)")
    ap.add_argument("--rotations", nargs="+", type=float, default=[0, 45, 90, 135, 180])
    ap.add_argument("--methods", nargs="+", default=["Affine", "SyN", "antsRegistrationSyNQuick[s]"])
    ap.add_argument("--aligns", nargs="+", default=["affine", "tps_1"], help="keyreg aligns")
    ap.add_argument("--model", default=None, help="keyreg model (default: the bundled default model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="ITK threads for ANTs and torch threads for keyreg")
    ap.add_argument("--venv", type=Path, default=ROOT / ".bench" / "ants-venv")
    ap.add_argument("--append", help="append the tables to this markdown file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print("RESULT " + json.dumps(child_ants(json.loads(Path(args._child).read_text()))))
        return

    import numpy as np
    import torch

    from _report import append_section, machine_line

    from keyreg.api import resolve_model
    from keyreg.errors import KeyregError
    from keyreg.evaluate import draw_perturbation, evaluate, images_from_label_maps, make_pairs, perturb
    from keyreg.io import save_volume
    from keyreg.io import load_volume
    from keyreg.metrics import dice_per_label, mean_dice

    torch.set_num_threads(args.threads)
    for p in args.label_maps:
        if not p.exists():
            raise SystemExit(f"{p} not found (the shared label maps): pass --label_maps")
    images, synth = images_from_label_maps(args.label_maps, args.contrasts, seed=args.seed, stride=args.label_stride)
    pairs = make_pairs(images, args.pair_kinds, max_pairs_per_kind=args.max_pairs, seed=args.seed)
    shape = images[0].image.shape
    vox = images[0].image.spacing[0]
    data_note = (f"{len(images)} images ({len(args.label_maps)} label maps × contrasts {' '.join(args.contrasts)}, "
                 f"{synth}), {shape[0]}×{shape[1]}×{shape[2]} at {vox:g} mm; {len(pairs)} pair(s) "
                 f"({', '.join(args.pair_kinds)}, seed {args.seed}); rotations {' '.join(f'{r:g}' for r in args.rotations)}° "
                 f"about a random axis per (pair, angle)")
    print(data_note, flush=True)

    try:
        net = resolve_model(args.model, torch.device("cpu"))
        model_note = f"keyreg model {net.config.name} ({net.config.architecture.describe()})"
    except KeyregError as e:
        net = None
        model_note = f"keyreg: NO MODEL ({e}); only the ANTs rows were run"
    print(model_note, flush=True)

    dice: dict[tuple[str, float], list[float]] = {}
    seconds: dict[str, list[float]] = {}

    if net is not None:
        t0 = time.perf_counter()
        res = evaluate(images, pairs, model=net, aligns=args.aligns, rotations=args.rotations, seed=args.seed,
                       mode="header", device="cpu", progress=True)
        wall = time.perf_counter() - t0
        for r in res.rows:
            name = "before registration" if r["align"] == "none" else f"keyreg {r['align']}"
            dice.setdefault((name, r["rotation_deg"]), []).append(r["value"])
        ntask = len(pairs) * len(args.rotations)
        seconds["keyreg (all aligns, per pair)"] = [wall / ntask]
        for f in res.failures:
            print(f"keyreg failed: {f}", file=sys.stderr)

    ants_py = str(ensure_venv(args.venv))
    with tempfile.TemporaryDirectory(prefix="keyreg-vs-ants-") as tmp_name:
        tmp = Path(tmp_name)
        jobs, truth = [], {}
        for pi, pair in enumerate(pairs):
            mov, fix = images[pair.moving], images[pair.fixed]
            fixed_path = tmp / f"fixed_{pi}.nii.gz"
            if not fixed_path.exists():
                save_volume(fix.image.data, fix.image, fixed_path)
            for angle in args.rotations:
                pname = f"{mov.name}_to_{fix.name}"
                pert = draw_perturbation(args.seed, pname, angle)
                m_img, m_seg, _ = perturb(mov.image, mov.seg, pert, "header")
                jid = f"p{pi}_r{angle:g}"
                mpath = str(save_volume(m_img.data, m_img, tmp / f"{jid}_moving.nii.gz"))
                spath = str(save_volume(m_seg.data.astype(np.int32), m_seg, tmp / f"{jid}_moving_seg.nii.gz"))
                truth[jid] = (fix, angle)
                if net is None:  # the before-registration Dice, computed here when keyreg did not run
                    from keyreg.results import measure_before

                    before = measure_before(["harddice"], fixed=fix.image, moving=m_img, fixed_seg=fix.seg,
                                            moving_seg=m_seg, label_interp="nearest",
                                            device=torch.device("cpu"))["harddice"]
                    dice.setdefault(("before registration", angle), []).append(before)
                for method in args.methods:
                    safe = "".join(c if c.isalnum() else "_" for c in method)
                    jobs.append({"id": jid, "method": method, "fixed": str(fixed_path), "moving": mpath,
                                 "moving_seg": spath, "out_prefix": str(tmp / f"{jid}_{safe}_"),
                                 "out_seg": str(tmp / f"{jid}_{safe}_seg.nii.gz")})
        jobs_file = tmp / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
                   ANTS_RANDOM_SEED=str(args.seed or 1), OMP_NUM_THREADS=str(args.threads))
        env.pop("PYTHONPATH", None)
        print(f"ANTs: {len(jobs)} registrations ...", flush=True)
        proc = subprocess.run([ants_py, __file__, "--_child", str(jobs_file)], capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit("ANTs run failed")
        errors = []
        for r in json.loads(line[len("RESULT "):]):
            fix, angle = truth[r["id"]]
            name = f"ANTs {r['method']}"
            if "error" in r:
                errors.append(f"{name} {r['id']}: {r['error']}")
                continue
            warped = load_volume(r["out_seg"], kind="labels")
            if warped.shape != fix.seg.shape or not np.allclose(warped.affine, fix.seg.affine, atol=1e-3):
                raise SystemExit(f"{r['out_seg']}: ANTs output is not on the fixed grid")
            dice.setdefault((name, angle), []).append(mean_dice(dice_per_label(warped.data, fix.seg.data)))
            seconds.setdefault(name, []).append(r["seconds"])

    methods = list(dict.fromkeys(n for n, _ in dice))
    head = "| method | " + " | ".join(f"{a:g}°" for a in args.rotations) + " | max − min | time per registration (s) |"
    table = [head, "|---|" + "---|" * (len(args.rotations) + 2)]
    for name in methods:
        cells, means = [], []
        for a in args.rotations:
            m, s = _stats(dice.get((name, a), []))
            means.append(m)
            cells.append("n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}")
        finite = [m for m in means if math.isfinite(m)]
        spread = f"{max(finite) - min(finite):.3f}" if len(finite) > 1 else "n/a"
        if name.startswith("keyreg"):
            t = _stats(seconds.get("keyreg (all aligns, per pair)", []))[0]
            tcell = f"{t:.1f} (all keyreg aligns together)"
        elif name.startswith("ANTs"):
            t, ts = _stats(seconds.get(name, []))
            tcell = f"{t:.1f} ± {ts:.1f}"
        else:
            tcell = ""
        table.append(f"| {name} | " + " | ".join(cells) + f" | {spread} | {tcell} |")
    text = "Mean hard Dice ± std over pairs, by rotation of the moving image:\n\n" + "\n".join(table)
    if errors:
        text += "\n\nANTs failures:\n" + "\n".join(f"- {e}" for e in errors)
    text = f"{model_note}.\n\n{text}"
    print(text)
    if args.append:
        append_section(args.append, "keyreg vs ANTs (CPU)",
                       f"{machine_line(torch.device('cpu'))}\n\nData: {data_note}. ANTs: antspyx defaults per "
                       f"method, {args.threads} ITK thread(s); keyreg: {args.threads} torch thread(s).\n\n{text}")


if __name__ == "__main__":
    main()
