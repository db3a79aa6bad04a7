"""Where an anatomical model's keypoint error comes from: the pose of its layout, or the anatomy.

Every keypoint of an anatomical model is a region centroid, and the model config carries the
template (mean positions in the reference frame).  An affine map of the template onto a set of
keypoints is their *layout pose*; what an affine cannot explain is the subject's own anatomy.  On
upright synthetic images of held-out label maps (maps 13-15 at 2 mm, T1/T2/PD/FLAIR-like, seeded as
in ``model_validation.py``) this script splits the error of the detected keypoints ``p`` against the
true centroids ``c`` (both world mm; affine poses ``A_p``, ``A_c`` fitted to the keypoints the model
uses in fits):

* **keypoint error** ``|p - c|``, by kind of region;
* **pose error** ``|A_p t - A_c t|``: how far the detected layout's affine pose is from the true one;
* **posed-template floor** ``|A_c t - c|``: the error of a detector that knew the exact affine pose and
  nothing of the subject's anatomy beyond it;
* **template posed by the model** ``|A_p t - c|``: the detected pose with the template's shape;
* **anatomy captured**: the correlation of the detected and true residuals beyond their affine poses
  (1 = the model reads the subject's non-affine anatomy, 0 = it only places a layout);
* **head size**: the slope of the detected on the true log-scale of the pose, over images.

Medians over keypoints and images; then the keypoint error of each map (subject), all keypoints.
``--maps 1 2 ... 12`` measures the same on the training subjects (the generalisation gap).  Usage:
    python benchmarks/keypoint_error_parts.py [--model NAME_OR_FILE ...] [--maps 13 14 15]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from model_validation import label_maps_2mm, seed_of, synth

from keyreg.io import Volume
from keyreg.models import load_model
from keyreg.models.inference import detect_images_keypoints
from keyreg.transforms import fit_affine

CONTRASTS = ("t1", "t2", "pd", "flair")


def affine_pose(template: np.ndarray, points: np.ndarray, use: np.ndarray) -> np.ndarray:
    """The least-squares affine ``(3, 4)`` with ``points ~ A [template; 1]`` over the finite ``use``
    rows (:func:`keyreg.transforms.fit_affine`)."""
    ok = use & np.isfinite(points).all(1)
    mat = fit_affine(torch.from_numpy(template[ok])[None], torch.from_numpy(points[ok])[None])
    return mat[0, :3].numpy()


def posed(pose: np.ndarray, template: np.ndarray) -> np.ndarray:
    return template @ pose[:, :3].T + pose[:, 3]


def parts(template: np.ndarray, det: np.ndarray, true: np.ndarray, use: np.ndarray) -> dict[str, np.ndarray]:
    """Per-keypoint distances (mm, over ``use``) and the residuals of one image (see the module docstring)."""
    a_p, a_c = affine_pose(template, det, use), affine_pose(template, true, use)
    t_p, t_c = posed(a_p, template), posed(a_c, template)
    dist = lambda a, b: np.linalg.norm(a - b, axis=1)[use]  # noqa: E731
    return {"keypoint": dist(det, true), "pose": dist(t_p, t_c), "floor": dist(t_c, true),
            "template_posed": dist(t_p, true), "res_det": (det - t_p)[use], "res_true": (true - t_c)[use],
            "log_scale": np.array([np.log(abs(np.linalg.det(a_p[:, :3]))) / 3,
                                   np.log(abs(np.linalg.det(a_c[:, :3]))) / 3])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[None], help="models (names or files; default: the bundled default)")
    p.add_argument("--maps", nargs="+", type=int, default=[13, 14, 15])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bank = label_maps_2mm(args.maps)
    print("| model | keypoint error: all | whole structures | sub-regions | extra-cerebral | in fits | "
          "pose error | posed-template floor | template posed by the model | anatomy captured (r) | "
          "head-size slope |")
    print("|---" * 11 + "|")
    by_map = {}
    for name in args.model:
        model = load_model(name).eval()
        atlas = model.config.regions
        if atlas is None:
            print(f"{name}: not an anatomical model (no regions)", file=sys.stderr)
            return 2
        names = [r.name for r in atlas.regions]
        extra = np.array([n.startswith("Extracerebral") for n in names])
        sub = np.array(["/" in n for n in names]) & ~extra
        use = np.asarray(model.config.fit_mask(None), dtype=bool)
        err_all, rows = [], []
        for i, m in enumerate(args.maps):
            seg, aff = bank.maps[i].numpy().astype(np.int64), bank.affines[i].numpy()
            true = atlas.centroids(seg, aff)[0]
            vols = [Volume(synth(bank.maps[i], c, seed_of(args.seed, m, c)), aff, name=f"{m}{c}") for c in CONTRASTS]
            for det in detect_images_keypoints(model, vols):
                pts = det.points.numpy()
                err_all.append(np.linalg.norm(pts - true, axis=1))
                rows.append(parts(atlas.template, pts, true, use))
        err = np.array(err_all)
        cat = lambda key: np.concatenate([r[key] for r in rows])  # noqa: E731
        rd, rt = cat("res_det"), cat("res_true")
        ok = np.isfinite(rd).all(1) & np.isfinite(rt).all(1)
        r = float((rd[ok] * rt[ok]).sum() / np.sqrt((rd[ok] ** 2).sum() * (rt[ok] ** 2).sum()))
        scales = np.array([row["log_scale"] for row in rows])
        slope = float(np.polyfit(scales[:, 1], scales[:, 0], 1)[0])
        med = lambda a: f"{np.nanmedian(a):.2f}"  # noqa: E731
        label = model.config.name if name is None else name
        print(f"| {label} | {med(err)} | {med(err[:, ~sub & ~extra])} | "
              f"{med(err[:, sub])} | {med(err[:, extra])} | {med(err[:, use])} | {med(cat('pose'))} | "
              f"{med(cat('floor'))} | {med(cat('template_posed'))} | {r:.2f} | {slope:.2f} |", flush=True)
        per = len(CONTRASTS)  # err's rows: map by map, its contrasts in turn
        by_map[label] = [med(err[per * i:per * (i + 1)]) for i in range(len(args.maps))]
    print("\n| model | " + " | ".join(f"map {m:02d}" for m in args.maps) + " |")
    print("|---" * (len(args.maps) + 1) + "|")
    for name, cells in by_map.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
