"""keyreg's ``tps.json``: a thin-plate spline stored as its keypoint pairs, so it is refitted exactly.

Document (``format: keyreg-tps``, ``format_version: 1``)::

    lambda                      smoothness (>= 0)
    center_ras, scale_mm        normalisation x~ = (x - c) / s (s > 0)
    fixed_keypoints_ras         (K, 3) control points (fixed space, RAS mm)
    moving_keypoints_ras        (K, 3) their targets (moving space, RAS mm)
    weights                     (K,) fit weights or null
    keypoint_names              K names (optional)
    fixed_grid, moving_grid     {"name", "shape", "affine"} of both images (optional)

The transform is ``moving_from_fixed``: fixed RAS mm -> moving RAS mm.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from ..errors import ImageIOError
from ._common import PathLike, read_text, reading

__all__ = ["tps_document", "tps_from_dict", "read_tps_json", "write_tps_json", "grid_document"]

FORMAT = "keyreg-tps"


def grid_document(name: str, shape: Any, affine: Any) -> dict[str, Any]:
    """``{"name", "shape", "affine"}`` of an image grid (RAS affine)."""
    return {"name": str(name), "shape": [int(s) for s in tuple(shape)[:3]],
            "affine": np.asarray(affine, dtype=np.float64).tolist()}


def tps_document(*, lmbda: float, center: Any, scale: float, fixed_keypoints: Any, moving_keypoints: Any,
                 weights: Any = None, fixed_grid: dict | None = None, moving_grid: dict | None = None,
                 keypoint_names: list[str] | None = None) -> dict[str, Any]:
    """The ``tps.json`` document of a TPS (see the module docstring)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "direction": "moving_from_fixed (fixed RAS mm -> moving RAS mm)",
        "kernel": "r^2 log r",
        "lambda": float(lmbda),
        "center_ras": np.asarray(center, dtype=np.float64).reshape(3).tolist(),
        "scale_mm": float(scale),
        "fixed_keypoints_ras": np.asarray(fixed_keypoints, dtype=np.float64).tolist(),
        "moving_keypoints_ras": np.asarray(moving_keypoints, dtype=np.float64).tolist(),
        "weights": None if weights is None else np.asarray(weights, dtype=np.float64).tolist(),
    }
    if keypoint_names is not None:
        doc["keypoint_names"] = [str(n) for n in keypoint_names]
    doc["fixed_grid"] = fixed_grid
    doc["moving_grid"] = moving_grid
    return doc


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def tps_from_dict(doc: dict[str, Any]):
    """Refit the TPS of a ``tps.json`` document exactly (same keypoints, lambda, weights, normalisation).

    Returns:
        A batch-1 :class:`~keyreg.transforms.ThinPlateSpline` ``moving_from_fixed`` (float64, CPU).

    Raises:
        ValueError: missing or invalid fields (non-finite numbers, ``scale_mm`` <= 0, negative
            lambda or weights, keypoint sets of different sizes).
    """
    from ..transforms import fit_tps

    if not isinstance(doc, dict):
        raise ValueError("the document is not a JSON object")
    try:
        pf = torch.tensor(doc["fixed_keypoints_ras"], dtype=torch.float64).reshape(1, -1, 3)
        pm = torch.tensor(doc["moving_keypoints_ras"], dtype=torch.float64).reshape(1, -1, 3)
        w = doc.get("weights")
        weights = None if w is None else torch.tensor(w, dtype=torch.float64).reshape(1, -1)
        center = torch.tensor(doc["center_ras"], dtype=torch.float64).reshape(3)
    except RuntimeError as e:  # torch's shape errors
        raise ValueError(str(e).splitlines()[0]) from None
    for name, t in (("fixed_keypoints_ras", pf), ("moving_keypoints_ras", pm), ("center_ras", center)):
        _finite(name, t)
    if pf.shape != pm.shape:
        raise ValueError(f"fixed and moving keypoints differ in number ({pf.shape[1]} and {pm.shape[1]})")
    if weights is not None:
        _finite("weights", weights)
        if weights.shape[1] != pf.shape[1] or bool((weights <= 0).any()):
            raise ValueError("weights must be one positive number per keypoint")
    lam = float(doc["lambda"])
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lambda must be a finite number >= 0, got {doc['lambda']!r}")
    scale = float(doc["scale_mm"])
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale_mm must be a finite number > 0, got {doc['scale_mm']!r}")
    return fit_tps(pf, pm, lam, weights, center=center, scale=scale)


def read_tps_json(path: PathLike):
    """``(tps, document)`` of a ``tps.json`` file.

    Raises:
        ImageIOError: unreadable, not a keyreg tps.json, or invalid content (one line naming the file).
    """
    p, text = read_text(path, "a keyreg tps.json file")
    with reading(p, "a keyreg tps.json file"):
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ImageIOError(f"{p}: not a keyreg tps.json file (no \"format\": \"{FORMAT}\")")
        tps = tps_from_dict(doc)
    return tps, doc


def write_tps_json(path: PathLike, doc: dict[str, Any]):
    """Write a ``tps.json`` document atomically (non-finite numbers are refused)."""
    from ..atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
