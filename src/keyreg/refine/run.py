"""Refine a keypoint transform on two images: the stage that follows the keypoint fit.

``refine_transform(fixed, moving, start, stage=...)`` returns ``T = S o C`` (``moving_from_fixed``,
world RAS mm) where ``S`` is the starting keypoint transform (affine or TPS) and ``C`` a correction in
the fixed space found by instance optimisation (:mod:`keyreg.refine.optimize`):

* ``stage="affine"``: ``C`` affine;
* ``stage="deformable"``: ``C = A o exp(v)``: the affine refinement first, then a diffeomorphic
  stationary velocity field.

Safeguard: the refined transform must not be worse than its start, judged from the images alone
(segmentations are not available at inference): on the fixed mask (or, without one, the fixed
foreground: :func:`~.similarity.foreground_mask`),

* the optimised dissimilarity may not get worse: for the affine stage, as the optimiser measured it
  (its finest level, its sample points); for the deformable stage, MIND-SSC or LNCC on the grid of
  ``spacing_mm`` (dense, on the mask), and
* the normalised mutual information of the fixed and the warped moving image (on the working grid,
  :func:`working_grid`, and the mask, 32 bins), a measure independent of the optimised one, may not
  fall (by more than ``nmi_tolerance``, default 0), and
* for a deformable LNCC refinement, the MIND-SSC dissimilarity may not rise either (LNCC assumes one
  contrast).

If any fails, the start is kept and the report says why (:func:`safeguard_verdict`).  Given both
segmentations, the report adds the Dice of the start and of the refinement and flags a drop of more
than ``dice_tolerance`` that the images did not catch (``dice_drop_missed``); they never decide.

The inverse ``T^-1 = exp(-v) o A^-1 o S^-1`` (``S^-1`` exact for affine starts, numerical for a TPS).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError, ImageContentError
from ..geometry import apply_affine, as_affine_tensor
from ..io import Volume, check_same_grid
from ..metrics import dice_per_label, jacobian_determinant, mean_dice
from ..transforms import (
    AffineTransform,
    DisplacementField,
    ThinPlateSpline,
    invert_points,
    sample_field,
)
from ..transforms.field import coarse_grid_affine
from ..warp import warp_image, warp_labels
from .optimize import (
    AffineConfig,
    Budget,
    DeformableConfig,
    _levels,
    downsample,
    level_mask,
    optimize_affine,
    optimize_velocity,
)
from .similarity import (foreground_mask, lncc_loss, mind_loss, mind_ssc, normalized_mutual_information,
                         robust_normalize)
from .velocity import integrate_velocity, level_grid

__all__ = ["STAGES", "RefineOptions", "RefineResult", "RefinedTransform", "check_fixed_mask", "refine_transform",
           "refined_name", "safeguard_verdict"]

Stage = Literal["affine", "deformable"]
#: The refinement stages (``--refine``).
STAGES: tuple[str, ...] = ("affine", "deformable")


#: Adam iterations per level of the affine part of a deformable refinement: a third of the affine
#: stage's, the velocity field takes up the rest (benchmark pairs: with (30, 15) and 10 finest-level
#: velocity iterations instead of 8, Dice +0.004 on T1 -> T2 and -0.001 on T1 -> T1, 13-19 % more time)
DEFORMABLE_AFFINE_ITERATIONS: tuple[int, ...] = (20, 10)


def refined_name(align: str, stage: str) -> str:
    """The name of the alignment refined from ``align`` by ``stage``: ``<align>+<stage>``."""
    return f"{align}+{stage}"


@dataclass
class RefineOptions:
    """User-facing settings of a refinement (README: "Dense refinement").

    Attributes:
        similarity: ``"mind"`` (MIND-SSC, multi-modal; default) or ``"lncc"`` (same contrast).
        iterations: deformable Adam iterations per level, coarse to fine; its length is the number of levels.
        reg_weight: weight of the velocity's diffusion energy.
        spacing_mm: finest similarity grid spacing of the deformable stage.
        seconds: wall-clock budget of the whole refinement (``None``: run every iteration).
        nmi_tolerance: the safeguard keeps the start when the normalised mutual information falls by
            more than this (default 0: any fall; in the benchmark an affine refinement that cost 0.036
            Dice lowered the NMI by only 0.0007, so no fall is accepted).
        dice_tolerance: with segmentations, a Dice drop larger than this is reported
            (``dice_drop_missed``); segmentations never decide.
        progress: show a progress bar (stderr).
    """

    similarity: str = "mind"
    iterations: tuple[int, ...] = DeformableConfig.iterations
    reg_weight: float = DeformableConfig.reg_weight
    spacing_mm: float = DeformableConfig.spacing_mm
    seconds: float | None = None
    nmi_tolerance: float = 0.0
    dice_tolerance: float = 0.01
    progress: bool = False

    def check(self) -> None:
        if self.similarity not in ("mind", "lncc"):
            raise ConfigError(f"unknown refinement similarity {self.similarity!r}: use mind or lncc")
        if not self.iterations or any(int(i) < 0 for i in self.iterations):
            raise ConfigError(f"refinement iterations must be non-negative integers, got {list(self.iterations)}")
        if not (self.reg_weight >= 0 and math.isfinite(self.reg_weight)):
            raise ConfigError(f"refinement regularisation weight must be >= 0, got {self.reg_weight}")
        if not (self.spacing_mm > 0 and math.isfinite(self.spacing_mm)):
            raise ConfigError(f"refinement spacing must be > 0 mm, got {self.spacing_mm}")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"the refinement time budget must be > 0 seconds, got {self.seconds}")
        if not (self.nmi_tolerance >= 0 and math.isfinite(self.nmi_tolerance)):
            raise ConfigError(f"the safeguard's NMI tolerance must be >= 0, got {self.nmi_tolerance}")


@dataclass
class RefinedTransform:
    """``T(p) = start(affine(phi(p)))``: a keypoint start, an affine correction and a diffeomorphism,
    all ``moving_from_fixed`` in world RAS mm; ``phi`` is ``None`` (identity) after an affine refinement.

    Attributes:
        start: the keypoint transform ``S`` (batch 1).
        affine: ``(4, 4)`` float64 world matrix ``A`` (fixed mm -> fixed mm).
        phi: ``exp(v)`` as a displacement field on the control grid (fixed space), or ``None``.
        phi_inverse: ``exp(-v)`` on the same grid, or ``None``.
    """

    start: AffineTransform | ThinPlateSpline | DisplacementField
    affine: np.ndarray
    phi: DisplacementField | None = None
    phi_inverse: DisplacementField | None = None

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed world points ``(1, M, 3)`` -> moving world points."""
        p = points
        if self.phi is not None:
            p = self.phi.map_points(p.to(self.phi.displacement.dtype)).to(points.dtype)
        p = apply_affine(torch.as_tensor(self.affine, device=p.device), p.double()).to(points.dtype)
        return self.start.map_points(p)

    def to(self, device: torch.device | str) -> RefinedTransform:
        return RefinedTransform(self.start.to(device), self.affine,
                                None if self.phi is None else self.phi.to(device),
                                None if self.phi_inverse is None else self.phi_inverse.to(device))

    @property
    def device(self) -> torch.device:
        """Where the transform's tensors live (the start's device)."""
        if self.phi is not None:
            return self.phi.displacement.device
        for attr in ("matrix", "control_points", "displacement"):
            t = getattr(self.start, attr, None)
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")

    @property
    def linear_matrix(self) -> np.ndarray | None:
        """The whole transform as one ``(4, 4)`` matrix when it is linear (affine start, no ``phi``)."""
        if self.phi is None and isinstance(self.start, AffineTransform):
            return self.start.matrix[0].detach().cpu().double().numpy() @ self.affine
        return None


