"""Robust fitting: iterative rejection of keypoints that the other keypoints do not predict.

``robust_fit`` is a trimmed least-squares fit driven by leave-one-out errors
(:mod:`keyreg.transforms.residuals`):

1. fit with every keypoint (its usual weight);
2. compute every keypoint's LOO error ``d_n`` (mm) under the current fit (a rejected keypoint's is
   its prediction error); robust scale ``sigma = max(median(d over kept) / 1.5382, min_sigma_mm)``
   (1.5382 is the median of the length of a 3-D standard normal vector);
3. keep the keypoints with ``d_n <= k sigma`` (at least half of them: the smallest ``d`` first),
   give the others weight 0, refit; repeat until the kept set no longer changes.

Kept keypoints keep their original weights exactly, so **a pair without rejected keypoints gets
exactly the ordinary fit**, and the transform only changes through the keypoints left out (a TPS
with lambda 0 still interpolates every kept keypoint).  LOO errors rather than residuals drive the
rejection because an interpolating TPS has zero residuals, and because a high-leverage outlier
drags a least-squares fit towards itself and hides its own residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear import AffineTransform, check_points, normalize_weights
from .residuals import loo_errors
from .spec import AlignSpec, fit_transform
from .tps import ThinPlateSpline

__all__ = ["RobustFit", "robust_fit", "ROBUST_K", "ROBUST_MIN_SIGMA_MM"]

#: Rejection threshold in robust standard deviations (``P(|N(0, I_3)| > 4) ~ 0.001``).
ROBUST_K = 4.0
#: Floor of the robust scale (mm): keypoints within ``ROBUST_K`` times this are never rejected.
ROBUST_MIN_SIGMA_MM = 1.5
_CHI3_MEDIAN = 1.5382


@dataclass
class RobustFit:
    """Result of :func:`robust_fit`.

    Attributes:
        transform: the final fit (batch ``B``).
        kept: ``(B, N)`` bool, keypoints used by the final fit.
        weights: ``(B, N)`` the weights of the final fit (original weights, 0 where rejected).
        loo: ``(B, N, 3)`` LOO errors of the final fit (prediction errors for rejected keypoints).
        sigma_mm: ``(B,)`` the robust scale at convergence.
        iterations: number of refits after the first.
    """

    transform: AffineTransform | ThinPlateSpline
    kept: torch.Tensor
    weights: torch.Tensor
    loo: torch.Tensor
    sigma_mm: torch.Tensor
    iterations: int


def _min_kept(spec: AlignSpec, n: int) -> int:
    need = {"rigid": 3, "affine": 4, "tps": 5}[spec.kind]
    return min(n, max(need, (n + 1) // 2))


def robust_fit(
    spec: AlignSpec,
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    k: float = ROBUST_K,
    min_sigma_mm: float = ROBUST_MIN_SIGMA_MM,
    max_iter: int = 20,
) -> RobustFit:
    """Fit ``spec`` to ``(B, N, 3)`` world keypoints, leaving out keypoints that disagree (module docstring).

    Args:
        spec: rigid, affine or ``tps_<lambda>``.
        points_fixed, points_moving: ``(B, N, 3)`` world mm.
        weights: optional ``(B, N)`` base weights (e.g. heatmap power).
        center, scale: TPS normalisation, as for :func:`keyreg.transforms.fit_tps`.
        k: rejection threshold in robust standard deviations.
        min_sigma_mm: floor of the robust scale.
        max_iter: at most this many refits.

    Returns:
        A :class:`RobustFit`.
    """
    check_points(points_fixed, points_moving, weights)
    b, n, _ = points_fixed.shape
    base = normalize_weights(weights, points_fixed.double())
    keep_min = _min_kept(spec, n)
    kept = base > 0
    iterations = 0
    while True:
        w = base * kept
        loo = loo_errors(spec, points_fixed, points_moving, w, center=center, scale=scale)
        d = torch.nan_to_num(loo.norm(dim=-1), nan=float("inf"))
        d_kept = torch.where(kept, d, torch.full_like(d, float("nan")))
        sigma = (d_kept.nanmedian(dim=1).values / _CHI3_MEDIAN).clamp_min(min_sigma_mm)
        new = (d <= k * sigma.unsqueeze(1)) & (base > 0)
        # never fewer than keep_min keypoints: the best-predicted ones
        order = torch.argsort(torch.where(base > 0, d, torch.full_like(d, float("inf"))), dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
        new = new | ((rank < keep_min) & (base > 0))
        if bool((new == kept).all()) or iterations >= max_iter:
            break
        kept = new
        iterations += 1
    w = base * kept
    transform = fit_transform(spec, points_fixed, points_moving, w, center=center, scale=scale)
    return RobustFit(transform, kept, w, loo, sigma, iterations)
