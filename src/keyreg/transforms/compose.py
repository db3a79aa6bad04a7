"""Composition of transforms: ``T = T1 o T2 o ... o Tn`` (each ``moving_from_fixed``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .linear import AffineTransform

__all__ = ["ComposedTransform", "compose_transforms"]


@dataclass
class ComposedTransform:
    """``T = parts[0] o parts[1] o ... o parts[-1]`` (``moving_from_fixed``): a point of the
    reference space goes through ``parts[-1]`` first and ``parts[0]`` last."""

    parts: list[Any]

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Reference world points ``(1, M, 3)`` -> moving world points ``(1, M, 3)``."""
        for t in reversed(self.parts):
            points = t.map_points(points)
        return points

    def to(self, device: torch.device | str) -> "ComposedTransform":
        return ComposedTransform([t.to(device) for t in self.parts])


def compose_transforms(parts: Sequence[Any]) -> Any:
    """One map from ``[T1, ..., Tn]`` (transform objects): ``T1 o ... o Tn``.

    Consecutive linear transforms are multiplied (float64) so a chain of matrices stays one exact
    matrix; a single transform is returned as is.
    """
    merged: list[Any] = []
    for t in parts:
        if merged and isinstance(t, AffineTransform) and isinstance(merged[-1], AffineTransform):
            merged[-1] = AffineTransform(merged[-1].matrix.double() @ t.matrix.double())
        else:
            merged.append(t)
    if not merged:
        raise ValueError("no transform to compose")
    return merged[0] if len(merged) == 1 else ComposedTransform(merged)
