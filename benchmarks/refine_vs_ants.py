"""Dense refinement after the keypoint fit versus ANTs SyN: Dice, folding and wall time, one table.

Data: the held-out shared label maps ``training_seg_13..15`` at 2 mm (every 2nd voxel), each with a
seeded synthetic T1 and T2 contrast (``keyreg.evaluate.images_from_label_maps``, i.e. the training
generator ``keyreg.train.synth``: ``random_means`` with ``contrast="t1"``/``"t2"`` and
``synthesize_image``).  Pairs are always two different subjects:

* (a) T1 -> T2 (moving T1, fixed T2), the moving image rotated by 0 and by 90 degrees about a
  seeded random axis (header rotation: the voxels do not change);
* (b) T1 -> T1, no rotation.

Columns, each with the mean Dice over the FreeSurfer brain labels 2..60 present in either
segmentation, the % of non-positive Jacobian determinants inside the fixed brain mask (fixed
segmentation > 0), and the wall time of the registration:

* keyreg keypoint ``affine``, keyreg keypoint ``tps_<λ>``;
* ``+ affine`` / ``+ deformable`` refinement (``keyreg.refine``) started from the keypoint affine,
  with MIND-SSC for (a) and LNCC for (b) (``--refine_similarity``);
* ANTs ``SyN`` (antspyx; Mattes MI for (a), CC radius 4 for (b)) and
  ``antsRegistrationSyNQuick[s]`` (antspyx defaults).

Wall times: keyreg's keypoint columns time detection + fit + warp; refinement columns add the
refinement on top of the keypoint affine (the refinement alone is its own column).  ANTs and torch
both get ``--threads`` threads.  Without ``--only``, each pair runs ANTs (in a child process) and then
keyreg back to back, so that the two see the same load of a shared machine.

The safeguard (``keyreg.refine``) decides from the images only (the refinement is not given the
segmentations); a second table lists, per pair and refinement, the Dice of the start and of the
refined candidate, whether the safeguard kept the start, and the Dice change of what is returned
(the target: never below -0.01).

Results are cached per (row, pair, method) in ``<work>/results.json``, so ``--only ants`` and
``--only keyreg`` can run separately (e.g. ANTs in the background) and a final run prints the tables.

Usage:
    python benchmarks/refine_vs_ants.py [--pairs 2] [--threads 2] [--work .bench/refine] \\
        [--only data|ants|keyreg|table] [--rows a0 a90 b] [--model keyreg-anatomy] \\
        [--ants_from .bench/refine/results.json] [--refine_similarity mind|lncc] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

LABELMAPS = ROOT.parent / "shared" / "data" / "labelmaps"
ROWS = {"a0": ("t1", "t2", 0.0), "a90": ("t1", "t2", 90.0), "b": ("t1", "t1", 0.0)}
ROW_TITLES = {"a0": "(a) T1→T2, 0°", "a90": "(a) T1→T2, 90°", "b": "(b) T1→T1"}
#: the refinement's similarity per row, as ANTs SyN gets Mattes MI for (a) and CC for (b)
REFINE_SIMILARITY = {"a0": "mind", "a90": "mind", "b": "lncc"}


def brain_dice(warped_seg, fixed_seg) -> float:
    """Mean Dice over the brain labels 2..60 present in either segmentation (``keyreg.metrics.BRAIN_LABELS``)."""
    from keyreg.metrics import brain_dice_per_label, mean_dice

    return mean_dice(brain_dice_per_label(warped_seg, fixed_seg))


def make_data(work: Path, npairs: int, seed: int) -> list[dict]:
    """Write the pairs' images and segmentations under ``work/data``; return the job list."""
    import numpy as np

    from keyreg.evaluate import draw_perturbation, images_from_label_maps, perturb
    from keyreg.io import save_volume

    manifest = work / "data" / "pairs.json"
    if manifest.exists():
        jobs = json.loads(manifest.read_text())
        if len({j["pair"] for j in jobs}) >= npairs:
            return [j for j in jobs if int(j["pair"].split("_")[0][1:]) < npairs]
    maps = [LABELMAPS / f"training_seg_{i:02d}.nii.gz" for i in (13, 14, 15)]
    for p in maps:
        if not p.exists():
            raise SystemExit(f"{p} not found (the shared label maps)")
    images, _ = images_from_label_maps(maps, ["t1", "t2"], seed=seed, stride=2)
    by = {(im.subject, im.modality): im for im in images}
    subjects = list(dict.fromkeys(im.subject for im in images))
    ring = [(subjects[i], subjects[(i + 1) % len(subjects)]) for i in range(len(subjects))][:npairs]
    (work / "data").mkdir(parents=True, exist_ok=True)
    jobs = []
    for row, (cm, cf, angle) in ROWS.items():
        for pi, (sm, sf) in enumerate(ring):
            mov, fix = by[(sm, cm)], by[(sf, cf)]
            pname = f"p{pi}_{sm}_{cm}_to_{sf}_{cf}"
            pert = draw_perturbation(seed, pname, angle)
            m_img, m_seg, _ = perturb(mov.image, mov.seg, pert, "header")
            d = work / "data"
            job = {"row": row, "pair": pname,
                   "fixed": str(save_volume(fix.image.data, fix.image, d / f"{sf}_{cf}.nii.gz")),
                   "fixed_seg": str(save_volume(fix.seg.data.astype(np.int32), fix.seg, d / f"{sf}_seg.nii.gz")),
                   "moving": str(save_volume(m_img.data, m_img, d / f"{row}_{pname}_moving.nii.gz")),
                   "moving_seg": str(save_volume(m_seg.data.astype(np.int32), m_seg, d / f"{row}_{pname}_moving_seg.nii.gz"))}
            jobs.append(job)
    manifest.write_text(json.dumps(jobs, indent=1))
    return jobs


