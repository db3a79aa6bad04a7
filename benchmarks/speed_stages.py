"""CPU seconds and memory per stage of one ``keyreg register`` run, in process (issue 13).

Runs the CLI's ``main`` in this process with :class:`keyreg.pipeline.Timer` wrapped so that every
stage also accumulates the process's CPU time (user + system of all threads, ``time.process_time``)
and the peak RSS reached by its end.  On a loaded machine wall seconds say little; CPU seconds per
stage are comparable between runs.  The pair is the one of ``benchmarks/speed_1mm.py`` (built and
cached under ``.bench/speed_1mm/``).

    python benchmarks/speed_stages.py [--aligns rigid affine tps_0 tps_10] [--metrics harddice hausd jdstd]
        [--no_save] [--no_seg] [--threads 2]

Prints one table: stage, wall s, CPU s, peak RSS (MiB) at the stage's end; plus imports (CPU s of
``import keyreg.cli`` and of the heavy modules the command imports) and the process total.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aligns", nargs="+", default=["rigid", "affine", "tps_0", "tps_10"])
    p.add_argument("--metrics", nargs="+", default=["harddice", "hausd", "jdstd"])
    p.add_argument("--no_save", action="store_true", help="without --save_eval_to_disk")
    p.add_argument("--no_seg", action="store_true", help="without segmentations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments of keyreg register")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    c0, w0 = time.process_time(), time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_1mm import CACHE, build_pair

    paths = build_pair(CACHE)
    c1, w1 = time.process_time(), time.perf_counter()
    import keyreg.cli
    from keyreg import pipeline

    c2, w2 = time.process_time(), time.perf_counter()
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}
    original = pipeline.Timer.__call__

    @contextmanager
    def timed(self, stage: str):
        start = time.process_time()
        try:
            with original(self, stage):
                yield
        finally:
            cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - start
            rss[stage] = rss_mib()

    pipeline.Timer.__call__ = timed
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="keyreg_stages_") as tmp:
        argv = ["register", "--moving", str(paths["moving"]), "--fixed", str(paths["fixed"]),
                "--list_of_aligns", *args.aligns, "--save_dir", tmp, "--device", "cpu"]
        if not args.no_seg:
            argv += ["--moving_seg", str(paths["moving_seg"]), "--fixed_seg", str(paths["fixed_seg"])]
            if args.metrics:
                argv += ["--list_of_metrics", *args.metrics]
        if not args.no_save:
            argv += ["--save_eval_to_disk"]
        argv += args.extra
        c3, w3 = time.process_time(), time.perf_counter()
        from io import StringIO

        err = StringIO()
        old = sys.stderr
        sys.stderr = err
        try:
            rc = keyreg.cli.main(argv)
        finally:
            sys.stderr = old
        c4, w4 = time.process_time(), time.perf_counter()
        for line in err.getvalue().splitlines():
            if "time per stage" in line:
                for part in line.split(": ", 1)[1].split(", "):
                    k, v, _ = part.split(" ")
                    seconds[k] = float(v)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    if rc != 0:
        print(err.getvalue(), file=sys.stderr)
        raise SystemExit(f"keyreg register failed ({rc})")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"command: keyreg {' '.join(argv)}")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| stage | wall (s) | CPU (s) | peak RSS at its end (MiB) |")
    print("|---|---|---|---|")
    print(f"| import keyreg.cli | {w2 - w1:.2f} | {c2 - c1:.2f} | |")
    for k in cpu:
        print(f"| {k} | {seconds.get(k, float('nan')):.2f} | {cpu[k]:.2f} | {rss[k]:.0f} |")
    other_c = (c4 - c3) - sum(cpu.values())
    other_w = (w4 - w3) - sum(seconds.values())
    print(f"| other (lazy imports, tables, CLI) | {other_w:.2f} | {other_c:.2f} | |")
    print(f"| **command** (main() call) | {w4 - w3:.2f} | {c4 - c3:.2f} | {ru.ru_maxrss / 1024:.0f} |")
    print(f"process: CPU {c4 - c0:.2f} s (user {ru.ru_utime:.2f}, system {ru.ru_stime:.2f}), wall {w4 - w0:.2f} s "
          f"(incl. finding the pair {w1 - w0:.2f} s); output on disk {disk:.0f} MiB")


if __name__ == "__main__":
    main()
