"""Per-pair quality control for the pipeline: keypoint residuals, confidence, report records.

Thin numpy wrappers around :mod:`keyreg.transforms.residuals` for one pair (the pipeline's unit),
the ``keypoint_residuals.csv`` writer, and the assembly of a :class:`keyreg.report.PairRecord`
from a pair's metric rows and output directory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text
from .models.inference import ACCEPT_DRIFT_MM
from .transforms import AffineTransform, AlignSpec, ThinPlateSpline
from .transforms.residuals import CONFIDENCE_THRESHOLD, INLIER_THRESHOLD_MM, keypoint_confidence, loo_errors

__all__ = ["CONFIDENCE_KEYS", "DETECTION_DRIFT_LIMIT_MM", "DETECTION_RESIDUAL_LIMIT_MM", "alignment_residuals",
           "detection_concerns", "detection_facts",
           "pair_confidence_of", "pair_record", "read_residuals_csv", "save_pair_residual_plot", "write_residuals_csv"]

#: Columns a pair's confidence adds to every metric row (the last three: anatomical models' detections).
CONFIDENCE_KEYS = ("confidence", "median_loo_mm", "inlier_fraction", "flag", "flag_reason", "detection_residual_mm",
                   "detection_drift_mm", "orientation_searched")
#: A pair is flagged ``check`` when an image's keypoints lie further than this (median, mm) from the
#: model's template after a similarity fit: the network did not read a whole head there (a field of
#: view that misses part of it, an image that is not a head).  Held-out whole heads, 4 contrasts,
#: upright and turned: 3.0-4.4 mm (docs/models.md, "Partial fields of view").
DETECTION_RESIDUAL_LIMIT_MM = 6.0
#: ... or when an image's keypoints move by more than this (median, mm) when it is read on a turned
#: grid: no reading of the orientation search passed its checks, so the keypoints may follow the grid
#: rather than the anatomy (the search's own acceptance limit, ``ACCEPT_DRIFT_MM``).
DETECTION_DRIFT_LIMIT_MM = ACCEPT_DRIFT_MM


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float64))[None]


def alignment_residuals(spec: AlignSpec, transform: AffineTransform | ThinPlateSpline, fixed_keypoints: np.ndarray,
                        moving_keypoints: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Residuals ``y - T(x)`` and LOO errors ``y - T^(-n)(x)`` ``(K, 3)`` mm of one fitted align.

    ``transform`` is the fit of ``fixed_keypoints`` -> ``moving_keypoints`` (``(K, 3)`` world mm)
    with ``weights``; a TPS's own normalisation is reused for its LOO errors.
    """
    pf, pm, w = _t(fixed_keypoints), _t(moving_keypoints), _t(weights)
    t = transform.to("cpu")
    resid = pm - t.map_points(pf)
    kw = {}
    if isinstance(t, ThinPlateSpline):
        kw = {"center": t.center.double(), "scale": t.scale.double()}
    loo = loo_errors(spec, pf, pm, w, **kw)
    return {"residual": resid[0].detach().numpy(), "loo": loo[0].detach().numpy()}


def pair_confidence_of(fixed_keypoints: np.ndarray, moving_keypoints: np.ndarray,
                       weights: np.ndarray | None = None) -> dict[str, Any]:
    """The pair's confidence (see :mod:`keyreg.transforms.residuals`) as plain Python values, with
    ``flag`` = ``"check"`` below :data:`CONFIDENCE_THRESHOLD`, else ``"ok"``, and ``flag_reason``
    saying why (empty when ``ok``)."""
    c = keypoint_confidence(_t(fixed_keypoints), _t(moving_keypoints), _t(weights))
    conf = float(c["confidence"][0])
    return {"confidence": conf, "median_loo_mm": float(c["median_loo_mm"][0]),
            "inlier_fraction": float(c["inlier_fraction"][0]), "flag": "check" if conf < CONFIDENCE_THRESHOLD else "ok",
            "flag_reason": f"confidence {conf:.2f} below {CONFIDENCE_THRESHOLD:g}" if conf < CONFIDENCE_THRESHOLD else ""}


def detection_facts(fixed: Any, moving: Any) -> dict[str, Any]:
    """How the two images' keypoints were detected (:class:`~keyreg.keypoints.ImageKeypoints`):
    ``detection_residual_mm`` and ``detection_drift_mm``, the larger of their template residuals and
    of their drifts under a turned grid, and ``orientation_searched`` (``none``, ``fixed``,
    ``moving`` or ``fixed moving``); ``{}`` when the model has no template."""
    residuals = [kp.template_residual_mm for kp in (fixed, moving) if kp.template_residual_mm is not None]
    if not residuals:
        return {}
    searched = [role for role, kp in (("fixed", fixed), ("moving", moving)) if kp.searched]
    drifts = [kp.drift_mm for kp in (fixed, moving) if kp.drift_mm is not None]
    return {"detection_residual_mm": max(residuals), **({"detection_drift_mm": max(drifts)} if drifts else {}),
            "orientation_searched": " ".join(searched) or "none"}


