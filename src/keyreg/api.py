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
    refine: Sequence[str] | str = (),
    fixed_mask: Any = None,
    refine_similarity: str = "mind",
    refine_iterations: Sequence[int] | None = None,
    refine_reg_weight: float | None = None,
    refine_seconds: float | None = None,
    orientation_search: str | None = None,
    progress: bool = False,
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
        refine: dense refinement stages, ``"affine"`` and/or ``"deformable"`` (:mod:`keyreg.refine`):
            every align is refined, giving ``reg["<align>+<stage>"]`` (a
            :class:`~keyreg.refine.RefinedAlignment`).
        fixed_mask: mask on the fixed grid limiting the refinement's similarity (needs ``refine``).
        refine_similarity: ``"mind"`` (multi-modal, default) or ``"lncc"`` (same contrast).
        refine_iterations: deformable iterations per level, coarse to fine (at most; default ``(40, 20, 8)``, levels after the first stop once converged).
        refine_reg_weight: smoothness weight of the velocity field (default 1.0).
        refine_seconds: wall-clock budget of each refinement (default: none).
        orientation_search: an anatomical model's orientation search, ``"always"`` (robust to any
            orientation), ``"auto"`` (the image as it is first; the search only when that reading fails
            its checks) or ``"off"``; ``None``: the model's setting.
        progress: progress bars of the refinement on stderr.

    Returns:
        A :class:`Registration`; ``reg[align]`` is an :class:`AlignmentResult` (a refined align a
        :class:`~keyreg.refine.RefinedAlignment`, measured and saved the same way).
    """
    extra = {k: v for k, v in (("refine_iterations", refine_iterations), ("refine_reg_weight", refine_reg_weight))
             if v is not None}
    registrar = Registrar(model, device=device, aligns=tuple(aligns), weighted=weighted, use_amp=use_amp,
                          half_resolution=half_resolution, label_interp=label_interp, field_stride=field_stride,
                          pad_value=pad_value,
                          exclude_keypoints=None if exclude_keypoints is None else tuple(exclude_keypoints),
                          refine=(refine,) if isinstance(refine, str) else tuple(refine),
                          refine_similarity=refine_similarity, refine_seconds=refine_seconds,
                          orientation_search=orientation_search, progress=progress, **extra)
    return registrar.register(moving, fixed, moving_seg=moving_seg, fixed_seg=fixed_seg, fixed_mask=fixed_mask)
