"""Applying saved transforms: images and label maps are pulled onto a reference grid in one
resampling, points are mapped through the inverse (see :mod:`keyreg.apply`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError
from ..formats._common import as_points
from ..io import Volume, load_volume
from ..transforms import AffineTransform, map_to_fixed
from .inverse import inverse_matrix
from .saved import as_saved, compose, resolve_reference

__all__ = ["apply_transform", "transform_points"]


def apply_transform(
    source: Any,
    transforms: Sequence[Any],
    *,
    kind: Literal["image", "labels"] = "image",
    interp: str | None = None,
    reference: Any = None,
    device: torch.device | str | None = None,
    pad_value: float | None = None,
) -> Volume:
    """Resample an image or label map of the moving space onto a reference grid, in one pass.

    Args:
        source: the image or label map, in the MOVING space of ``transforms[0]`` (path, nibabel
            image, :class:`Volume`, ``(array, affine)``); any grid.
        transforms: ``[T1, ..., Tn]`` (:class:`SavedTransform`, paths or transform objects, each
            ``moving_from_fixed``), composed as ``T1 o ... o Tn`` (see the module docstring).
        kind: ``"image"`` or ``"labels"`` (integer ids, never blended; any size of id is exact).
        interp: images ``linear`` (default) / ``cubic`` / ``nearest``; labels ``nearest``
            (default) / ``labelwise``.
        reference: output grid (NIfTI path or :class:`Volume`); default: the fixed grid recorded
            with ``transforms[-1]``.
        device: where to resample (default CPU).
        pad_value: image intensity outside the source (default: 0, or the source's minimum when
            it is negative, e.g. CT air); label maps get 0.

    Returns:
        A :class:`Volume` ``(I, J, K)`` on the reference grid (float32 image or int64 labels),
        carrying the reference's header: ``out(p) = source(T(p))``, 0 outside the source.
    """
    from ..pipeline import resolve_device
    from ..results import image_interp, label_interp, warp_volume

    mode = label_interp(interp) if kind == "labels" else image_interp(interp)
    dev = resolve_device(device or "cpu")
    saved = [as_saved(t) for t in transforms]
    if not saved:
        raise ConfigError("no transform given")
    ref = resolve_reference(reference, saved)
    vol = load_volume(source, kind=kind)
    t = compose(saved).to(dev)
    return warp_volume(vol, ref, t, kind=kind, interp=mode, pad_value=pad_value, device=dev)


def transform_points(
    points: Any,
    transforms: Sequence[Any],
    *,
    direction: Literal["moving_to_fixed", "fixed_to_moving"] = "moving_to_fixed",
    iterations: int = 50,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Map world points through the composition ``T = T1 o ... o Tn`` (``moving_from_fixed``).

    Args:
        points: ``(N, 3)`` world RAS mm.
        transforms: as in :func:`apply_transform`.
        direction: ``"moving_to_fixed"`` (default): points of the moving space go to the fixed space
            through ``T^-1`` — the *inverse* of the direction images are pulled in, so a landmark
            follows its anatomy into the warped image.  ``"fixed_to_moving"``: ``T`` itself.
        iterations, tolerance: Newton iterations and stopping residual (mm) of the numerical
            inverse (nonlinear transforms only; linear ones are inverted exactly).

    Returns:
        ``(mapped, residual)``: ``(N, 3)`` float64 world RAS mm and ``(N,)`` mm; the residual is
        ``|T(mapped) - points|`` for ``moving_to_fixed`` (the accuracy of the inverse; rounding
        only for linear transforms) and zeros for ``fixed_to_moving``.
    """
    pts = torch.from_numpy(as_points(points)).unsqueeze(0)
    t = compose(transforms)
    if direction == "fixed_to_moving":
        return t.map_points(pts)[0].double().numpy(), np.zeros(len(pts[0]))
    if direction != "moving_to_fixed":
        raise ConfigError(f"direction must be moving_to_fixed or fixed_to_moving, got {direction!r}")
    if len(pts[0]) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    if isinstance(t, AffineTransform):
        inverse_matrix(t.matrix, "the composed transform")  # singular: one line naming the transform
    p, residual = map_to_fixed(t, pts, iterations=iterations, tolerance=tolerance)
    return p[0].double().numpy(), residual[0].numpy()
