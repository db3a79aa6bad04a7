"""Image similarities for dense refinement: MIND-SSC descriptors (multi-modal) and LNCC.

All functions take ``(B, C, I, J, K)`` float tensors on one grid (tensor axes = voxel axes i, j, k)
and are differentiable.  Losses are *dissimilarities* (lower is better) averaged over the voxels of
an optional ``(B, 1, I, J, K)`` mask (weights in [0, 1]).

* MIND-SSC (Heinrich et al., MICCAI 2013, "Towards realtime multimodal fusion ...: the
  self-similarity context"): for every voxel, patch distances between the 12 pairs of its six
  neighbours at distance ``dilation`` that are ``sqrt(2) * dilation`` apart, normalised by their
  local mean ("variance") and mapped through ``exp(-d / v)``.  The descriptor describes local
  structure, not intensity, so it compares T1 with T2.  The loss is the mean squared descriptor
  difference.
* LNCC: local normalised cross-correlation in a cubic window (same-contrast images); the loss is
  ``1 - mean(cc)``.
* NMI: normalised mutual information ``(H(A) + H(B)) / H(A, B)`` of a joint histogram (Studholme et
  al. 1999); not differentiable: the refinement's safeguard uses it as a measure independent of the
  optimised one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "SIMILARITIES",
    "SimilarityName",
    "FOREGROUND_LEVEL",
    "box_mean",
    "foreground_mask",
    "gaussian_blur",
    "lncc_loss",
    "mind_loss",
    "mind_ssc",
    "normalized_mutual_information",
    "robust_normalize",
]

SimilarityName = Literal["mind", "lncc"]
#: The selectable similarities (``--refine_similarity``).
SIMILARITIES: tuple[str, ...] = ("mind", "lncc")


def _axis_matrix(n: int, weights: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` filter matrix of the symmetric kernel ``weights`` (length ``2r+1``), each row
    renormalised over the taps inside the axis (so a constant stays constant up to the border)."""
    r = (weights.numel() - 1) // 2
    idx = torch.arange(n, device=weights.device)
    off = idx[None, :] - idx[:, None]  # column - row
    m = torch.where(off.abs() <= r, weights[(off + r).clamp(0, 2 * r)], torch.zeros((), dtype=weights.dtype,
                                                                                      device=weights.device))
    return m / m.sum(dim=1, keepdim=True)


