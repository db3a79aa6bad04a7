"""End-to-end speed and memory of `keyreg register` on a 256^3, 1 mm pair (issue 13), against ANTs Affine.

The pair is built from ``../shared/data/labelmaps`` (the first label map, 256^3 at 1 mm): the fixed
image is a synthetic T1-like contrast of the label map, the moving image a synthetic T2-like contrast
of the same label map moved by a known rigid transform (``ROTATION_DEG`` about ``ROTATION_AXIS``
plus ``TRANSLATION_MM``), each with its segmentation.  The files are cached under
``.bench/speed_1mm/`` (rebuilt when missing).

Each command runs as its own process (what a user runs); for every run the script prints wall time,
CPU time (user + system of the child, from ``wait4``), peak RSS (``ru_maxrss`` of the child) and the
per-stage seconds that ``keyreg register`` prints (``other`` = wall minus the stages: process start,
imports, tables).  ``keyreg --help`` is timed too (process start + the CLI's imports).  ANTs Affine
(antspyx ``ants.registration(type_of_transform="Affine")``) runs on the same pair in its own process
with the same number of threads; the script prints the ratios keyreg / ANTs measured in the same run
(the machine is shared, so ratios hold where absolute seconds do not).

    python benchmarks/speed_1mm.py [--repeats 3] [--threads 2] [--skip_ants] [--batch 10] \
        [--only full|affine|batch] [--batch_aligns ...] [--batch_metrics ...] [--compare_src DIR] \
        [--append docs/benchmarks.md]

``--batch N`` also registers a directory of N pairs (the fixed image under N names, the moving
image rotated differently per pair) with the full command (or ``--batch_aligns`` / ``--batch_metrics``)
and reports pairs per minute; ``--compare_src DIR`` runs the same batch with the keyreg of another
source tree too (alternating order), for a before/after measured under the same load.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELMAPS = ROOT.parent / "shared" / "data" / "labelmaps"
CACHE = ROOT / ".bench" / "speed_1mm"
ROTATION_DEG = 15.0
ROTATION_AXIS = (1.0, 0.5, -0.3)
TRANSLATION_MM = (6.0, -4.0, 3.0)
FULL_ALIGNS = ["rigid", "affine", "tps_0", "tps_10"]
FULL_METRICS = ["harddice", "hausd", "jdstd"]


def pair_paths(out: Path, name: str = "pair") -> dict[str, Path]:
    """The four files of a cached pair: ``<name>_{fixed,moving}{,_seg}.nii.gz`` under ``out``."""
    return {k: out / f"{name}_{k}.nii.gz" for k in ("fixed", "moving", "fixed_seg", "moving_seg")}


def build_pair(out: Path, *, seed: int = 0, rotation_deg: float = ROTATION_DEG, name: str = "pair") -> dict[str, Path]:
    """Write ``<name>_{fixed,moving}{,_seg}.nii.gz`` under ``out`` (cached); returns the four paths."""
    paths = pair_paths(out, name)
    if all(p.exists() for p in paths.values()):
        return paths
    import nibabel as nib
    import torch

    from keyreg.geometry import rotation_about
    from keyreg.train.synth import (
        IntensityAugment,
        synthesize_image,
        warp_labels_on_grid,
    )

    src = sorted(LABELMAPS.glob("*.nii*"))
    if not src:
        raise SystemExit(f"no label maps under {LABELMAPS}")
    img = nib.load(src[0])
    labels = np.asarray(img.dataobj).round().astype(np.int16)
    affine = img.affine.astype(np.float64)
    lab_t = torch.from_numpy(labels.astype(np.int64))[None, None]
    aff_t = torch.as_tensor(affine)
    center = aff_t[:3, :3] @ torch.tensor([(n - 1) / 2 for n in labels.shape], dtype=torch.float64) + aff_t[:3, 3]
    r3 = torch.as_tensor(rotation_about(ROTATION_AXIS, rotation_deg))
    rot = torch.eye(4, dtype=torch.float64)
    rot[:3, :3] = r3
    rot[:3, 3] = center - r3 @ center + torch.tensor(TRANSLATION_MM, dtype=torch.float64)
    # moving labels: the fixed anatomy seen through a known rigid transform (moving_from_fixed^-1)
    moving_from_fixed = rot
    moved = warp_labels_on_grid(lab_t, aff_t, labels.shape, aff_t, torch.linalg.inv(moving_from_fixed)[None])
    aug = IntensityAugment(resolution_prob=0.0, skull_strip_prob=0.0)
    g = torch.Generator().manual_seed(seed)
    fixed_img = synthesize_image(lab_t, g, contrast="t1", augment=aug, skull_strip=False)[0, 0].numpy()
    moving_img = synthesize_image(moved, g, contrast="t2", augment=aug, skull_strip=False)[0, 0].numpy()
    out.mkdir(parents=True, exist_ok=True)
    for key, data in (("fixed", fixed_img), ("moving", moving_img), ("fixed_seg", labels),
                      ("moving_seg", moved[0, 0].numpy().astype(np.int16))):
        nib.save(nib.Nifti1Image(data, affine), str(paths[key]))
    (out / f"{name}_truth.txt").write_text(
        f"moving_from_fixed (RAS mm), rotation {rotation_deg} deg about {ROTATION_AXIS}, "
        f"translation {TRANSLATION_MM} mm:\n{np.array2string(moving_from_fixed.numpy(), precision=6)}\n")
    return paths


def build_pair_apart(out: Path, **kwargs) -> dict[str, Path]:
    """:func:`build_pair` in a child process: a child's peak RSS (``ru_maxrss``) starts at its parent's
    high-water mark (Linux carries it over ``fork`` and ``exec``), so the 2.7 GB of building a pair here
    would show as every timed command's peak."""
    import multiprocessing

    paths = pair_paths(out, kwargs.get("name", "pair"))
    if all(p.exists() for p in paths.values()):
        return paths  # cached: nothing to build
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build_pair, (out,), kwargs)