def detection_concerns(facts: dict[str, Any]) -> list[str]:
    """Why :func:`detection_facts` say a pair needs a look (empty: they do not): an image not read as
    a whole head (template residual above :data:`DETECTION_RESIDUAL_LIMIT_MM`), or read on no grid
    where its keypoints stay with the anatomy (drift above :data:`DETECTION_DRIFT_LIMIT_MM`)."""
    out = []
    for key, limit in (("detection_residual_mm", DETECTION_RESIDUAL_LIMIT_MM),
                       ("detection_drift_mm", DETECTION_DRIFT_LIMIT_MM)):
        if facts.get(key, 0.0) > limit:
            out.append(f"{key} {facts[key]:.1f} above {limit:g}")
    return out


def write_residuals_csv(path: str | Path, labels: Sequence[str], residual: np.ndarray, loo: np.ndarray,
                        weights: np.ndarray | None = None, used: np.ndarray | None = None) -> Path:
    """``keypoint_residuals.csv``: one row per keypoint: ``label, residual_mm, loo_mm``, the two
    vectors (``moving - predicted``, RAS mm), the fit weight and whether the fit used it."""
    residual, loo = np.asarray(residual, dtype=np.float64), np.asarray(loo, dtype=np.float64)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["label", "residual_mm", "loo_mm", "residual_x_ras", "residual_y_ras", "residual_z_ras",
                 "loo_x_ras", "loo_y_ras", "loo_z_ras", "weight", "used"])
    for n, lab in enumerate(labels):
        w = "" if weights is None else f"{float(weights[n]):.6g}"
        u = 1 if used is None else int(bool(used[n]))
        wr.writerow([lab, f"{np.linalg.norm(residual[n]):.6g}", f"{np.linalg.norm(loo[n]):.6g}",
                     *(f"{v:.6g}" for v in residual[n]), *(f"{v:.6g}" for v in loo[n]), w, u])
    return atomic_write_text(path, buf.getvalue())


def read_residuals_csv(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, residual_mm, loo_mm, used)`` from a ``keypoint_residuals.csv``."""
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    return ([r["label"] for r in rows], np.array([float(r["residual_mm"]) for r in rows]),
            np.array([float(r["loo_mm"]) for r in rows]), np.array([r["used"] == "1" for r in rows]))


def save_pair_residual_plot(pair_dir: Path, aligns: Sequence[str], title: str = "") -> Path | None:
    """``<pair_dir>/residuals.png`` from the ``<align>/keypoint_residuals.csv`` files (``None`` if none)."""
    from .report import save_residual_plot

    res, rejected, labels = {}, {}, []
    for align in aligns:
        f = pair_dir / align / "keypoint_residuals.csv"
        if f.exists():
            labels, rmm, lmm, used = read_residuals_csv(f)
            res[align] = (rmm, lmm)
            rejected[align] = ~used
    if not res:
        return None
    return save_residual_plot(pair_dir / "residuals.png", labels, res, inlier_threshold_mm=INLIER_THRESHOLD_MM,
                              rejected=rejected, title=title or "keypoint residuals and leave-one-out errors (mm)")


def pair_record(name: str, rows: Sequence[dict], pair_dir: Path | None, report_dir: Path, *,
                fixed: Any = None, warped: Any = None, note: str = ""):
    """A :class:`keyreg.report.PairRecord` for one pair.

    Args:
        name: the pair's name.
        rows: its metric rows (one per align, with the confidence columns).
        pair_dir: its output directory (``residuals.png``, ``<align>/qc.png``), or ``None``.
        report_dir: the directory of ``report.html`` (figure paths are relative to it).
        fixed, warped: volumes for the thumbnail (e.g. the first align's warped image), or ``None``.
        note: text shown with the figures.
    """
    from .report import PairRecord, overlay_thumbnail, thumbnail_data_uri

    first = rows[0] if rows else {}
    skip = {"pair", "moving", "fixed", "align", *CONFIDENCE_KEYS}
    metrics = {r["align"]: {k: v for k, v in r.items() if k not in skip} for r in rows}
    if first.get("flag_reason"):
        note = f"flagged check: {first['flag_reason']}" + (f". {note}" if note else "")
    rec = PairRecord(name=name, metrics=metrics, confidence=first.get("confidence"),
                     flagged=first.get("flag") == "check", note=note,
                     details={k: first[k] for k in ("flag_reason", "median_loo_mm", "inlier_fraction",
                                                    "detection_residual_mm", "detection_drift_mm",
                                                    "orientation_searched") if k in first})
    if fixed is not None and warped is not None:
        rec.thumbnail = thumbnail_data_uri(overlay_thumbnail(fixed, warped))
    if pair_dir is not None:
        plot = pair_dir / "residuals.png"
        if plot.exists():
            rec.figures.append(("keypoint residuals and leave-one-out errors", _rel(plot, report_dir)))
        for r in rows:
            qc = pair_dir / r["align"] / "qc.png"
            if qc.exists():
                rec.figures.append((f"{r['align']}: fixed, moving, warped, checkerboard, overlay, keypoints",
                                    _rel(qc, report_dir)))
    return rec


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path, start)).as_posix()