class Results:
    """``results.json``: key ``row|pair|method`` -> ``{dice, nonpos_pct, seconds, ...}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def has(self, job: dict, method: str) -> bool:
        return f"{job['row']}|{job['pair']}|{method}" in self.data

    def put(self, job: dict, method: str, value: dict) -> None:
        fresh = json.loads(self.path.read_text()) if self.path.exists() else {}
        fresh[f"{job['row']}|{job['pair']}|{method}"] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(fresh, indent=1))
        tmp.replace(self.path)
        self.data = fresh
        print(f"{job['row']} {job['pair']} {method}: {value}", flush=True)


def run_ants(jobs: list[dict], results: Results, threads: int, seed: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["ANTS_RANDOM_SEED"] = str(seed or 1)
    import ants
    import numpy as np

    for job in jobs:
        for method in ("SyN", "antsRegistrationSyNQuick[s]"):
            if results.has(job, f"ANTs {method}"):
                continue
            fixed, moving = ants.image_read(job["fixed"]), ants.image_read(job["moving"])
            fseg = np.rint(ants.image_read(job["fixed_seg"]).numpy()).astype(np.int32)
            mseg = ants.image_read(job["moving_seg"])
            kw = {}
            if method == "SyN":
                kw = {"syn_metric": "CC", "syn_sampling": 4} if job["row"] == "b" else {"syn_metric": "mattes"}
            prefix = str(Path(job["fixed"]).parent / f"ants_{job['row']}_{job['pair']}_{method[:4]}_")
            t0 = time.perf_counter()
            try:
                reg = ants.registration(fixed, moving, type_of_transform=method, outprefix=prefix,
                                        random_seed=seed or 1, **kw)
                secs = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a failure is a result
                results.put(job, f"ANTs {method}", {"error": f"{type(e).__name__}: {e}"[:200]})
                continue
            warped = ants.apply_transforms(fixed, mseg, reg["fwdtransforms"], interpolator="genericLabel").numpy()
            warped = np.rint(warped).astype(np.int32)  # label values, stored as float by ANTs
            warp = next((t for t in reg["fwdtransforms"] if t.endswith(".nii.gz")), None)
            nonpos = float("nan")
            if warp is not None:
                jac = ants.create_jacobian_determinant_image(fixed, warp, do_log=False).numpy()
                nonpos = 100.0 * float(np.mean(jac[fseg > 0] <= 0))
            results.put(job, f"ANTs {method}", {"dice": brain_dice(warped, fseg), "nonpos_pct": nonpos,
                                                "seconds": secs})


class KeyregRunner:
    """keyreg keypoint affine / TPS and the two refinements of one pair at a time (the model loaded once)."""

    def __init__(self, results: Results, threads: int, model: str | None, tps: str) -> None:
        import torch

        from keyreg.api import resolve_model

        torch.set_num_threads(threads)
        self.results, self.tps = results, tps
        self.net = resolve_model(model, torch.device("cpu"))
        self.desc = f"{self.net.config.name} ({self.net.config.architecture.describe()})"

    def methods(self) -> list[str]:
        return ["keyreg affine", f"keyreg {self.tps}", "keyreg affine + affine refinement",
                "keyreg affine + deformable refinement"]

    def __call__(self, job: dict) -> None:
        import numpy as np

        import keyreg
        from keyreg.io import load_volume
        from keyreg.metrics import jacobian_determinant
        from keyreg.refine import RefineOptions, refine_transform
        from keyreg.transforms import sample_field
        from keyreg.warp import warp_labels

        results, tps = self.results, self.tps
        fseg = load_volume(job["fixed_seg"], kind="labels").data
        if all(results.has(job, m) for m in self.methods()):
            return
        t0 = time.perf_counter()
        reg = keyreg.register(job["moving"], job["fixed"], model=self.net, aligns=["affine", tps],
                              moving_seg=job["moving_seg"], fixed_seg=job["fixed_seg"], device="cpu")
        t_kp = time.perf_counter() - t0
        for align in ("affine", tps):
            res = reg[align]
            dense = res.dense_transform()
            nonpos = 0.0
            if hasattr(dense, "displacement"):
                nonpos = 100.0 * float(np.mean(jacobian_determinant(dense)[fseg > 0] <= 0))
            results.put(job, f"keyreg {align}", {"dice": brain_dice(res.warped_seg.data, fseg),
                                                 "nonpos_pct": nonpos, "seconds": t_kp})

        def seg_dice(transform) -> float:
            seg = warp_labels(reg.moving_seg.tensor()[:, 0], reg.moving.affine, reg.fixed.shape, reg.fixed.affine,
                              transform)[0].numpy()
            return brain_dice(seg, fseg)

        start = reg["affine"].transform
        d_start = seg_dice(start)
        for stage in ("affine", "deformable"):
            t1 = time.perf_counter()
            # no segmentations: the safeguard decides from the images; Dice is measured here, untimed
            out = refine_transform(reg.fixed, reg.moving, start, stage=stage,
                                   options=RefineOptions(similarity=REFINE_SIMILARITY[job["row"]]))
            t_ref = time.perf_counter() - t1
            nonpos = 0.0
            if getattr(out.transform, "phi", None) is not None:
                dense = sample_field(out.transform, reg.fixed.shape, reg.fixed.affine, stride=1)
                nonpos = 100.0 * float(np.mean(jacobian_determinant(dense)[fseg > 0] <= 0))
            rep = out.report
            results.put(job, f"keyreg affine + {stage} refinement",
                        {"dice": seg_dice(out.transform), "nonpos_pct": nonpos, "seconds": t_ref + t_kp,
                         "kept_start": out.kept_start, "refine_seconds": t_ref, "dice_start": d_start,
                         "dice_candidate": seg_dice(out.candidate), "reason": rep.get("reason", ""),
                         "nmi": [rep["nmi_start"], rep["nmi_end"]],
                         "dissimilarity": [rep["similarity_start"], rep["similarity_end"]],
                         "iterations": rep.get("deformable", rep["affine"]).get("iterations_per_level",
                                                                                rep["affine"]["iterations"])})


def table(jobs: list[dict], results: Results, tps: str) -> str:
    methods = ["keyreg affine", f"keyreg {tps}", "keyreg affine + affine refinement",
               "keyreg affine + deformable refinement", "ANTs SyN", "ANTs antsRegistrationSyNQuick[s]"]
    lines = ["| row | method | Dice (brain, 2–60) | non-positive Jacobian (% of fixed mask) | wall time (s) | "
             "refinement alone (s) | pairs |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        for m in methods:
            vals = [results.data.get(f"{row}|{j['pair']}|{m}") for j in jobs if j["row"] == row]
            ok = [v for v in vals if v and "dice" in v]
            errs = [v for v in vals if v and "error" in v]
            if not ok and not errs:
                continue

            def ms(key, ok=ok):
                xs = [v[key] for v in ok if key in v and math.isfinite(v[key])]
                if not xs:
                    return "n/a"
                mean = sum(xs) / len(xs)
                sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
                return f"{mean:.3f} ± {sd:.3f}" if key == "dice" else f"{mean:.3f}" if key == "nonpos_pct" \
                    else f"{mean:.1f}"

            note = f"{len(ok)}" + (f" ({len(errs)} failed)" if errs else "")
            kept = sum(1 for v in ok if v.get("kept_start"))
            if kept:
                note += f", start kept on {kept}"
            alone = ms("refine_seconds")
            lines.append(f"| {ROW_TITLES[row]} | {m} | {ms('dice')} | {ms('nonpos_pct')} | {ms('seconds')} | "
                         f"{'–' if alone == 'n/a' else alone} | {note} |")
    return "\n".join(lines)


def safeguard_table(jobs: list[dict], results: Results) -> str:
    """Per pair and refinement: Dice of the start, of the candidate and of what is returned; the
    safeguard's decision (from the images); the refinement's time against ANTs SyN's on the pair."""
    lines = ["| row | pair | refinement | Dice start | Dice candidate | safeguard | Dice returned | change | "
             "NMI start → candidate | refinement (s) | ANTs SyN (s) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        syn = results.data.get(f"{job['row']}|{job['pair']}|ANTs SyN", {})
        for stage in ("affine", "deformable"):
            v = results.data.get(f"{job['row']}|{job['pair']}|keyreg affine + {stage} refinement")
            if not v or "dice_start" not in v:
                continue
            fired = "kept start" if v["kept_start"] else "accepted"
            change = v["dice"] - v["dice_start"]
            ratio = f"{v['refine_seconds'] / syn['seconds']:.2f}" if syn.get("seconds") else "n/a"
            pair = job["pair"].split("_")
            lines.append(f"| {ROW_TITLES[job['row']]} | {pair[3]}→{pair[8]} | {stage} | {v['dice_start']:.3f} | "
                         f"{v['dice_candidate']:.3f} | {fired} | {v['dice']:.3f} | {change:+.3f} | "
                         f"{v['nmi'][0]:.4f} → {v['nmi'][1]:.4f} | {v['refine_seconds']:.1f} | "
                         f"{syn.get('seconds', float('nan')):.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="pairs per row (at most 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tps", default="tps_1", help="the keypoint TPS column")
    ap.add_argument("--model", default=None, help="keyreg model (default: the bundled default)")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "refine")
    ap.add_argument("--only", choices=["data", "ants", "keyreg", "table"])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument("--ants_from", type=Path,
                    help="reuse the ANTs results of another work directory's results.json (same data and seed: "
                         "ANTs does not depend on the keyreg model)")
    ap.add_argument("--refine_similarity", choices=["mind", "lncc"],
                    help="the refinement's similarity on every row (default: MIND-SSC for (a), LNCC for (b))")
    ap.add_argument("--pair_names", nargs="+", help="only these pairs (names as in results.json)")
    args = ap.parse_args()
    if args.refine_similarity:
        REFINE_SIMILARITY.update(dict.fromkeys(ROWS, args.refine_similarity))
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in make_data(args.work, min(args.pairs, 3), args.seed) if j["row"] in args.rows
            and (not args.pair_names or j["pair"] in args.pair_names)]
    results = Results(args.work / "results.json")
    if args.ants_from:
        other = json.loads(args.ants_from.read_text())
        for job in jobs:
            for m in ("ANTs SyN", "ANTs antsRegistrationSyNQuick[s]"):
                key = f"{job['row']}|{job['pair']}|{m}"
                if key in other and not results.has(job, m):
                    results.put(job, m, other[key])
    desc = None
    if args.only == "ants":
        run_ants(jobs, results, args.threads, args.seed)
    elif args.only == "keyreg":
        runner = KeyregRunner(results, args.threads, args.model, args.tps)
        desc = runner.desc
        for job in jobs:
            runner(job)
    elif args.only is None:  # per pair, ANTs then keyreg: the same load for both
        runner = KeyregRunner(results, args.threads, args.model, args.tps)
        desc = runner.desc
        for job in jobs:
            # ANTs in a child process, as users run it: ITK's threads left in this process slowed
            # the refinement that followed by 2x (7.5 s -> 14.7 s on a T1 -> T2 pair)
            subprocess.run([sys.executable, __file__, "--only", "ants", "--work", str(args.work), "--pairs",
                            str(args.pairs), "--threads", str(args.threads), "--seed", str(args.seed),
                            "--rows", job["row"], "--pair_names", job["pair"]], check=True)
            results.data = json.loads(results.path.read_text()) if results.path.exists() else {}
            runner(job)
    if args.only in ("data", "ants", "keyreg"):
        return
    text = table(jobs, results, args.tps) + "\n\n" + safeguard_table(jobs, results)
    print(text)
    if args.append:
        import torch
        from _report import append_section, machine_line

        if desc is None:
            from keyreg.api import resolve_model

            net = resolve_model(args.model, torch.device("cpu"))
            desc = f"{net.config.name} ({net.config.architecture.describe()})"
        torch.set_num_threads(args.threads)
        append_section(args.append, "Dense refinement vs ANTs SyN (CPU)",
                       f"{machine_line('cpu')}\n\nData: held-out label maps 13–15 at 2 mm, synthetic T1/T2 "
                       f"(keyreg.train.synth), {args.pairs} pair(s) of different subjects per row; keyreg model "
                       f"{desc}; {args.threads} threads for ANTs and torch, on a machine shared with a training "
                       f"job (times are noisy; compare within a row).\n\n{text}")


if __name__ == "__main__":
    main()
