"""Thin-plate spline (TPS) fit and evaluation between keypoints, in world space.

Model (per output axis ``a``), in *normalised* coordinates ``x~ = (x - c) / s``::

    f_a(x~) = A_a . [x~, 1] + sum_n w_na U(|x~ - p~_n|),      U(r) = r^2 log r

``p~_n`` are the fixed keypoints (control points) and ``f`` returns the matching moving point in
the same normalised frame, so that ``T(x) = c + s f((x - c) / s)`` maps fixed world mm to moving
world mm.  ``U(r) = r^2 log r`` is the kernel of the official KeyMorph code (the 2-D thin-plate
kernel, conditionally positive definite in 3-D too), kept so that ``lambda`` means what it means
there.  The fit solves::

    [ K + lambda diag(1 / w)   P ] [W]   [Y~]
    [ P^T                      0 ] [A] = [0 ]

with ``K_nm = U(|p~_n - p~_m|)``, ``P = [p~, 1]`` and ``w`` the keypoint weights scaled to mean 1.
``lambda = 0`` interpolates the keypoints exactly; ``lambda -> inf`` tends to the affine fit;
``lambda ~ 10`` is close to affine.

Normalisation: ``c`` is the centre and ``s`` half the longest physical side of the fixed image's
field of view (:func:`keyreg.geometry.fov_center`, :func:`keyreg.geometry.fov_half_extent`), so for
the cubic grids of the official models ``x~`` is exactly their ``[-1, 1]`` frame and lambda values
carry over.  Without an image, the keypoints' own centre and extent are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DegenerateFitError, ShapeError
from .linear import check_points, check_spread, normalize_weights

__all__ = ["ThinPlateSpline", "fit_tps", "tps_kernel", "tps_system", "points_normalization"]

#: Max number of (query point x control point) kernel entries evaluated at once.
KERNEL_CHUNK_ELEMENTS = 1 << 22


def tps_kernel(r2: torch.Tensor) -> torch.Tensor:
    """``U(r) = r^2 log r`` written in terms of ``r^2``: ``0.5 r^2 log(r^2)``, with ``U(0) = 0``.

    The clamp inside the log keeps the value and its gradient finite at ``r = 0``.
    """
    return 0.5 * r2 * torch.log(r2.clamp_min(1e-30))


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(B, M, N)`` between ``(B, M, 3)`` and ``(B, N, 3)``, exact at 0."""
    return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)


