"""Per-keypoint residuals, leave-one-out (LOO) prediction errors and the per-pair confidence score.

For a fit ``T`` (``moving_from_fixed``) of fixed keypoints ``x_n`` to moving keypoints ``y_n``:

* the **residual** of keypoint ``n`` is ``y_n - T(x_n)`` (moving world mm): how far the fitted
  transform misses it;
* its **leave-one-out error** is ``y_n - T^(-n)(x_n)``, ``T^(-n)`` being the same fit without
  keypoint ``n``: how well the *other* keypoints predict it.  A keypoint that disagrees with the
  rest has a large LOO error even when an interpolating TPS has a zero residual there.

LOO errors are exact and closed form (no ``N`` refits) for the linear fits:

* **affine** (weighted least squares, a linear smoother): ``e_n / (1 - h_nn)`` with ``e_n`` the
  residual and ``h_nn = w_n [x_n, 1] (X^T W X)^-1 [x_n, 1]^T`` the diagonal of the hat matrix;
* **TPS** (any lambda, weights): with ``G`` the top-left ``N x N`` block of the inverse of the
  TPS system matrix (:func:`keyreg.transforms.tps.tps_system`) and ``c = G y~`` the kernel
  coefficients, the LOO error is ``s c_n / G_nn`` (Rippa's rule, which for lambda > 0 equals the
  smoothing-spline formula ``(y_n - f(x_n)) / (1 - S_nn)``);
* **rigid** is not linear in ``y``: its LOO errors are exact refits, batched (``B N`` Kabsch
  problems in one call).

A keypoint with weight 0 takes no part in a fit; its "LOO error" is then simply its prediction error.
Every function is batched over ``B`` pairs, shapes ``(B, N, 3)`` / ``(B, N)``, world mm.

The **confidence** of a pair (:func:`pair_confidence`, in ``[0, 1]``) is computed from the LOO
errors ``d_n = |LOO error|`` (mm) of the affine fit::

    confidence = inlier_fraction * exp(-median(d) / CONFIDENCE_SCALE_MM)
    inlier_fraction = fraction of keypoints with d_n <= INLIER_THRESHOLD_MM

and 0 when the affine fit is a reflection (determinant <= 0: the keypoints say the moving image is
mirrored, e.g. a left-right flip, which a registration must not do).  A pair with
``confidence < CONFIDENCE_THRESHOLD`` is flagged ``check``.  The constants are in mm,
so they assume head-sized images (see README, "Confidence").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DegenerateFitError
from .linear import check_points, fit_rigid, normalize_weights
from .spec import AlignSpec
from .tps import points_normalization, tps_system

__all__ = [
    "KeypointResiduals",
    "loo_errors_affine",
    "loo_errors_rigid",
    "loo_errors_tps",
    "loo_errors",
    "keypoint_residuals",
    "pair_confidence",
    "keypoint_confidence",
    "INLIER_THRESHOLD_MM",
    "CONFIDENCE_SCALE_MM",
    "CONFIDENCE_THRESHOLD",
]

#: A keypoint whose affine LOO error is at most this (mm) counts as an inlier in the confidence.
INLIER_THRESHOLD_MM = 10.0
#: Median affine LOO error (mm) at which the confidence of an all-inlier pair is ``exp(-1)``.
CONFIDENCE_SCALE_MM = 10.0
#: Pairs with a confidence below this are flagged ``check``.
CONFIDENCE_THRESHOLD = 0.3


def _weights(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return normalize_weights(weights, like.double())


def loo_errors_affine(points_fixed: torch.Tensor, points_moving: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact LOO errors ``y_n - T^(-n)(x_n)`` ``(B, N, 3)`` mm of the weighted least-squares affine fit.

    Uses the hat-matrix identity ``e_n / (1 - h_nn)`` (float64).  A keypoint whose removal leaves
    the fit undetermined (``h_nn = 1``) gets ``inf``.
    """
    check_points(points_fixed, points_moving, weights)
    w = _weights(weights, points_fixed)
    x = points_fixed.double()
    mu = (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    xc = x - mu.unsqueeze(1)
    sigma = (xc.pow(2).sum(-1) * w).sum(1).div(w.sum(1)).sqrt().clamp_min(1e-12)
    xn = torch.cat([xc / sigma[:, None, None], torch.ones_like(xc[..., :1])], dim=-1)  # (B, N, 4)
    xtw = (xn * w.unsqueeze(-1)).transpose(1, 2)
    try:
        gram_inv = torch.linalg.inv(xtw @ xn)  # (B, 4, 4)
    except RuntimeError:
        raise DegenerateFitError("affine fit is undetermined (coplanar keypoints)") from None
    theta = gram_inv @ (xtw @ points_moving.double())
    resid = points_moving.double() - xn @ theta
    h = w * ((xn @ gram_inv) * xn).sum(-1)  # (B, N)
    denom = (1 - h).unsqueeze(-1)
    return torch.where(denom > 1e-9, resid / denom.clamp_min(1e-9), torch.full_like(resid, float("inf")))


def loo_errors_rigid(points_fixed: torch.Tensor, points_moving: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Exact LOO errors ``(B, N, 3)`` mm of the weighted rigid (Kabsch) fit, by ``B N`` batched refits."""
    check_points(points_fixed, points_moving, weights)
    b, n, _ = points_fixed.shape
    w = _weights(weights, points_fixed)
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    w_loo = (w.unsqueeze(1) * (1 - eye)).reshape(b * n, n)  # row (b, i): weights without keypoint i
    pf = points_fixed.double().unsqueeze(1).expand(b, n, n, 3).reshape(b * n, n, 3)
    pm = points_moving.double().unsqueeze(1).expand(b, n, n, 3).reshape(b * n, n, 3)
    mats = fit_rigid(pf, pm, w_loo).reshape(b, n, 4, 4)
    x = points_fixed.double()
    pred = (mats[..., :3, :3] @ x.unsqueeze(-1)).squeeze(-1) + mats[..., :3, 3]  # (B, N, 3)
    return points_moving.double() - pred


def loo_errors_tps(points_fixed: torch.Tensor, points_moving: torch.Tensor, lmbda: float | torch.Tensor = 0.0,
                   weights: torch.Tensor | None = None, *, center: torch.Tensor | None = None,
                   scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Exact LOO errors ``(B, N, 3)`` mm of :func:`keyreg.transforms.fit_tps` (same arguments).

    Rippa's rule ``s c_n / G_nn`` on the TPS system (see the module docstring): one ``(N+4)``
    inverse per pair instead of ``N`` refits.
    """
    check_points(points_fixed, points_moving, weights)
    b, n, _ = points_fixed.shape
    dev = points_fixed.device
    lam = torch.as_tensor(lmbda, dtype=torch.float64, device=dev).reshape(-1).expand(b)
    w = _weights(weights, points_fixed)
    default_c, default_s = points_normalization(points_fixed.detach())
    c = (default_c if center is None else torch.as_tensor(center, device=dev).expand(b, 3)).double()
    s = (default_s if scale is None else torch.as_tensor(scale, device=dev).reshape(-1).expand(b)).double()
    x = (points_fixed.double() - c.unsqueeze(1)) / s.view(-1, 1, 1)
    y = (points_moving.double() - c.unsqueeze(1)) / s.view(-1, 1, 1)
    system = tps_system(x, lam, w)
    rhs = torch.cat([torch.eye(n, dtype=x.dtype, device=dev).expand(b, n, n),
                     torch.zeros(b, 4, n, dtype=x.dtype, device=dev)], dim=1)
    try:
        g = torch.linalg.solve(system, rhs)[:, :n]  # (B, N, N), symmetric
    except RuntimeError:
        raise DegenerateFitError("TPS system is singular") from None
    coef = g @ y
    diag = torch.diagonal(g, dim1=1, dim2=2).unsqueeze(-1)
    err = s.view(-1, 1, 1) * coef / torch.where(diag.abs() > 1e-300, diag, torch.full_like(diag, 1e-300))
    return torch.where(diag.abs() > 1e-300, err, torch.full_like(err, float("inf")))


def loo_errors(spec: AlignSpec, points_fixed: torch.Tensor, points_moving: torch.Tensor,
               weights: torch.Tensor | None = None, *, center: torch.Tensor | None = None,
               scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """LOO error vectors ``(B, N, 3)`` mm of the fit ``spec`` (rigid, affine or TPS)."""
    if spec.kind == "rigid":
        return loo_errors_rigid(points_fixed, points_moving, weights)
    if spec.kind == "affine":
        return loo_errors_affine(points_fixed, points_moving, weights)
    return loo_errors_tps(points_fixed, points_moving, spec.lmbda, weights, center=center, scale=scale)


@dataclass
class KeypointResiduals:
    """Per-keypoint agreement of one fit (batch ``B``, ``N`` keypoints, mm).

    Attributes:
        residual: ``(B, N, 3)`` ``y_n - T(x_n)``.
        loo: ``(B, N, 3)`` ``y_n - T^(-n)(x_n)``.
    """

    residual: torch.Tensor
    loo: torch.Tensor

    @property
    def residual_mm(self) -> torch.Tensor:
        """``(B, N)`` residual lengths."""
        return self.residual.norm(dim=-1)

    @property
    def loo_mm(self) -> torch.Tensor:
        """``(B, N)`` LOO error lengths."""
        return self.loo.norm(dim=-1)


def keypoint_residuals(spec: AlignSpec, transform, points_fixed: torch.Tensor, points_moving: torch.Tensor,
                       weights: torch.Tensor | None = None, *, center: torch.Tensor | None = None,
                       scale: torch.Tensor | float | None = None) -> KeypointResiduals:
    """Residuals of a fitted ``transform`` and the LOO errors of the same fit (``spec``, weights,
    normalisation as used for ``transform``)."""
    pred = transform.map_points(points_fixed.double())
    resid = points_moving.double() - pred
    loo = loo_errors(spec, points_fixed, points_moving, weights, center=center, scale=scale)
    return KeypointResiduals(resid, loo)


def pair_confidence(loo_mm: torch.Tensor, *, affine_det: torch.Tensor | None = None,
                    inlier_threshold_mm: float = INLIER_THRESHOLD_MM,
                    scale_mm: float = CONFIDENCE_SCALE_MM) -> dict[str, torch.Tensor]:
    """The per-pair confidence from affine LOO error lengths ``(B, N)`` mm (module docstring).

    Args:
        loo_mm: ``(B, N)`` affine LOO error lengths; ``inf`` / NaN count as outliers.
        affine_det: optional ``(B,)`` determinant of the affine fit's linear part: a pair whose
            keypoints are best explained by a reflection (``det <= 0``, e.g. a left-right flipped
            image) gets confidence 0.

    Returns:
        ``{"confidence": (B,), "median_loo_mm": (B,), "inlier_fraction": (B,)}``.
    """
    d = torch.nan_to_num(loo_mm.double(), nan=float("inf"))
    med = d.median(dim=1).values
    inl = (d <= inlier_threshold_mm).double().mean(dim=1)
    conf = inl * torch.exp(-med.clamp_min(0) / scale_mm)
    if affine_det is not None:
        conf = torch.where(affine_det.to(conf) > 0, conf, torch.zeros_like(conf))
    return {"confidence": conf, "median_loo_mm": med, "inlier_fraction": inl}


def keypoint_confidence(points_fixed: torch.Tensor, points_moving: torch.Tensor,
                        weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`pair_confidence` of ``(B, N, 3)`` keypoint pairs: affine LOO errors and the affine
    fit's determinant, from the weights the registration uses.  Adds ``"affine_det"`` ``(B,)``."""
    from .linear import fit_affine

    loo = loo_errors_affine(points_fixed, points_moving, weights).norm(dim=-1)
    det = torch.linalg.det(fit_affine(points_fixed.double(), points_moving.double(), weights)[:, :3, :3])
    out = pair_confidence(loo, affine_det=det)
    out["affine_det"] = det
    return out
