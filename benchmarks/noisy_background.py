"""Keypoints of magnitude images with a noisy background: what the network sees beyond the field of view.

A magnitude MR image has Rician noise in its background, so its background level is not 0. The
orientation search reads an image on turned grids that reach beyond its field of view; filled with
zeros there, such a grid shows the field of view's edges as a sharp box beside the noisy background
(``keyreg.preprocess``, ``IntensitySpec.outside``). This benchmark reads the same images with both
fillings, ``zero`` and ``background`` (the image's background level), and compares the keypoints
with the true region centroids.

Protocol: held-out label maps 13-15 at 2 mm; T1-, T2-, PD- and FLAIR-like contrasts (seeded); each
image multiplied by a smooth bias field (``--bias``: none, or about x10 across the head, a surface
coil's) and given Rician noise of standard deviation ``sigma`` (``--sigmas``, in units of the
image's 99th percentile); the header turned by ``--rotations`` degrees about a random axis. Per
setting: the median keypoint error over the keypoints used in fits (mm, median over images), the
largest per-image median, how many images needed the orientation search, and the image's
background level (after the network's min-max).

Usage:
    python benchmarks/noisy_background.py [--model keyreg-anatomy] [--sigmas 0 0.04 0.12]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch
from model_validation import anatomical_model, fit_mask, label_maps_2mm, rotation, seed_of, synth

from keyreg.geometry import fov_center
from keyreg.io import Volume
from keyreg.models.inference import detect_image_keypoints
from keyreg.preprocess import OUTSIDE_MODES, background_level


def bias_field(shape, strength: float) -> np.ndarray:
    """A smooth multiplicative field, ``exp(strength * (0.8 y + 0.6 z) + 0.4 sin 2x)`` over [-1, 1]^3
    (strength 1.2: about x10 across the head)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(strength * (0.8 * y + 0.6 * z) + 0.4 * np.sin(2 * x)) if strength else np.ones(shape)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise of standard deviation ``sigma``."""
    if not sigma:
        return image
    return np.hypot(image + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or path (default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--contrasts", nargs="+", default=["t1", "t2", "pd", "flair"])
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.04, 0.12])
    p.add_argument("--bias", nargs="+", type=float, default=[0.0, 1.2], help="bias strengths (0: none)")
    p.add_argument("--rotations", nargs="+", type=float, default=[0.0, 90.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {}
    for mode in OUTSIDE_MODES:
        m = anatomical_model(args.model)
        pre = m.config.preprocessing
        m.config.preprocessing = replace(pre, intensity=replace(pre.intensity, outside=mode))
        models[mode] = m
    atlas = models["zero"].config.regions
    in_fits = fit_mask(models["zero"])
    bank = label_maps_2mm(args.maps)
    print(f"model {models['zero'].config.name}; maps {args.maps}; contrasts {args.contrasts}")
    rows = []
    for n, number in enumerate(args.maps):
        seg, aff = bank.maps[n].numpy().astype(np.int64), bank.affines[n].numpy()
        for contrast in args.contrasts:
            clean = synth(bank.maps[n], contrast, seed_of(args.seed, number, contrast))
            for strength in args.bias:
                biased = clean * bias_field(clean.shape, strength)
                for sigma in args.sigmas:
                    rng = np.random.default_rng(seed_of(args.seed, number, contrast, strength, sigma))
                    image = rician(biased, sigma * float(np.percentile(biased, 99)), rng)
                    for degrees in args.rotations:
                        pert = rotation(seed_of(args.seed, number, degrees), degrees, fov_center(aff, seg.shape))
                        vol = Volume(image.astype(np.float32), pert @ aff, name=f"{number}-{contrast}")
                        true = atlas.centroids(seg, pert @ aff)[0]
                        row = {"map": number, "contrast": contrast, "bias": strength, "sigma": sigma,
                               "rotation": degrees, "level": background_level(vol, models["zero"].config.preprocessing.intensity)}
                        for mode, model in models.items():
                            det = detect_image_keypoints(model, vol)
                            err = np.linalg.norm(det.points.numpy() - true, axis=1)
                            row[mode] = float(np.nanmedian(err[in_fits]))
                            row[f"{mode}_searched"] = bool(det.searched)
                        rows.append(row)
                        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
    print("\n| bias | sigma | images | background level | keypoint error, zero | background | "
          "worst image, zero | background | searched, zero | background |")
    print("|---" * 10 + "|")
    for strength in args.bias:
        for sigma in args.sigmas:
            sel = [r for r in rows if r["bias"] == strength and r["sigma"] == sigma]
            cells = [f"{np.median([r['level'] for r in sel]):.3f}"]
            cells += [f"{np.median([r[m] for r in sel]):.2f}" for m in OUTSIDE_MODES]
            cells += [f"{max(r[m] for r in sel):.2f}" for m in OUTSIDE_MODES]
            cells += [f"{sum(r[m + '_searched'] for r in sel)}" for m in OUTSIDE_MODES]
            print(f"| {'x10' if strength else 'none'} | {sigma:g} | {len(sel)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
