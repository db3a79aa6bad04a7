"""The keypoint stage: one network pass per image gives ``K`` world keypoints, with their names.

:func:`detect_keypoints` is the one seam between the pipeline (:mod:`keyreg.pipeline`) and the
network (:mod:`keyreg.models`): ``detect_keypoints(model, volumes, device=...) -> list[ImageKeypoints]``.
Everything downstream (fits, outputs) only sees :class:`ImageKeypoints`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import ConfigError, DegenerateFitError, ImageContentError
from .geometry import apply_affine, fov_center, fov_half_extent, normalized_to_voxel
from .io import Volume
from .preprocess import to_network_input

__all__ = ["ImageKeypoints", "detect_keypoints", "default_keypoint_names", "model_keypoint_names",
           "select_keypoints", "tps_frame"]


def default_keypoint_names(k: int) -> list[str]:
    """``K-1 .. K-k``: the labels of an unnamed model's keypoints (as written to keypoints_*.csv)."""
    return [f"K-{i + 1}" for i in range(k)]


def model_keypoint_names(model) -> list[str]:
    """The model's keypoint names (``ModelConfig.keypoint_names``), else ``K-1 .. K-N``."""
    k = int(model.config.architecture.num_keypoints)
    names = getattr(model.config, "keypoint_names", None)
    if names is None or len(names) != k:
        return default_keypoint_names(k)
    return [str(n) for n in names]


@dataclass
class ImageKeypoints:
    """Keypoints of one image.

    Attributes:
        points: ``(K, 3)`` float64 world RAS mm.
        mass: ``(K,)`` total heatmap activation (for ``power`` weights).
        world_from_net: ``(4, 4)`` the network grid's affine.
        grid_shape: the network grid shape.
        names: ``K`` keypoint names (the model's ``keypoint_names``, else ``K-1 .. K-N``).
        passes: network passes it took (the orientation search looks at an image several times).
        searched: the orientation search ran (the image as it is failed its checks; anatomical models).
        template_residual_mm: median distance (mm) of the keypoints to the model's template after a
            similarity fit (anatomical models; ``None`` otherwise): a layout read from a whole head
            fits it within a few mm.
        drift_mm: median distance (mm) the keypoints moved under the check pass (the chosen grid
            turned by 40°; anatomical models with the orientation search on, ``None`` with one pass): a
            reading that follows the anatomy stays within a few mm.
    """

    points: torch.Tensor
    mass: torch.Tensor
    world_from_net: np.ndarray
    grid_shape: tuple[int, int, int]
    names: list[str] = field(default_factory=list)
    passes: int = 1
    searched: bool = False
    template_residual_mm: float | None = None
    drift_mm: float | None = None

    def __post_init__(self) -> None:
        if not self.names:
            self.names = default_keypoint_names(int(self.points.shape[0]))

    def numpy(self) -> np.ndarray:
        return self.points.detach().cpu().numpy()

    def subset(self, keep: Sequence[int]) -> "ImageKeypoints":
        """The keypoints at indices ``keep`` (same grid)."""
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.points.device)
        return replace(self, points=self.points[idx], mass=self.mass[idx.to(self.mass.device)],
                       names=[self.names[i] for i in keep])


SEARCH_MODES = ("always", "auto", "off")


def check_search_mode(mode: str | None) -> str | None:
    """An orientation-search override (``always``, ``auto``, ``off`` or ``None`` for the model's
    setting); :class:`ConfigError` otherwise."""
    if mode is not None and mode not in SEARCH_MODES:
        raise ConfigError(f"unknown orientation search {mode!r}: use {', '.join(SEARCH_MODES)}")
    return mode