@dataclass
class RefineResult:
    """The refined transform (or the start, if the safeguard kept it) and what happened.

    Attributes:
        transform: ``T`` (a :class:`RefinedTransform`; the same object as the start when kept).
        kept_start: the safeguard rejected the refinement.
        report: losses, Dice before/after, iterations, seconds, the reason when the start was kept.
        candidate: the refined transform itself, also when the safeguard rejected it.
    """

    transform: Any
    kept_start: bool
    report: dict[str, Any] = field(default_factory=dict)
    candidate: Any = None


def check_fixed_mask(mask: Volume, fixed: Volume) -> None:
    """A fixed mask must lie on the fixed image's grid and have a non-zero voxel.

    Raises:
        ImageContentError: another grid, or an empty mask.
    """
    check_same_grid(mask, fixed, "fixed mask")
    if not bool((np.asarray(mask.data) != 0).any()):
        raise ImageContentError(f"{mask.name}: the fixed mask is empty (no non-zero voxel)")


def _mask_tensor(mask: Volume | None, fixed: Volume, device) -> torch.Tensor | None:
    if mask is None:
        return None
    check_fixed_mask(mask, fixed)
    return torch.as_tensor(np.asarray(mask.data) != 0, dtype=torch.float32, device=device)[None, None]


def working_grid(shape: tuple[int, ...], affine: np.ndarray, spacing_mm: float) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of the grid a refinement works on: the fixed grid (``shape``, ``affine``)
    coarsened along its axes finer than half of ``spacing_mm`` (the finest level's), over the same
    field of view (:func:`level_grid`, which leaves coarser axes as they are: at 2 mm the fixed grid
    itself).  Every level is sampled from it with its own anti-aliasing blur."""
    return level_grid(shape, affine, 0.5 * spacing_mm)


def _warp(moving: torch.Tensor, moving_affine: np.ndarray, grid: tuple[tuple[int, ...], np.ndarray],
          transform) -> torch.Tensor:
    """``moving`` resampled through ``transform`` onto ``grid`` (``(shape, affine)``)."""
    linear = getattr(transform, "linear_matrix", None)  # one matrix: the warp's fast path
    if linear is not None:
        transform = AffineTransform(torch.as_tensor(linear, device=moving.device))
    return warp_image(moving, moving_affine, grid[0], grid[1], transform)


class _Measures:
    """What the safeguard compares, for any warped moving image: the optimised dissimilarity on the
    finest level's grid (the fixed side computed once; ``spacing`` ``None``: not computed) and the NMI
    on the working grid, both on the mask.  An LNCC refinement is also measured with MIND-SSC on the
    same grid (``"mind"``): LNCC assumes one contrast, and on a pair of two contrasts it can wreck an
    alignment while the NMI rises (docs/benchmarks.md); the modality-independent MIND does not."""

    def __init__(self, fixed_t: torch.Tensor, mask: torch.Tensor | None, fixed_affine: np.ndarray,
                 spacing: float | None, name: str) -> None:
        self.fixed_t, self.mask, self.affine, self.name, self.spacing = fixed_t, mask, fixed_affine, name, spacing
        if spacing is not None:
            self.shape, _ = level_grid(fixed_t.shape[2:], fixed_affine, spacing)
            self.level_mask = level_mask(mask, fixed_affine, self.shape, spacing)
            f = downsample(fixed_t, fixed_affine, self.shape)
            with torch.no_grad():
                self.fixed_level = mind_ssc(f) if name == "mind" else f
                self.fixed_mind = self.fixed_level if name == "mind" else mind_ssc(f)

    def __call__(self, warped_t: torch.Tensor) -> dict[str, float]:
        out = {"dissimilarity": float("nan")}
        if self.spacing is not None:
            w = downsample(warped_t, self.affine, self.shape)
            with torch.no_grad():
                mind = float(mind_loss(mind_ssc(w), self.fixed_mind, self.level_mask))
                if self.name == "mind":
                    out["dissimilarity"] = mind
                else:
                    out["dissimilarity"] = float(lncc_loss(w, self.fixed_level, self.level_mask))
                    out["mind"] = mind
        out["nmi"] = normalized_mutual_information(self.fixed_t, warped_t, self.mask)
        return out


def safeguard_verdict(start: dict[str, float], end: dict[str, float], *, similarity: str = "mind",
                      nmi_tolerance: float = 0.0) -> tuple[bool, str]:
    """Whether to keep the start, from image measures only, and why.

    Args:
        start, end: ``{"dissimilarity": d, "nmi": n}`` of the start and of the refinement (the
            optimised dissimilarity, lower is better; the normalised mutual information, higher is better),
            and for a deformable LNCC refinement ``"mind"``, the MIND-SSC dissimilarity, which must not rise.
        similarity: the optimised similarity's name (for the reason).
        nmi_tolerance: the largest NMI fall accepted.

    Returns:
        ``(keep_start, reason)``; ``reason`` is ``""`` when the refinement is accepted.  A measure that
        is not finite after the refinement rejects it.
    """
    reasons = []
    d0, d1 = start["dissimilarity"], end["dissimilarity"]
    if not d1 <= d0:  # NaN rejects
        reasons.append(f"{similarity} dissimilarity {d1:.5f} > start {d0:.5f}")
    n0, n1 = start["nmi"], end["nmi"]
    if not n1 >= n0 - nmi_tolerance:
        reasons.append(f"NMI {n1:.5f} < start {n0:.5f}" + (f" - {nmi_tolerance:g}" if nmi_tolerance else ""))
    if "mind" in start and "mind" in end and not end["mind"] <= start["mind"]:
        reasons.append(f"MIND-SSC dissimilarity {end['mind']:.5f} > start {start['mind']:.5f} (LNCC assumes "
                       "one contrast: try --refine_similarity mind)")
    return bool(reasons), "; ".join(reasons)


def _dice(moving_seg: Volume, fixed_seg: Volume, fixed: Volume, transform, device) -> float:
    seg = warp_labels(moving_seg.tensor(device)[:, 0], moving_seg.affine, fixed.shape, fixed.affine, transform)
    return mean_dice(dice_per_label(seg[0].cpu().numpy(), np.asarray(fixed_seg.data)))


def _start_inverse(start, moving: Volume) -> Any:
    """``S^-1`` as something with ``map_points``: exact for linear starts; for a TPS (or a field), a
    displacement field on a sub-grid (stride 2) of the moving grid from Newton's method."""
    if isinstance(start, AffineTransform):
        return start.inverse()
    shape, aff = coarse_grid_affine(moving.shape, moving.affine, 2)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)
    q = apply_affine(aff, idx)
    t = start.to("cpu")
    out = torch.empty_like(q)
    for s in range(0, q.shape[1], 1 << 16):
        out[:, s:s + (1 << 16)] = invert_points(t, q[:, s:s + (1 << 16)])[0]
    disp = (out - q)[0].T.reshape(1, 3, *shape).float().contiguous()
    return DisplacementField(disp, aff)


