"""The Python API: :func:`register` and the names a user needs, over :mod:`keyreg.pipeline`.

Example:
    >>> import keyreg                                                     # doctest: +SKIP
    >>> reg = keyreg.register("moving.nii.gz", "fixed.nii.gz", aligns=("affine", "tps_0"))
    >>> reg["affine"].matrix          # 4x4 world RAS, fixed -> moving
    >>> reg["tps_0"].warped           # keyreg.io.Volume on the fixed grid
    >>> reg["affine"].apply("moving_labels.nii.gz", kind="labels")
    >>> reg.save("out/")

For many pairs, keep one :class:`~keyreg.pipeline.Registrar` (model loaded once, keypoints cached
per image) or use :func:`keyreg.batch.run_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .keypoints import ImageKeypoints, detect_keypoints
from .pipeline import Registrar, RegistrationOptions, Timer, fit_alignments, resolve_device, resolve_model
from .results import AlignmentResult, Registration, warp_volume
from .transforms import DEFAULT_FIELD_STRIDE

__all__ = [
    "ImageKeypoints",
    "AlignmentResult",
    "Registration",
    "Registrar",
    "RegistrationOptions",
    "register",
    "detect_keypoints",
    "fit_alignments",
    "resolve_device",
    "resolve_model",
    "warp_volume",
    "Timer",
]


def register(
    moving: Any,
    fixed: Any,
    *,
    model: str | Path | Any = None,
    aligns: Sequence[str] = ("affine", "tps_0"),
    moving_seg: Any = None,
    fixed_seg: Any = None,
    weighted: bool | None = None,
    device: str | torch.device | None = None,
    use_amp: bool = False,
    half_resolution: bool = False,
    label_interp: str = "nearest",
    field_stride: int = DEFAULT_FIELD_STRIDE,
    pad_value: float | None = None,
    exclude_keypoints: Sequence[str] | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed`` with every transform type in ``aligns``, from one keypoint
    detection per image; the moving image (and segmentation) are resampled onto the fixed grid.

    Args:
        moving, fixed: images (path, nibabel image, :class:`~keyreg.io.Volume`, or ``(array, affine)``).
        model: bundled model name, model file, a loaded :class:`~keyreg.models.KeypointDetector`
            (not modified), or ``None`` for the default bundled model.
        aligns: any of ``rigid``, ``affine``, ``tps_<lambda>``.
        moving_seg, fixed_seg: optional label maps on their images' grids.
        weighted: use ``power`` keypoint weights (default: the model's setting).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``None`` for the best available.
        use_amp: bf16 autocast for the network on GPU.
        half_resolution: run the network at half the model's resolution.
        label_interp: ``nearest`` or ``labelwise`` for segmentations.
        field_stride: sub-grid stride of the dense TPS field (1 = exact at every voxel).
        pad_value: intensity outside the moving image (default: 0, or the image's minimum when negative).
        exclude_keypoints: fnmatch patterns of keypoint names left out of every fit (``None``: the
            model's default, ``fit_exclude``; ``()``: none).

    Returns:
        A :class:`Registration`; ``reg[align]`` is an :class:`AlignmentResult`.
    """
    registrar = Registrar(model, device=device, aligns=tuple(aligns), weighted=weighted, use_amp=use_amp,
                          half_resolution=half_resolution, label_interp=label_interp, field_stride=field_stride,
                          pad_value=pad_value,
                          exclude_keypoints=None if exclude_keypoints is None else tuple(exclude_keypoints))
    return registrar.register(moving, fixed, moving_seg=moving_seg, fixed_seg=fixed_seg)
