"""CPU seconds and size of writing the 256^3 outputs of ``keyreg register`` (issue 13): a TPS
displacement field (``warp.nii.gz``) and a warped image, with every gzip block compressed
(``store_ratio=1``) and with incompressible blocks stored (the default, ``GZIP_STORE_RATIO``), each
with zlib's deflate and with ISA-L's (``deflate`` column; ISA-L is the default when installed).

The image is the fixed image of ``benchmarks/speed_1mm.py``'s pair (``.bench/speed_1mm/``); the field
a smooth random displacement (up to ~10 mm) on its grid, like a TPS: fine-grained float32 values.
Last, the QC figure of one align (``qc.png``, ``--visualize``) from that pair's 256^3 images (the
moving image standing in for the warped one; 181 keypoints), after one untimed figure (imports).

    python benchmarks/speed_write.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from speed_1mm import CACHE, build_pair

    import keyreg.io as kio
    import keyreg.nifti_gzip as gz
    from keyreg.formats import write_displacement_field

    paths = build_pair(CACHE)
    ref = kio.load_volume(paths["fixed"])
    g = torch.Generator().manual_seed(0)
    disp = torch.nn.functional.interpolate(torch.randn(1, 3, 9, 9, 9, generator=g) * 5, size=ref.shape,
                                           mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0).numpy()
    defaults = gz.ParallelGzipWriter.__init__.__kwdefaults__
    print(f"grid {ref.shape}; threads for deflate: {min(8, os.cpu_count() or 1)}")
    print("| file | deflate | store_ratio | CPU (s) | wall (s) | size (MiB) |")
    print("|---|---|---|---|---|---|")
    libs = [("zlib", False)] + ([("ISA-L", True)] if gz._DEFLATE.__name__ != "zlib" else [])
    with tempfile.TemporaryDirectory() as tmp:
        for (lib, fast), ratio in ((lf, r) for lf in libs for r in (1.0, gz.GZIP_STORE_RATIO)):
            defaults["store_ratio"], defaults["fast"] = ratio, fast
            for name, write in (("warp.nii.gz (field)", lambda p: write_displacement_field(p, disp, ref.affine,
                                                                                             header=ref.header)),
                                ("warped.nii.gz (image)", lambda p: kio.save_volume(ref.data, ref, p))):
                path = Path(tmp) / "out.nii.gz"
                c, w = time.process_time(), time.perf_counter()
                write(path)
                print(f"| {name} | {lib} | {ratio:g} | {time.process_time() - c:.2f} | {time.perf_counter() - w:.2f} | "
                      f"{path.stat().st_size / 2**20:.0f} |", flush=True)
        qc_figure(paths, Path(tmp))


def qc_figure(paths: dict[str, Path], tmp: Path) -> None:
    """Seconds of one ``qc.png`` (:func:`keyreg.viz.save_qc_figure`) of the 256^3 pair."""
    import numpy as np

    import keyreg.io as kio
    from keyreg.viz import save_qc_figure

    fixed, moving = kio.load_volume(paths["fixed"]), kio.load_volume(paths["moving"])
    kp = fixed.affine[:3, :3] @ (np.random.default_rng(0).random((181, 3)) * fixed.shape).T + fixed.affine[:3, 3:4]

    def figure() -> Path:
        return save_qc_figure(tmp / "qc.png", fixed, moving, moving, fixed_keypoints=kp.T, moving_keypoints=kp.T,
                              aligned_keypoints=kp.T, title="qc")

    figure()  # matplotlib's import and first figure, untimed
    c, w = time.process_time(), time.perf_counter()
    path = figure()
    print(f"| qc.png (figure) | - | - | {time.process_time() - c:.2f} | {time.perf_counter() - w:.2f} | "
          f"{path.stat().st_size / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
