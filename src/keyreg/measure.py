"""The measure stage: metrics of a registration on the fixed grid.

Image metrics compare min-max normalised intensities: the fixed image by its own range, the warped
moving image by the MOVING image's range (:func:`metric_intensities`; the one place this is decided).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ConfigError
from .io import Volume
from .metrics import MinMaxScaled

__all__ = ["normalize_like", "metric_intensities", "measure_alignment"]


def _minmax(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.asarray(data, dtype=np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-12))


def normalize_like(data: np.ndarray, source: Volume) -> np.ndarray:
    """``data`` (a resampled copy of ``source``) min-max normalised by ``source``'s range."""
    return _minmax(data, float(source.data.min()), float(source.data.max()))


def metric_intensities(fixed: Volume, moving: Volume, warped: np.ndarray | None
                       ) -> tuple[MinMaxScaled, MinMaxScaled | None]:
    """``(fixed, warped)`` normalised for image metrics: fixed by its min-max, warped by the moving
    image's min-max (so a perfect warp of the same contrast compares equal).  Lazily: the metrics
    normalise chunk by chunk (:class:`~keyreg.metrics.MinMaxScaled`), no full-size copy."""
    f = np.asarray(fixed.data)
    lo, hi = np.float32(f.min()), np.float32(f.max())
    fixed_n = MinMaxScaled(f, lo, np.float32(max(hi - lo, np.float32(1e-12))))
    if warped is None:
        return fixed_n, None
    m_lo, m_hi = float(moving.data.min()), float(moving.data.max())
    return fixed_n, MinMaxScaled(np.asarray(warped), np.float32(m_lo), np.float32(max(m_hi - m_lo, 1e-12)))


def _check_inputs(metrics: Sequence[str], has_image: bool, has_seg: bool) -> None:
    from .metrics import METRICS

    for m in metrics:
        need = METRICS[m]
        if need == "seg" and not has_seg:
            raise ConfigError(f"metric {m!r} needs the moving and the fixed segmentation")
        if need == "image" and not has_image:
            raise ConfigError(f"metric {m!r} needs the warped moving image")


def measure_alignment(metrics: Sequence[str], *, fixed: Volume, moving: Volume, transform: Any,
                      warped: Volume | None, warped_seg: Volume | None, fixed_seg: Volume | None,
                      moving_seg: Volume | None, fixed_surfaces: Any = None) -> dict[str, Any]:
    """Every metric of one alignment (``transform`` as used for warping on the fixed grid);
    ``fixed_surfaces``: the fixed segmentation's :class:`~keyreg.metrics.LabelSurfaces`, kept across
    aligns (hausd)."""
    from .metrics import METRICS, compute_metrics

    _check_inputs(metrics, warped is not None, warped_seg is not None and fixed_seg is not None)
    fixed_n = warped_n = None
    if any(METRICS[m] == "image" for m in metrics):  # full-grid normalised copies only when used
        fixed_n, warped_n = metric_intensities(fixed, moving, None if warped is None else warped.data)
    return compute_metrics(
        metrics, warped_image=warped_n, fixed_image=fixed_n,
        warped_seg=None if warped_seg is None else warped_seg.data,
        fixed_seg=None if fixed_seg is None else fixed_seg.data,
        spacing=fixed.spacing, transform=transform, fixed_shape=fixed.shape, fixed_affine=fixed.affine,
        moving_seg=None if moving_seg is None else moving_seg.data, moving_affine=moving.affine,
        fixed_surfaces=fixed_surfaces)
