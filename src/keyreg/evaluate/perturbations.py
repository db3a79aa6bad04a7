"""Seeded perturbations of the moving image (rotation about one axis, isotropic scale, translation)
and the two ways of applying them (``header``, ``resample``; see :mod:`keyreg.evaluate`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from ..geometry import fov_center, rotation_about
from ..io import Volume
from .seeds import seed_of

__all__ = ["PerturbMode", "Perturbation", "draw_perturbation", "perturb"]

PerturbMode = Literal["auto", "header", "resample"]


@dataclass(frozen=True)
class Perturbation:
    """A world-space similarity applied to the moving image.

    ``P(x) = c + t + s R (x - c)``: rotation ``R`` by ``rotation_deg`` about the unit ``axis``
    through the centre ``c`` of the image's field of view, isotropic scale ``s`` about ``c``,
    translation ``t`` (mm, RAS).
    """

    rotation_deg: float
    axis: tuple[float, float, float]
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def matrix(self, center: np.ndarray) -> np.ndarray:
        """``(4, 4)`` world RAS matrix of ``P`` for the rotation centre ``center`` (mm)."""
        c = np.asarray(center, dtype=np.float64)
        lin = self.scale * rotation_about(self.axis, self.rotation_deg)
        out = np.eye(4)
        out[:3, :3] = lin
        out[:3, 3] = c + np.asarray(self.translation, dtype=np.float64) - lin @ c
        return out

    @property
    def is_identity(self) -> bool:
        return (math.isclose(math.remainder(self.rotation_deg, 360.0), 0.0, abs_tol=1e-12)
                and self.scale == 1.0 and not any(self.translation))


def draw_perturbation(seed: int, pair_key: str, rotation_deg: float, *,
                      axis: Sequence[float] | None = None, translation: float = 0.0,
                      scaling: float = 0.0) -> Perturbation:
    """The perturbation of one (pair, angle), reproducible from ``(seed, pair_key, angle)`` alone.

    Args:
        axis: a fixed rotation axis (normalised); ``None`` = a random unit axis (isotropic).
        translation: each component uniform in ``[-translation, translation]`` mm.
        scaling: isotropic scale uniform in ``[1 - scaling, 1 + scaling]``.
    """
    if not (math.isfinite(translation) and translation >= 0):
        raise ConfigError(f"--translation must be a finite number >= 0 mm, got {translation}")
    if not 0 <= scaling < 1:
        raise ConfigError(f"--scaling must be in [0, 1), got {scaling}")
    if not math.isfinite(rotation_deg):
        raise ConfigError(f"rotation angles must be finite, got {rotation_deg}")
    rng = np.random.default_rng(seed_of(seed, pair_key, f"{float(rotation_deg):.6g}"))
    random_axis = rng.normal(size=3)
    t = rng.uniform(-1.0, 1.0, size=3) * translation
    s = 1.0 + rng.uniform(-1.0, 1.0) * scaling
    if axis is None:
        ax = random_axis
    else:
        ax = np.asarray(axis, dtype=np.float64)
        if ax.shape != (3,) or not np.all(np.isfinite(ax)) or np.linalg.norm(ax) == 0:
            raise ConfigError(f"--axis must be 3 numbers, not all zero, got {list(axis)}")
    ax = ax / np.linalg.norm(ax)
    return Perturbation(float(rotation_deg), tuple(float(v) for v in ax),  # type: ignore[arg-type]
                        tuple(float(v) for v in t), float(s))  # type: ignore[arg-type]


def perturb(image: Volume, seg: Volume, pert: Perturbation, mode: Literal["header", "resample"],
            device: torch.device | str = "cpu") -> tuple[Volume, Volume, np.ndarray]:
    """Apply ``pert`` to an image and its segmentation (see the module docstring for ``mode``).

    Returns:
        ``(image', seg', P)`` with ``P`` the ``(4, 4)`` world matrix applied to the content.
    """
    from ..transforms import AffineTransform
    from ..warp import warp_image, warp_labels

    p = pert.matrix(fov_center(image.affine, image.shape))
    if mode == "header":
        aff = p @ image.affine
        return (Volume(image.data, aff, None, image.name, "image"),
                Volume(seg.data, aff, None, seg.name, "labels"), p)
    if mode != "resample":
        raise ConfigError(f"unknown perturbation mode {mode!r}: use header or resample")
    inv = AffineTransform(torch.as_tensor(np.linalg.inv(p), device=device))  # new(x) = old(P^-1 x)
    img = warp_image(image.tensor(device).float(), image.affine, image.shape, image.affine, inv)[0, 0]
    lab = warp_labels(seg.tensor(device)[:, 0], seg.affine, seg.shape, seg.affine, inv)[0]
    return (Volume(img.cpu().numpy(), image.affine, image.header, image.name, "image"),
            Volume(lab.cpu().numpy(), seg.affine, seg.header, seg.name, "labels"), p)