def points_normalization(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``(B, 3)`` and scale ``(B,)`` from the points' bounding box (half its longest side)."""
    lo = points.amin(dim=1)
    hi = points.amax(dim=1)
    return (lo + hi) / 2, ((hi - lo).amax(dim=1) / 2).clamp_min(1e-6)


@dataclass
class ThinPlateSpline:
    """A batch of fitted thin-plate splines ``moving_from_fixed`` (see the module docstring).

    Attributes:
        control_points: ``(B, N, 3)`` fixed keypoints, normalised.
        kernel_weights: ``(B, N, 3)`` ``W``.
        affine: ``(B, 4, 3)`` ``A``, acting on ``[x~, 1]`` (rows x, y, z, 1).
        center: ``(B, 3)`` world mm.
        scale: ``(B,)`` mm.
    """

    control_points: torch.Tensor
    kernel_weights: torch.Tensor
    affine: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.control_points.shape[0]

    def map_points(self, points: torch.Tensor, chunk_elements: int = KERNEL_CHUNK_ELEMENTS) -> torch.Tensor:
        """Fixed world points ``(B, M, 3)`` -> moving world points ``(B, M, 3)``: ``p + u(p)``.

        See :meth:`displacement` for precision and memory.
        """
        return points + self.displacement(points, chunk_elements)

    def displacement(self, points: torch.Tensor, chunk_elements: int = KERNEL_CHUNK_ELEMENTS) -> torch.Tensor:
        """``u(p) = T(p) - p`` (world mm) at fixed world points ``(B, M, 3)``.

        Computed as ``s (U W + x~ (A - I) + b)`` without cancellation, so an identity TPS gives
        exactly zero up to the solver's rounding.

        Computed in the points' dtype (float32 points: fast dense evaluation, about 1e-6 of the
        field of view; float64: exact to rounding), in chunks of query points so that at most
        ``chunk_elements`` kernel values (query x control point) exist at once.  This one
        function serves both the dense warp and the mapping of keypoints.
        """
        if points.ndim != 3 or points.shape[0] != self.batch_size or points.shape[-1] != 3:
            raise ShapeError(f"points must be ({self.batch_size}, M, 3), got {tuple(points.shape)}")
        dt = points.dtype if points.dtype in (torch.float32, torch.float64) else torch.float32
        ctrl = self.control_points.to(dt)
        ctrl_t = ctrl.transpose(1, 2).contiguous()
        half_weights = (0.5 * self.kernel_weights).to(dt)  # U = 0.5 r2 log r2: the 0.5 goes with W
        eye = torch.eye(3, dtype=self.affine.dtype, device=self.affine.device)
        lin, shift = (self.affine[:, :3] - eye).to(dt), self.affine[:, 3:4].to(dt)
        center = self.center.unsqueeze(1).to(dt)
        scale = self.scale.view(-1, 1, 1).to(dt)
        ctrl_sq = ctrl.pow(2).sum(-1).unsqueeze(1)  # (B, 1, N)
        b, n = ctrl.shape[:2]
        step = max(1, chunk_elements // max(n, 1))
        out = torch.empty(points.shape, dtype=dt, device=points.device)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (points, self.kernel_weights,
                                                                         self.control_points, self.affine))
        r2 = lg = None
        for start in range(0, points.shape[1], step):
            x = (points[:, start : start + step].to(dt) - center) / scale
            m = x.shape[1]
            if grad:  # differentiable form
                r2c = (x.pow(2).sum(-1, keepdim=True) + ctrl_sq - 2 * x @ ctrl_t).clamp_min(0)
                u = 2 * tps_kernel(r2c) @ half_weights
            else:  # fused, in place, in reused buffers: r2 = |x|^2 + |c|^2 - 2 x.c; U' = r2 log r2
                if r2 is None or r2.numel() < b * m * n:
                    r2 = torch.empty(b * m * n, dtype=dt, device=points.device)
                    lg = torch.empty_like(r2)
                r2m, lgm = r2[: b * m * n].view(b, m, n), lg[: b * m * n].view(b, m, n)
                torch.baddbmm(x.pow(2).sum(-1, keepdim=True) + ctrl_sq, x, ctrl_t, alpha=-2, out=r2m)
                r2m.clamp_min_(1e-30)  # r2 = 0 (a control point): r2 log r2 = -7e-29, i.e. 0
                torch.log(r2m, out=lgm)
                lgm.mul_(r2m)
                u = torch.bmm(lgm, half_weights)
            u.add_(torch.baddbmm(shift, x, lin))
            out[:, start : start + step] = u.mul_(scale)
        return out.to(points.dtype)

    def to(self, device: torch.device | str) -> "ThinPlateSpline":
        return ThinPlateSpline(*(t.to(device) for t in (self.control_points, self.kernel_weights,
                                                        self.affine, self.center, self.scale)))

    def __getitem__(self, b: int) -> "ThinPlateSpline":
        return ThinPlateSpline(*(t[b : b + 1] for t in (self.control_points, self.kernel_weights,
                                                       self.affine, self.center, self.scale)))

    def affine_part(self) -> torch.Tensor:
        """The affine part as ``(B, 4, 4)`` world ``moving_from_fixed`` matrices."""
        m = self.affine[:, :3].transpose(1, 2)  # normalised: f = m x~ + b
        b = self.affine[:, 3]
        c, s = self.center, self.scale.view(-1, 1)
        # T(x) = c + s (m (x - c)/s + b) = m x + (c + s b - m c)
        t = c + s * b - (m @ c.unsqueeze(-1)).squeeze(-1)
        top = torch.cat([m, t.unsqueeze(-1)], dim=-1)
        bottom = torch.zeros_like(top[:, :1])
        bottom[..., 3] = 1
        return torch.cat([top, bottom], dim=1)


#: Regulariser of a keypoint with weight 0: large enough that it does not influence the fit
#: (its kernel coefficient is ~1e-10 of its residual), whatever lambda is.
ZERO_WEIGHT_REGULARIZER = 1e10


def tps_system(x: torch.Tensor, lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The ``(B, N+4, N+4)`` TPS system ``[[K + diag(r), P], [P^T, 0]]`` (see the module docstring).

    Args:
        x: ``(B, N, 3)`` normalised fixed keypoints (float64).
        lam: ``(B,)`` lambda.
        w: ``(B, N)`` weights scaled to mean 1.  ``r_n = lambda / w_n``; a keypoint with weight 0
            is left out of the fit (``r_n`` = :data:`ZERO_WEIGHT_REGULARIZER`), also when lambda is 0.
    """
    b, n, _ = x.shape
    reg = torch.where(w > 0, (lam.view(-1, 1) / w.clamp_min(1e-8)).clamp_max(ZERO_WEIGHT_REGULARIZER),
                      torch.full_like(w, ZERO_WEIGHT_REGULARIZER))
    k = tps_kernel(_sq_dist(x, x)) + torch.diag_embed(reg)
    p = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (B, N, 4)
    top = torch.cat([k, p], dim=-1)
    bottom = torch.cat([p.transpose(1, 2), torch.zeros(b, 4, 4, dtype=x.dtype, device=x.device)], dim=-1)
    return torch.cat([top, bottom], dim=1)


def fit_tps(
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    lmbda: float | torch.Tensor = 0.0,
    weights: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> ThinPlateSpline:
    """Fit thin-plate splines mapping fixed keypoints onto moving keypoints.

    Args:
        points_fixed: ``(B, N, 3)`` world mm (the control points).
        points_moving: ``(B, N, 3)`` world mm.
        lmbda: smoothness ``>= 0``: a float or a ``(B,)`` tensor.  0 interpolates exactly.
        weights: optional ``(B, N)`` keypoint weights; the regulariser becomes
            ``lambda diag(1 / w)`` with ``w`` scaled to mean 1 (low weight = less trusted); a
            keypoint with weight 0 is left out (also with lambda 0).
        center: ``(B, 3)`` or ``(3,)`` world mm, centre of the normalised frame.
        scale: ``(B,)`` or float, mm per normalised unit.  Both default to the keypoints'
            bounding box; pass the fixed image's field of view (see module docstring).

    Returns:
        A :class:`ThinPlateSpline`; the linear system is solved in float64 on the points' device.

    Raises:
        DegenerateFitError: fewer than 4 or coplanar fixed keypoints, or (with ``lambda = 0``)
            two fixed keypoints at the same place.
    """
    check_points(points_fixed, points_moving, weights)
    b, n, _ = points_fixed.shape
    dev = points_fixed.device
    lam = torch.as_tensor(lmbda, dtype=torch.float64, device=dev).reshape(-1)
    if lam.numel() == 1:
        lam = lam.expand(b)
    if lam.numel() != b or bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
        raise ShapeError(f"lmbda must be a finite value >= 0 or a (B,) tensor, got {lmbda!r}")
    w = normalize_weights(weights, points_fixed.double())
    check_spread(points_fixed, w, 3, "TPS", "fixed")

    default_c, default_s = points_normalization(points_fixed.detach())
    c = default_c if center is None else torch.as_tensor(center, device=dev).expand(b, 3)
    s = default_s if scale is None else torch.as_tensor(scale, device=dev).reshape(-1).expand(b)
    c = c.to(torch.float64)
    s = s.to(torch.float64)
    x = (points_fixed.double() - c.unsqueeze(1)) / s.view(-1, 1, 1)
    y = (points_moving.double() - c.unsqueeze(1)) / s.view(-1, 1, 1)

    r2 = _sq_dist(x, x)
    if bool((lam == 0).any()):
        used = (w > 0).unsqueeze(1) & (w > 0).unsqueeze(2)
        off_diag = torch.where(used, r2, torch.full_like(r2, 1e30)) + torch.eye(n, dtype=r2.dtype, device=dev) * 1e30
        if bool((off_diag[lam == 0].amin(dim=(1, 2)) < 1e-16).any()):
            raise DegenerateFitError("TPS with lambda = 0 is undetermined: two fixed keypoints coincide")
    system = tps_system(x, lam, w)
    rhs = torch.cat([y, torch.zeros(b, 4, 3, dtype=x.dtype, device=dev)], dim=1)
    try:
        sol = torch.linalg.solve(system, rhs)
    except RuntimeError as e:  # singular system
        raise DegenerateFitError(f"TPS system is singular ({str(e).splitlines()[0]})") from None
    return ThinPlateSpline(control_points=x, kernel_weights=sol[:, :n], affine=sol[:, n:],
                           center=c, scale=s)
