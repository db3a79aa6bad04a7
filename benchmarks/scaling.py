"""All-pairs registration of n images: network passes (must be n, not 2 n (n - 1)) and time vs n.

Runs ``keyreg register --moving DIR --fixed DIR --all_pairs`` in-process on n synthetic head images
(``--size``^3 voxels over a 256 mm field of view) with a random-weight model of the bundled
architecture (keyreg's training default when no model is bundled), counting the images that go
through the network's ``forward``.

Usage:
    python benchmarks/scaling.py [--n 2 4 8 16] [--size 64] [--aligns affine tps_0] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _data import head_image, random_model_config  # noqa: E402


def bench_model(tmp: Path):
    """A random-weight model of the bundled architecture, saved in keyreg's format; returns (path, note)."""
    import torch

    from keyreg.models import ArchitectureConfig, KeypointDetector, ModelConfig, list_pretrained, save_model
    from keyreg.models.checkpoint import _resolve_default
    from keyreg.preprocess import GridSpec, PreprocessConfig

    models = list_pretrained()
    torch.manual_seed(0)
    if models:
        c = models[_resolve_default()]
        cfg = ModelConfig("bench-random", c.architecture, c.preprocessing)
        note = f"bundled model {c.name}'s architecture ({c.architecture.describe()}), random weights"
    else:
        m = random_model_config("keyreg", 64)
        cfg = ModelConfig("bench-random", ArchitectureConfig("truncatedunet", 64, num_levels=m["num_levels"],
                                                             num_truncated=m["num_truncated"], f_maps=m["f_maps"]),
                          PreprocessConfig(GridSpec("ras", (m["grid"],) * 3, (m["voxel"],) * 3)))
        note = f"no bundled model installed: keyreg's training-default architecture ({cfg.architecture.describe()}, " \
               f"{m['grid']}³ grid at {m['voxel']} mm), random weights"
    weights, _ = save_model(KeypointDetector(cfg), tmp / "bench-model")
    return weights, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--size", type=int, default=64, help="voxels per axis of each image (256 mm field of view)")
    ap.add_argument("--aligns", nargs="+", default=["affine", "tps_0"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--append", help="append the table to this markdown file")
    args = ap.parse_args()

    import nibabel as nib
    import torch

    from _report import append_section, machine_line

    from keyreg.cli import main as keyreg_main
    from keyreg.models import KeypointDetector

    passes = {"images": 0, "calls": 0}
    original = KeypointDetector.forward

    def counting_forward(self, x):
        passes["images"] += int(x.shape[0])
        passes["calls"] += 1
        return original(self, x)

    KeypointDetector.forward = counting_forward  # type: ignore[method-assign]
    rows = []
    with tempfile.TemporaryDirectory(prefix="keyreg-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        model, note = bench_model(tmp)
        print(f"model: {note}", flush=True)
        voxel = 256.0 / args.size
        for n in args.n:
            d = tmp / f"n{n}"
            d.mkdir()
            for i in range(n):
                data, aff = head_image(args.size, voxel, seed=100 + i, shift_mm=(2.0 * i, -1.5 * i, i))
                nib.save(nib.Nifti1Image(data, aff), str(d / f"img{i:02d}.nii.gz"))
            passes.update(images=0, calls=0)
            err = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = keyreg_main(["register", "--moving", str(d), "--fixed", str(d), "--all_pairs",
                                  "--load_path", str(model), "--list_of_aligns", *args.aligns,
                                  "--save_dir", str(tmp / f"out{n}"), "--device", args.device])
            total = time.perf_counter() - t0
            if rc != 0:
                print(err.getvalue()[-3000:], file=sys.stderr)
                raise SystemExit(f"n={n}: keyreg register failed (exit {rc})")
            stages = dict(re.findall(r"(\w+) ([0-9.]+) s", err.getvalue().split("time per stage (all pairs):")[-1]))
            pairs = n * (n - 1)
            rows.append((n, pairs, passes["images"], passes["calls"], total, float(stages.get("keypoints", "nan"))))
            print(f"n={n}: {pairs} pairs, {passes['images']} images through the network in {passes['calls']} "
                  f"call(s), {total:.1f} s", flush=True)
    KeypointDetector.forward = original  # type: ignore[method-assign]

    table = ["| n | pairs | images through the network | per-pair detection would need | network calls | "
             "total time (s) | keypoint time (s) | time per pair (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, pairs, imgs, calls, total, kp in rows:
        table.append(f"| {n} | {pairs} | {imgs} | {2 * pairs} | {calls} | {total:.1f} | {kp:.1f} | {total / pairs:.2f} |")
    ok = all(imgs == n for n, _, imgs, _, _, _ in rows)
    verdict = ("Network passes = n for every n (keypoints are detected once per image)." if ok else
               "NOT linear: some image went through the network more than once.")
    text = "\n".join(table) + "\n\n" + verdict
    print(text)
    if args.append:
        append_section(args.append, f"All-pairs scaling ({args.device})",
                       f"{machine_line(torch.device(args.device))}\n\nModel: {note}. Images {args.size}³ over 256 mm; "
                       f"aligns {' '.join(args.aligns)}; `keyreg register --all_pairs` in-process, metric mse.\n\n{text}")


if __name__ == "__main__":
    main()
