"""Names of transform types (``rigid``, ``affine``, ``tps_<lambda>``) and fitting by name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .linear import AffineTransform, fit_affine, fit_rigid
from .tps import ThinPlateSpline, fit_tps

__all__ = ["AlignSpec", "parse_align", "parse_aligns", "fit_transform"]

_TPS = re.compile(r"^tps_(?P<lam>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class AlignSpec:
    """A transform type: ``kind`` and, for TPS, the smoothness ``lmbda``."""

    kind: Literal["rigid", "affine", "tps"]
    lmbda: float = 0.0

    @property
    def name(self) -> str:
        return f"tps_{self.lmbda:g}" if self.kind == "tps" else self.kind

    @property
    def is_linear(self) -> bool:
        return self.kind != "tps"

    def __str__(self) -> str:
        return self.name


def parse_align(name: str) -> AlignSpec:
    """Parse ``"rigid"``, ``"affine"`` or ``"tps_<lambda>"`` (e.g. ``tps_0``, ``tps_0.5``, ``tps_1e-2``).

    Raises:
        ConfigError: for any other name.
    """
    text = str(name).strip().lower()
    if text in ("rigid", "affine"):
        return AlignSpec(text)  # type: ignore[arg-type]
    m = _TPS.match(text)
    if m:
        lam = float(m.group("lam"))
        if math.isfinite(lam):
            return AlignSpec("tps", lam)
    raise ConfigError(f"unknown align {name!r}: use rigid, affine or tps_<lambda> (e.g. tps_0, tps_10)")


def parse_aligns(names: list[str] | tuple[str, ...] | str) -> list[AlignSpec]:
    """Parse several names, dropping duplicates but keeping order."""
    if isinstance(names, str):
        names = [names]
    out: list[AlignSpec] = []
    for n in names:
        spec = parse_align(n)
        if spec not in out:
            out.append(spec)
    if not out:
        raise ConfigError("no align given")
    return out


def fit_transform(
    spec: AlignSpec,
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
) -> AffineTransform | ThinPlateSpline:
    """Fit the transform ``spec`` (``moving_from_fixed``) to ``(B, N, 3)`` world keypoints."""
    if spec.kind == "rigid":
        return AffineTransform(fit_rigid(points_fixed, points_moving, weights))
    if spec.kind == "affine":
        return AffineTransform(fit_affine(points_fixed, points_moving, weights))
    return fit_tps(points_fixed, points_moving, spec.lmbda, weights, center=center, scale=scale)