def timed_process(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; wall, user+sys CPU and peak RSS of the child (``wait4``), and its stderr/stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{text_err[-3000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "sys": ru.ru_stime,
            "rss_mb": ru.ru_maxrss / 1024, "stdout": text_out, "stderr": text_err}


def parse_stages(stderr: str) -> dict[str, float]:
    m = re.search(r"time per stage .*?\): (.*)", stderr)
    if not m:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", m.group(1))}


def keyreg_cmd(paths: dict[str, Path], save_dir: Path, full: bool, search: str | None = None) -> list[str]:
    """The full or the affine-only command; ``search`` adds ``--orientation_search``."""
    cmd = [sys.executable, "-m", "keyreg.cli", "register", "--moving", str(paths["moving"]), "--fixed",
           str(paths["fixed"]), "--save_dir", str(save_dir), "--device", "cpu"]
    if full:
        cmd += ["--moving_seg", str(paths["moving_seg"]), "--fixed_seg", str(paths["fixed_seg"]),
                "--list_of_aligns", *FULL_ALIGNS, "--list_of_metrics", *FULL_METRICS, "--save_eval_to_disk"]
    else:
        cmd += ["--list_of_aligns", "affine"]
    return cmd + (["--orientation_search", search] if search else [])


ANTS_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import ants
f = ants.image_read(sys.argv[1]); m = ants.image_read(sys.argv[2])
t1 = time.perf_counter()
r = ants.registration(fixed=f, moving=m, type_of_transform="Affine")
t2 = time.perf_counter()
print(f"ants import+read {t1 - t0:.2f} s, registration {t2 - t1:.2f} s")
"""


def median(xs):
    return float(np.median(xs)) if xs else float("nan")


def fmt_runs(runs: list[dict]) -> str:
    return " / ".join(f"{r['wall']:.1f}" for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_ants", action="store_true")
    p.add_argument("--only", choices=["full", "affine", "batch"],
                   help="run one of the two commands, or only the batch (with --batch N)")
    p.add_argument("--batch", type=int, default=0, help="also time a directory of N pairs (full command)")
    p.add_argument("--batch_aligns", nargs="+", default=FULL_ALIGNS, help="aligns of the batch command")
    p.add_argument("--batch_metrics", nargs="+", default=FULL_METRICS, help="metrics of the batch command")
    p.add_argument("--compare_src", type=Path, default=None,
                   help="also run the batch with the keyreg under this source tree (e.g. a worktree of an "
                        "older commit), alternating with this one, for a before/after in the same run")
    p.add_argument("--orientation_search", nargs="+", choices=["default", "always", "auto"], default=["default"],
                   help="run each command with each of these orientation search modes (default: the model's)")
    p.add_argument("--label", default="", help="a label for the table (e.g. before / after)")
    p.add_argument("--append", help="append the tables to this markdown file")
    args = p.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[var] = str(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    t = time.perf_counter()
    paths = build_pair_apart(CACHE)
    print(f"pair: {paths['fixed'].parent} ({time.perf_counter() - t:.1f} s to build or find)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="keyreg_speed_"))
    lines: list[str] = []
    results: dict[str, list[dict]] = {}
    try:
        help_runs = [timed_process([sys.executable, "-m", "keyreg.cli", "--help"], env) for _ in range(args.repeats)]
        imp = timed_process([sys.executable, "-c", "import time; t = time.perf_counter(); import keyreg.api, "
                             "keyreg.metrics, keyreg.export; print(time.perf_counter() - t)"], env)
        commands = [("full", True), ("affine", False)]
        if args.only:
            commands = [c for c in commands if c[0] == args.only]
        modes = [None if m == "default" else m for m in args.orientation_search]
        commands = [(key if mode is None else f"{key} ({mode})", full, mode) for key, full in commands for mode in modes]
        for rep in range(args.repeats if commands else 0):
            for key, full, mode in commands:
                save = work / f"{key.split()[0]}_{rep}"
                r = timed_process(keyreg_cmd(paths, save, full, mode), env)
                r["stages"] = parse_stages(r["stderr"])
                if full:
                    r["disk_mb"] = sum(f.stat().st_size for f in save.rglob("*") if f.is_file()) / 2**20
                shutil.rmtree(save, ignore_errors=True)
                results.setdefault(key, []).append(r)
                print(f"{key} run {rep + 1}: wall {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, "
                      f"peak RSS {r['rss_mb']:.0f} MiB, stages {r['stages']}", flush=True)
        ants = None
        if not args.skip_ants and args.only != "batch":
            ants = timed_process([sys.executable, "-c", ANTS_SCRIPT, str(paths["fixed"]), str(paths["moving"])], env)
            print(f"ANTs Affine: wall {ants['wall']:.1f} s, cpu {ants['cpu']:.1f} s, peak RSS "
                  f"{ants['rss_mb']:.0f} MiB ({ants['stdout'].strip()})", flush=True)
        batches: list[tuple[str, dict]] = []
        if args.batch:
            trees = [("this tree", ROOT)] + ([("compare", args.compare_src.resolve())] if args.compare_src else [])
            for rep in range(args.repeats):
                for label, tree in (trees if rep % 2 == 0 else trees[::-1]):
                    benv = dict(env)
                    benv["PYTHONPATH"] = str(tree / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
                    b = run_batch(args.batch, work, benv, args.batch_aligns, args.batch_metrics)
                    batches.append((label, b))
                    print(f"batch of {args.batch} pairs ({label}: {tree}): wall {b['wall']:.1f} s, cpu "
                          f"{b['cpu']:.1f} s, {b['ppm']:.2f} pairs/minute (wall), peak RSS {b['rss_mb']:.0f} MiB",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    lines.append(f"## End-to-end speed at 256³, 1 mm (cpu){' — ' + args.label if args.label else ''}\n")
    lines.append(f"Machine: {platform.node() or 'vm'}, {os.cpu_count()} cores, {platform.machine()}, "
                 f"{args.threads} threads; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.  Command: "
                 f"`python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n")
    lines.append("Pair: the first label map of `../shared/data/labelmaps` (256³, 1 mm) as a synthetic T1 "
                 f"(fixed) and a synthetic T2 moved by a {ROTATION_DEG:g}° rotation + {TRANSLATION_MM} mm "
                 "(moving), with both segmentations; default model; each command a fresh process; "
                 f"median of {args.repeats} (all runs' walls in the last column). The machine's speed "
                 "drifts between runs: compare ratios measured in the same run.\n")
    lines.append("| command | wall (s) | CPU (s) | system (s) | peak RSS (MiB) | runs (wall s) |")
    lines.append("|---|---|---|---|---|---|")
    names = {"full": f"full: {' '.join(FULL_ALIGNS)}, {' '.join(FULL_METRICS)}, --save_eval_to_disk",
             "affine": "affine only, no saving"}
    def label(key: str) -> str:
        return names[key.split()[0]] + (f", --orientation_search {key.split('(')[1][:-1]}" if "(" in key else "")

    for key, runs in results.items():
        lines.append(f"| {label(key)} | {median([r['wall'] for r in runs]):.1f} | "
                     f"{median([r['cpu'] for r in runs]):.1f} | {median([r['sys'] for r in runs]):.1f} | "
                     f"{median([r['rss_mb'] for r in runs]):.0f} | {fmt_runs(runs)} |")
    lines.append(f"| `keyreg --help` (process start + CLI imports) | {median([r['wall'] for r in help_runs]):.2f} | "
                 f"{median([r['cpu'] for r in help_runs]):.2f} | | {median([r['rss_mb'] for r in help_runs]):.0f} | "
                 f"{fmt_runs(help_runs)} |")
    if ants is not None:
        lines.append(f"| ANTs Affine (antspyx, whole process) | {ants['wall']:.1f} | {ants['cpu']:.1f} | "
                     f"{ants['sys']:.1f} | {ants['rss_mb']:.0f} | {ants['stdout'].strip()} |")
    lines.append("")
    lines.append(f"Import of keyreg.api + metrics + export in a fresh process: {float(imp['stdout']):.2f} s.")
    full_runs = [r for k, runs in results.items() if k.startswith("full") for r in runs]
    if full_runs:
        lines.append(f"Full command output on disk: {median([r['disk_mb'] for r in full_runs]):.0f} MiB.")
    lines.append("")
    if ants is not None:
        ratios = [f"{label(k)}: {median([r['wall'] for r in runs]) / ants['wall']:.2f}" for k, runs in results.items()]
        lines.append("Wall-time ratio keyreg / ANTs Affine (same run): " + "; ".join(ratios) + ".\n")
    for key, runs in results.items():
        stages = sorted({s for r in runs for s in r["stages"]}, key=lambda s: list(runs[0]["stages"]).index(s)
                        if s in runs[0]["stages"] else 99)
        if not stages:
            continue
        lines.append(f"Stages of `{key}` (s, median; `other` = wall − stages: process start, imports, tables):\n")
        lines.append("| " + " | ".join(stages + ["other"]) + " |")
        lines.append("|" + "---|" * (len(stages) + 1))
        med = {s: median([r["stages"].get(s, 0.0) for r in runs]) for s in stages}
        other = median([r["wall"] - sum(r["stages"].values()) for r in runs])
        lines.append("| " + " | ".join(f"{med[s]:.2f}" for s in stages) + f" | {other:.2f} |\n")
    if batches:
        lines.append(f"Batch: a directory of {args.batch} pairs, one process, `--list_of_aligns "
                     f"{' '.join(args.batch_aligns)} --list_of_metrics {' '.join(args.batch_metrics)} "
                     "--save_eval_to_disk`:\n")
        lines.append("| code | wall (s) | CPU (s) | pairs/minute (wall) | peak RSS (MiB) |")
        lines.append("|---|---|---|---|---|")
        for label, b in batches:
            lines.append(f"| {label} | {b['wall']:.1f} | {b['cpu']:.1f} | {b['ppm']:.2f} | {b['rss_mb']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


def run_batch(n: int, work: Path, env: dict[str, str], aligns=FULL_ALIGNS, metrics=FULL_METRICS) -> dict:
    """A directory of ``n`` pairs (same fixed image, moving rotated by 5..15 degrees), full command."""
    dirs = {k: work / "batch" / k for k in ("fixed", "moving", "fixed_seg", "moving_seg")}
    shutil.rmtree(work / "batch", ignore_errors=True)
    shutil.rmtree(work / "batch_out", ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        deg = 5.0 + 10.0 * i / max(n - 1, 1)
        paths = build_pair_apart(CACHE / "batch", seed=i, rotation_deg=deg, name=f"p{i:02d}")
        for k, d in dirs.items():
            os.symlink(paths[k], d / f"p{i:02d}.nii.gz")
    cmd = [sys.executable, "-m", "keyreg.cli", "register", "--moving", str(dirs["moving"]), "--fixed", str(dirs["fixed"]),
           "--moving_seg", str(dirs["moving_seg"]), "--fixed_seg", str(dirs["fixed_seg"]),
           "--list_of_aligns", *aligns, "--list_of_metrics", *metrics, "--save_eval_to_disk",
           "--save_dir", str(work / "batch_out"), "--device", "cpu"]
    r = timed_process(cmd, env)
    shutil.rmtree(work / "batch_out", ignore_errors=True)
    r["ppm"] = 60.0 * n / r["wall"]
    return r


if __name__ == "__main__":
    main()