def _filter_axes(x: torch.Tensor, kernels: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Apply a 1-D kernel along each spatial axis of ``(B, C, I, J, K)`` (``None``: leave the axis),
    as a matrix product per axis (fast on CPU, differentiable)."""
    eq = ["ai,bcijk->bcajk", "aj,bcijk->bciak", "ak,bcijk->bcija"]
    for axis, k in enumerate(kernels):
        if k is None or x.shape[2 + axis] == 1:
            continue
        x = torch.einsum(eq[axis], _axis_matrix(x.shape[2 + axis], k.to(x.dtype)), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, I, J, K)`` with ``sigma`` voxels per axis (the kernel is
    truncated at 2.5 sigma and renormalised at the border).  An axis with sigma below 0.2 voxel is left as is.
    """
    sig = [float(sigma)] * 3 if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    kernels: list[torch.Tensor | None] = []
    for s in sig:
        if s < 0.2:
            kernels.append(None)
            continue
        r = max(1, math.ceil(2.5 * s))
        t = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
        kernels.append(torch.exp(-0.5 * (t / s) ** 2))
    return _filter_axes(x, kernels)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^3`` window of every voxel of ``(B, C, I, J, K)`` (window clipped at the border)."""
    if radius <= 0:
        return x
    k = torch.ones(2 * radius + 1, dtype=torch.float64, device=x.device)
    return _filter_axes(x, [k, k, k])


def _ssc_pairs(dilation: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of six-neighbourhood offsets that are ``sqrt(2) * dilation`` apart."""
    six = []
    for a in range(3):
        for s in (-1, 1):
            o = [0, 0, 0]
            o[a] = s * dilation
            six.append(tuple(o))
    pairs = []
    for m in range(6):
        for n in range(m + 1, 6):
            d2 = sum((u - v) ** 2 for u, v in zip(six[m], six[n]))
            if d2 == 2 * dilation * dilation:
                pairs.append((six[m], six[n]))
    return pairs  # type: ignore[return-value]


def mind_ssc(image: torch.Tensor, *, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors of ``(B, 1, I, J, K)`` images.

    Args:
        image: intensities (any range; the descriptor is invariant to scale and offset).
        radius: patch radius in voxels of the box filter (1: 3^3 patches).
        dilation: distance in voxels of the six neighbours.

    Returns:
        ``(B, 12, I, J, K)`` descriptors in ``(0, 1]`` (each voxel's maximum is 1).
    """
    r = dilation
    padded = F.pad(image, [r] * 6, mode="replicate")
    n = image.shape[2:]

    def shifted(o):  # image[p + o], replicate border
        return padded[:, :, r + o[0]:r + o[0] + n[0], r + o[1]:r + o[1] + n[1], r + o[2]:r + o[2] + n[2]]

    dists = torch.cat([(shifted(oa) - shifted(ob)) ** 2 for oa, ob in _ssc_pairs(dilation)], dim=1)
    dists = [box_mean(dists, radius)]
    d = torch.cat(dists, dim=1)  # (B, 12, ...)
    d = d - d.min(dim=1, keepdim=True).values
    v = d.mean(dim=1, keepdim=True)
    mean_v = v.mean(dim=(2, 3, 4), keepdim=True)
    v = torch.maximum(torch.minimum(v, 1000.0 * mean_v), 0.001 * mean_v + 1e-12)
    desc = torch.exp(-d / v)
    return desc / desc.max(dim=1, keepdim=True).values


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1e-6)


def mind_loss(warped_desc: torch.Tensor, fixed_desc: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of MIND descriptors ``(B, 12, I, J, K)`` over the mask (0 = identical)."""
    return _masked_mean(((warped_desc - fixed_desc) ** 2).mean(dim=1, keepdim=True), mask)


def lncc_loss(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None, *,
              radius: int = 2, eps: float = 1e-3) -> torch.Tensor:
    """LNCC loss ``1 - mean(cc)``, ``cc`` the normalised cross-correlation in the ``(2r+1)^3`` window of each voxel; ``(B, 1, I, J, K)`` inputs.

    Returns:
        A scalar in ``[0, 2]`` (0: perfectly correlated everywhere).
    """
    mu_w, mu_f = box_mean(warped, radius), box_mean(fixed, radius)
    cov = box_mean(warped * fixed, radius) - mu_w * mu_f
    var_w = (box_mean(warped * warped, radius) - mu_w * mu_w).clamp_min(0)
    var_f = (box_mean(fixed * fixed, radius) - mu_f * mu_f).clamp_min(0)
    # eps relative to the mean local variances keeps the loss invariant to intensity scale
    floor = eps * (var_w.mean() * var_f.mean()).detach()
    cc = cov / torch.sqrt(var_w * var_f + floor + 1e-20)
    return 1.0 - _masked_mean(cc, mask)


def robust_normalize(image: torch.Tensor, mask: torch.Tensor | None = None, *,
                     low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Map the ``low``/``high`` quantiles of the (masked, non-zero) intensities to 0/1, clipped."""
    vals = image[(mask > 0) if mask is not None else torch.ones_like(image, dtype=torch.bool)]
    vals = vals[vals != 0] if (vals != 0).any() else vals
    if vals.numel() > 200_000:  # evenly strided: a 10 % sample of a 128^3 image gives the quantiles
        vals = vals[torch.linspace(0, vals.numel() - 1, 200_000, device=vals.device).long()]
    lo, hi = torch.quantile(vals.float(), torch.tensor([low, high], device=vals.device)).tolist()
    if hi <= lo:
        hi = lo + 1.0
    return ((image - lo) / (hi - lo)).clamp(0, 1)


#: normalised intensity (:func:`robust_normalize`) above which a voxel is foreground
FOREGROUND_LEVEL = 0.02


def foreground_mask(image: torch.Tensor, level: float = FOREGROUND_LEVEL) -> torch.Tensor:
    """``(B, 1, I, J, K)`` float mask (1 = foreground) of a robust-normalised image: its voxels above
    ``level`` after a Gaussian blur of one voxel (so that isolated noise voxels of the background do
    not count).  The refinement measures its similarity there when no fixed mask is given: background
    noise has structure of its own that pulls MIND and LNCC (docs/benchmarks.md: Dice 0.48 -> 0.57 on
    a T1 -> T2 pair of the refinement benchmark)."""
    return (gaussian_blur(image, 1.0) > level).to(image.dtype)


def normalized_mutual_information(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, *,
                                  bins: int = 32) -> float:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B)`` of two images on one grid.

    Args:
        a, b: ``(..., I, J, K)`` intensities normalised to [0, 1] (values outside are clipped into the
            first / last bin), any matching shapes.
        mask: optional tensor of the same spatial shape: only voxels where it is ``> 0`` count.
        bins: histogram bins per image.

    Returns:
        A value in ``[1, 2]``: 1 for independent images, 2 for images that determine each other
        (1.0 when fewer than two voxels are counted or both images are constant).
    """
    qa = (a.detach().reshape(-1).float().clamp(0, 1) * bins).long().clamp_max(bins - 1)
    qb = (b.detach().reshape(-1).float().clamp(0, 1) * bins).long().clamp_max(bins - 1)
    if mask is not None:
        keep = mask.detach().reshape(-1) > 0
        qa, qb = qa[keep], qb[keep]
    if qa.numel() < 2:
        return 1.0
    joint = torch.bincount(qa * bins + qb, minlength=bins * bins).double()
    joint = joint / joint.sum()

    def entropy(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_ab = entropy(joint)
    if h_ab <= 0:
        return 1.0
    j = joint.reshape(bins, bins)
    return (entropy(j.sum(1)) + entropy(j.sum(0))) / h_ab
