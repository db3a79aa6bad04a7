"""Model selection between "already aligned" (identity) and a fitted transform.

Keypoints carry detection noise, so a transform fitted to the keypoints of a pair that is already
aligned moves it by that noise.  :func:`identity_suffices` compares the identity with the fitted
linear transform by the Akaike information criterion of isotropic Gaussian residuals:

    AIC(model) = 3 N log(RSS / 3 N) + 2 p,      p = 0 (identity), 6 (rigid), 12 (affine)

and keeps the identity when the fit does not lower the AIC, i.e. when ``3 N log(RSS_id / RSS_fit)
< 2 p``: the keypoints agree with the pair as it is, up to their own noise.

A model's keypoints also carry a *systematic* part that depends on contrast (a region's centroid
seen in T1 and in T2 is not read at exactly the same place), which no noise test absorbs.  A model
therefore states the smallest motion it can resolve, ``tolerance_mm``: the RMS displacement
(:func:`keypoint_motion_mm`) that fitted affines show on pairs that are aligned by construction
(one head in several contrasts on one grid; ``scripts/calibrate_aligned.py``).  A fit that moves
the keypoints by less is not evidence of misalignment, and the identity is kept.  Frames: world mm.
"""

from __future__ import annotations

import torch

from ..geometry import apply_affine
from .linear import AffineTransform, fit_affine
from .tps import fit_tps

__all__ = ["identity_suffices", "keep_identity_if_aligned", "keypoint_motion_mm", "NUM_PARAMS"]

#: free parameters of each linear transform type
NUM_PARAMS = {"rigid": 6, "affine": 12}


def identity_suffices(points_fixed: torch.Tensor, points_moving: torch.Tensor, matrix: torch.Tensor,
                      num_params: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Whether the identity explains the keypoints as well as ``matrix`` (by AIC, see module doc).

    Args:
        points_fixed, points_moving: ``(B, N, 3)`` corresponding world points (mm).
        matrix: ``(B, 4, 4)`` the fitted ``moving_from_fixed``.
        num_params: free parameters of the fitted transform (:data:`NUM_PARAMS`).
        weights: optional ``(B, N)`` keypoint weights (residuals are weighted, N is their effective count).

    Returns:
        ``(B,)`` bool.
    """
    w = torch.ones(points_fixed.shape[:2], dtype=points_fixed.dtype, device=points_fixed.device) \
        if weights is None else weights.to(points_fixed.dtype)
    n_eff = w.sum(1) ** 2 / (w ** 2).sum(1).clamp_min(1e-30)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    rss_id = (w * ((points_moving - points_fixed) ** 2).sum(-1)).sum(1)
    rss_fit = (w * ((points_moving - apply_affine(matrix.to(points_fixed.dtype), points_fixed)) ** 2).sum(-1)).sum(1)
    gain = 3 * n_eff * torch.log(rss_id.clamp_min(1e-30) / rss_fit.clamp_min(1e-30))
    return gain < 2 * num_params


def keypoint_motion_mm(points_fixed: torch.Tensor, matrix: torch.Tensor, weights: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """RMS displacement ``|A p - p|`` (mm) of a linear transform over the keypoints.

    Args:
        points_fixed: ``(B, N, 3)`` world points (mm).
        matrix: ``(B, 4, 4)`` the transform (``moving_from_fixed``).
        weights: optional ``(B, N)`` weights of the mean.

    Returns:
        ``(B,)`` mm.
    """
    w = torch.ones(points_fixed.shape[:2], dtype=points_fixed.dtype, device=points_fixed.device) \
        if weights is None else weights.to(points_fixed.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    d2 = ((apply_affine(matrix.to(points_fixed.dtype), points_fixed) - points_fixed) ** 2).sum(-1)
    return (w * d2).sum(1).sqrt()


def keep_identity_if_aligned(fits: dict, pf: torch.Tensor, pm: torch.Tensor, w: torch.Tensor | None = None, *,
                             tolerance_mm: float = 0.0, info: dict | None = None) -> dict:
    """Replace fits by the identity where the keypoints show the pair is already aligned: by the
    noise test (:func:`identity_suffices`) or because the fit moves the keypoints by at most
    ``tolerance_mm`` (RMS, :func:`keypoint_motion_mm`; the model's resolution, see the module doc).
    Rigid and affine are decided by their own fit, TPS by the affine one (its non-linear part would
    only follow the keypoints' noise; it becomes the identity spline).

    Args:
        fits: align name -> fitted transform (batch 1), as the fit stage returns them.
        pf, pm: ``(1, N, 3)`` the fixed and moving keypoints the fits were made from (world mm).
        w: optional ``(1, N)`` keypoint weights.
        tolerance_mm: motion below which the identity is kept (0: the noise test alone).
        info: when given, receives ``affine_motion_mm`` (the affine fit's RMS motion) and
            ``already_aligned`` (whether the affine decision kept the identity).
    """
    eye = torch.eye(4, dtype=pf.dtype, device=pf.device)[None]

    def suffices(matrix: torch.Tensor, kind: str, motion: float) -> bool:
        return motion <= tolerance_mm or bool(identity_suffices(pf, pm, matrix, NUM_PARAMS[kind], w)[0])

    def motion_of(matrix: torch.Tensor) -> float:
        return float(keypoint_motion_mm(pf, matrix, w)[0])

    affine = fits.get("affine")
    affine_m = affine.matrix if isinstance(affine, AffineTransform) else fit_affine(pf, pm, w)
    affine_motion = motion_of(affine_m)
    aligned = suffices(affine_m, "affine", affine_motion)
    if info is not None:
        info["affine_motion_mm"] = affine_motion
        info["already_aligned"] = aligned
    out = {}
    for name, tr in fits.items():
        if isinstance(tr, AffineTransform):
            kind = "rigid" if name == "rigid" else "affine"
            keep = suffices(tr.matrix, kind, motion_of(tr.matrix)) if kind == "rigid" else aligned
            out[name] = AffineTransform(eye.clone()) if keep else tr
        elif aligned:  # identical keypoints give an exact identity spline (same centre and scale)
            out[name] = fit_tps(tr.control_points * tr.scale[:, None, None] + tr.center[:, None],
                                tr.control_points * tr.scale[:, None, None] + tr.center[:, None],
                                center=tr.center[0], scale=tr.scale[0])
        else:
            out[name] = tr
    return out