def detect_keypoints(
    model,
    volumes: Sequence[Volume],
    *,
    device: torch.device | str | None = None,
    use_amp: bool = False,
    batch_size: int = 1,
    search: str | None = None,
) -> list[ImageKeypoints]:
    """Keypoints in world mm: one network pass per image (batched ``batch_size`` at a time), or, for
    anatomical models, the test-time orientation search (:mod:`keyreg.models.inference`), the
    images in lockstep (their passes batched).  An image's keypoints do not depend on the images it
    is processed with (:meth:`~keyreg.models.detector.KeypointDetector.infer`), so for a given number
    of CPU threads a pair's result does not depend on batch order, resumption or sharding.

    ``search`` overrides an anatomical model's orientation search (``ModelConfig.orientation_search``):
    ``"always"``, ``"auto"`` or ``"off"`` (one pass on the image's own grid, no canonicalisation);
    ``None`` follows the model.  Models without regions always run one pass.

    Raises:
        ImageContentError: the network gives non-finite keypoints for an image (e.g. intensities so
            large that they overflow, or a model with NaN weights).
    """
    device = torch.device(device) if device is not None else model.device
    pre = model.config.preprocessing
    names = model_keypoint_names(model)
    out: list[ImageKeypoints] = []
    mode = model.config.orientation_search if search is None else check_search_mode(search)
    regions = getattr(model.config, "regions", None)
    if regions is not None:
        from .models.inference import detect_images_keypoints, template_residuals
    if regions is not None and mode not in (False, "off"):

        # anatomical models: test-time orientation search, the images in lockstep
        for v, det in zip(volumes, detect_images_keypoints(model, volumes, device=device, use_amp=use_amp,
                                                           search=mode)):
            if not bool(torch.isfinite(det.points).all()) or not bool(torch.isfinite(det.mass).all()):
                raise ImageContentError(
                    f"{v.name}: the model gives non-finite keypoints for this image (intensities "
                    f"out of range, or a model with invalid weights)")
            residual = None if det.template_residual_mm is None else float(np.median(det.template_residual_mm))
            out.append(ImageKeypoints(det.points.to(device), det.mass.to(device), det.world_from_net,
                                      pre.grid.shape, list(names), det.passes, det.searched, residual,
                                      det.drift_mm))
        return out
    for start in range(0, len(volumes), batch_size):
        chunk = volumes[start : start + batch_size]
        inputs, affines = zip(*(to_network_input(v, pre, device) for v in chunk))
        u, mass = model.infer(torch.cat(inputs, dim=0), use_amp=use_amp)
        for b, aff in enumerate(affines):
            idx = normalized_to_voxel(u[b].double(), pre.grid.shape)
            world = apply_affine(torch.as_tensor(aff, device=idx.device), idx)
            if not bool(torch.isfinite(world).all()) or not bool(torch.isfinite(mass[b]).all()):
                raise ImageContentError(
                    f"{chunk[b].name}: the model gives non-finite keypoints for this image (intensities "
                    f"out of range, or a model with invalid weights)")
            residual = None  # one pass: an anatomical model's keypoints are still compared with its template
            if regions is not None:
                residual = float(np.median(template_residuals(regions.template, world.cpu().numpy())))
            out.append(ImageKeypoints(world, mass[b].float(), aff, pre.grid.shape, list(names),
                                      template_residual_mm=residual))
    return out


def select_keypoints(names: Sequence[str], exclude: Sequence[str]) -> list[int]:
    """Indices of the keypoints whose name matches none of the ``exclude`` globs (fnmatch)."""
    return [i for i, n in enumerate(names) if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def check_enough(kept: int, total: int, needed: int, what: str, exclude: Sequence[str]) -> None:
    if kept < needed:
        raise DegenerateFitError(
            f"excluding keypoints {' '.join(exclude)} leaves {kept} of {total} keypoints; "
            f"{what} needs at least {needed}")


def tps_frame(world_from_net: np.ndarray, grid_shape: Sequence[int]) -> tuple[np.ndarray, float]:
    """``(centre, scale)`` of the TPS normalisation: the centre of a grid's field of view and half
    its longest physical side (mm).  The one place this choice is made: pairwise fits use the fixed
    image's network grid, groupwise the first image's."""
    return fov_center(world_from_net, grid_shape), float(fov_half_extent(world_from_net, grid_shape))


def validate_patterns(patterns: Sequence[str] | None) -> tuple[str, ...]:
    pats = tuple(patterns or ())
    for p in pats:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"keypoint exclusion patterns must be non-empty strings, got {p!r}")
    return pats