@dataclass
class _Inverse:
    """``T^-1(q) = phi^-1(A^-1(S^-1(q)))`` (maps moving world points to fixed world points)."""

    start_inverse: Any
    affine_inverse: np.ndarray
    phi_inverse: DisplacementField | None

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        p = self.start_inverse.map_points(points)
        p = apply_affine(torch.as_tensor(self.affine_inverse, device=p.device), p.double()).to(points.dtype)
        if self.phi_inverse is not None:
            p = self.phi_inverse.map_points(p.to(self.phi_inverse.displacement.dtype)).to(points.dtype)
        return p


def inverse_field(transform: RefinedTransform, moving: Volume, *, device=None) -> DisplacementField:
    """``T^-1`` sampled on the MOVING grid as a displacement field (``T^-1(q) = q + w(q)``, world mm).

    ``phi^-1 = exp(-v)``; ``A^-1`` exact; ``S^-1`` exact (affine) or numerical (TPS, Newton on a stride-2
    sub-grid of the moving grid, then trilinear)."""
    inv = _Inverse(_start_inverse(transform.start, moving), np.linalg.inv(transform.affine), transform.phi_inverse)
    return sample_field(inv, moving.shape, moving.affine, stride=1, device=device)


def refine_transform(
    fixed: Volume,
    moving: Volume,
    start: AffineTransform | ThinPlateSpline | DisplacementField,
    *,
    stage: Stage = "deformable",
    options: RefineOptions | None = None,
    fixed_mask: Volume | None = None,
    fixed_seg: Volume | None = None,
    moving_seg: Volume | None = None,
    device: torch.device | str | None = None,
) -> RefineResult:
    """Refine ``start`` (``moving_from_fixed``) by dense instance optimisation on the two images.

    Args:
        fixed, moving: the images (original grids).
        start: the keypoint transform, batch 1 (rigid/affine, TPS, or a displacement field).
        stage: ``"affine"`` or ``"deformable"`` (affine refinement, then a diffeomorphic field).
        options: similarity, iterations, regularisation, time budget, progress.
        fixed_mask: optional fixed-grid mask (non-zero = used) limiting the similarity.
        fixed_seg, moving_seg: optional segmentations: the report then gives the Dice of the start and of
            the refinement (they do not decide anything).
        device: where to optimise (default: CPU).

    Returns:
        :class:`RefineResult` with ``transform`` a :class:`RefinedTransform` (or ``start`` when kept).
    """
    opts = options or RefineOptions()
    opts.check()
    if stage not in STAGES:
        raise ConfigError(f"unknown refinement {stage!r}: use {' or '.join(STAGES)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t0 = time.perf_counter()
    original, start = start, start.to(dev)
    # the optimisation and the safeguard run on a working grid no finer than half the finest level's
    # spacing: the fixed grid itself at 2 mm, a 1.5 mm grid over its field of view at 1 mm
    wshape, waff = working_grid(fixed.shape, fixed.affine, opts.spacing_mm)
    mask = _mask_tensor(fixed_mask, fixed, dev)
    if mask is not None:
        mask = downsample(mask, fixed.affine, wshape, blur=False)
    fixed_t = robust_normalize(downsample(fixed.tensor(dev).float(), fixed.affine, wshape), mask)
    moving_t = robust_normalize(moving.tensor(dev).float())
    region = "fixed mask"
    if mask is None:  # the similarity (and the safeguard) count the fixed foreground, not background noise
        mask, region = foreground_mask(fixed_t), "fixed foreground"
    report: dict[str, Any] = {"stage": stage, "similarity": opts.similarity, "device": str(dev), "region": region}
    total = opts.seconds

    # affine correction
    aff_budget = Budget(None if total is None else (total if stage == "affine" else 0.25 * total), opts.progress)
    warped_start = _warp(moving_t, moving.affine, (wshape, waff), start)
    aff_iterations = AffineConfig.iterations if stage == "affine" else DEFORMABLE_AFFINE_ITERATIONS
    aff = optimize_affine(fixed_t, warped_start, waff,
                          AffineConfig(similarity=opts.similarity, iterations=aff_iterations), mask=mask, budget=aff_budget)
    report["affine"] = {"iterations": aff.iterations, "loss_start": aff.loss_start, "loss_end": aff.loss_end,
                        "stopped_by_budget": aff.stopped, "matrix": aff.matrix.tolist()}
    refined = RefinedTransform(start, aff.matrix)
    if stage == "deformable":
        left = None if total is None else max(total - (time.perf_counter() - t0), 1e-3)
        warped_aff = _warp(moving_t, moving.affine, (wshape, waff), refined)
        cfg = DeformableConfig(similarity=opts.similarity, iterations=tuple(int(i) for i in opts.iterations),
                               reg_weight=opts.reg_weight, spacing_mm=opts.spacing_mm)
        vel = optimize_velocity(fixed_t, warped_aff, waff, cfg, mask=mask, budget=Budget(left, opts.progress))
        with torch.no_grad():
            u = integrate_velocity(vel.velocity, vel.affine, squarings=vel.squarings)
            u_inv = integrate_velocity(-vel.velocity, vel.affine, squarings=vel.squarings)
        phi = DisplacementField(u, as_affine_tensor(vel.affine, dev))
        refined = RefinedTransform(start, aff.matrix, phi, DisplacementField(u_inv, as_affine_tensor(vel.affine, dev)))
        det = jacobian_determinant(phi.to("cpu"))
        report["deformable"] = {"iterations": vel.iterations, "loss_start": vel.loss_start, "loss_end": vel.loss_end,
                                "stopped_by_budget": vel.stopped, "control_grid": list(vel.velocity.shape[2:]),
                                "iterations_per_level": [len(h) for h in vel.history],
                                "similarity_history": [[round(x, 6) for x in h] for h in vel.history],
                                "levels": len(cfg.iterations), "reg_weight": cfg.reg_weight,
                                "jacobian_min": float(det.min()), "jacobian_nonpositive_fraction": float(np.mean(det <= 0))}

    # safeguard: the images decide (the optimised dissimilarity and the NMI, on the mask); the
    # segmentations, when given, are only reported
    # the dissimilarity: for the affine stage, the optimiser's own (its finest level, its points); for
    # the deformable stage, on the finest level's grid (dense)
    finest = None if stage == "affine" else _levels(max(opts.spacing_mm, float(min(fixed.spacing))), 1)[0]
    warped_final = _warp(moving_t, moving.affine, (wshape, waff), refined)
    measure = _Measures(fixed_t, mask, waff, finest, opts.similarity)
    before, after = measure(warped_start), measure(warped_final)
    if stage == "affine":
        before["dissimilarity"], after["dissimilarity"] = aff.loss_start, aff.loss_end
    report["similarity_start"], report["similarity_end"] = before["dissimilarity"], after["dissimilarity"]
    report["nmi_start"], report["nmi_end"] = before["nmi"], after["nmi"]
    if "mind" in before:
        report["mind_check_start"], report["mind_check_end"] = before["mind"], after["mind"]
    kept, reason = safeguard_verdict(before, after, similarity=opts.similarity, nmi_tolerance=opts.nmi_tolerance)
    report["kept_start"] = kept
    if kept:
        report["reason"] = reason
    if fixed_seg is not None and moving_seg is not None:
        d0 = _dice(moving_seg, fixed_seg, fixed, start, dev)
        d1 = _dice(moving_seg, fixed_seg, fixed, refined, dev)
        report["dice_start"], report["dice_end"], report["dice_change"] = d0, d1, d1 - d0
        report["dice_drop_missed"] = bool(not kept and d1 < d0 - opts.dice_tolerance)
    report["seconds"] = time.perf_counter() - t0
    return RefineResult(original if kept else refined, kept, report, refined)
