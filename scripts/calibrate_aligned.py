"""Calibrate a model's ``aligned_tolerance_mm``: the keypoint motion its affine fits show on pairs that
are aligned by construction.

A pair = one training label map rendered in two contrasts (T1 -> T2, T2 -> T1, T1 -> PD-like,
T1 -> FLAIR-like, whole head, 2 mm) on one grid: the true transform is the identity, so the RMS
displacement of the fitted affine over the fit keypoints (``keyreg.transforms.keypoint_motion_mm``) is
the model's contrast-dependent bias.  The tolerance is the largest motion seen, times ``--margin``.
Calibrate on training maps (01-12); ``benchmarks/model_validation.py`` checks held-out maps.

    python scripts/calibrate_aligned.py runs/anat/stage3/model.safetensors [--maps 1 2 ... 12]

Prints one row per pair and the tolerance; ``--write`` stores it in the model's JSON config.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from keyreg.errors import KeyregError
from keyreg.io import Volume
from keyreg.models import load_model
from keyreg.models.checkpoint import DEFAULT_MODEL, OFFICIAL_SUFFIXES, PRETRAINED_DIR, _pair, _resolve_default
from keyreg.models.inference import detect_image_keypoints
from keyreg.train.data import LabelMapBank
from keyreg.train.synth import contrast_image
from keyreg.transforms import fit_affine, keypoint_motion_mm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "labelmaps"
PAIRS = [("t1", "t2"), ("t2", "t1"), ("t1", "pd"), ("t1", "flair")]


def model_json(source: str) -> Path:
    """The JSON config of a keyreg model given as :func:`keyreg.models.load_model` takes it: a file, a
    directory or a bundled name (resolved the same way); :class:`SystemExit` for an official checkpoint."""
    path = Path(source)
    if not path.exists() and not source.endswith(OFFICIAL_SUFFIXES + (".json", ".safetensors")):
        path = PRETRAINED_DIR / f"{_resolve_default() if source == DEFAULT_MODEL else source}.json"
    if not (path.is_dir() or path.suffix in (".json", ".safetensors")):
        raise SystemExit(f"calibrate_aligned: error: --write needs a keyreg model (.safetensors + .json), not {source}")
    return _pair(path)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model (.safetensors + .json, or a bundled name)")
    p.add_argument("--maps", nargs="+", type=int, default=list(range(1, 13)))
    p.add_argument("--labelmaps", type=Path, default=SHARED)
    p.add_argument("--margin", type=float, default=1.1, help="tolerance = margin x the largest motion")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="store the tolerance in the model's JSON config")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"calibrate_aligned: error: --threads must be >= 1, got {args.threads}")
    if not (args.margin > 0 and np.isfinite(args.margin)):
        raise SystemExit(f"calibrate_aligned: error: --margin must be a finite number > 0, got {args.margin}")
    missing = [m for m in args.maps if not (args.labelmaps / f"training_seg_{m:02d}.nii.gz").is_file()]
    if missing:
        raise SystemExit(f"calibrate_aligned: error: --maps {' '.join(map(str, missing))}: no "
                         f"training_seg_NN.nii.gz for them in {args.labelmaps}")
    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model).eval()
        json_path = model_json(args.model) if args.write else None
        bank = LabelMapBank([args.labelmaps / f"training_seg_{m:02d}.nii.gz" for m in args.maps],
                            storage_voxel=2.0, storage_shape=128)
    except KeyregError as e:
        raise SystemExit(f"calibrate_aligned: error: {e}") from None
    mask = model.config.fit_mask()
    motions = []
    print("| map | pair | affine motion (mm) |\n|---|---|---|")
    for i, m in enumerate(args.maps):
        aff = bank.affines[i].numpy()
        kp = {}
        for c in sorted({c for pair in PAIRS for c in pair}):
            img = contrast_image(bank.maps[i], c, zlib.crc32(f"calibrate|{m}|{c}".encode()))
            kp[c] = detect_image_keypoints(model, Volume(img, aff, name=f"{m}{c}")).points.double()
        for a, b in PAIRS:
            ok = torch.isfinite(kp[a]).all(1) & torch.isfinite(kp[b]).all(1)
            if mask is not None:
                ok &= torch.as_tensor(mask)
            pf, pm = kp[a][ok][None], kp[b][ok][None]
            motion = float(keypoint_motion_mm(pf, fit_affine(pf, pm))[0])
            motions.append(motion)
            print(f"| {m:02d} | {a} -> {b} | {motion:.2f} |", flush=True)
    tol = round(args.margin * max(motions), 2)
    print(f"\nmotion on aligned pairs: median {np.median(motions):.2f} mm, max {max(motions):.2f} mm "
          f"({len(motions)} pairs); aligned_tolerance_mm = {args.margin:g} x max = {tol:.2f}")
    if json_path is not None:
        path = json_path
        doc = json.loads(path.read_text())
        doc["aligned_tolerance_mm"] = tol
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
