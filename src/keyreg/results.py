"""What a registration produces: one :class:`AlignmentResult` per transform type, gathered in a
:class:`Registration`.  Built by :class:`keyreg.pipeline.Registrar`; written by :mod:`keyreg.export`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import export
from .errors import ConfigError
from .io import Volume, load_volume, read_grid
from .keypoints import ImageKeypoints
from .transforms import (DEFAULT_FIELD_STRIDE, AffineTransform, AlignSpec, DisplacementField, ThinPlateSpline,
                         map_to_fixed, parse_aligns, sample_field)
from .warp import ImageInterp, LabelInterp, warp_image_and_labels

__all__ = ["AlignmentResult", "Registration", "warp_volume", "warp_volumes", "measure_before", "image_interp",
           "label_interp", "pad_value_for", "INVERSE_WARN_MM"]

#: An inverse mapped point whose residual ``|T(p) - q|`` exceeds this (mm) is reported with a warning.
INVERSE_WARN_MM = 0.01


def image_interp(interp: str | None) -> ImageInterp:
    """Validated image interpolation (default ``linear``)."""
    interp = interp or "linear"
    if interp not in ("linear", "nearest", "cubic"):
        raise ConfigError(f"unknown image interpolation {interp!r}: use linear, nearest or cubic")
    return interp  # type: ignore[return-value]


def label_interp(interp: str | None) -> LabelInterp:
    """Validated label interpolation (default ``nearest``)."""
    interp = interp or "nearest"
    if interp not in ("nearest", "labelwise"):
        raise ConfigError(f"unknown label interpolation {interp!r}: use nearest or labelwise")
    return interp  # type: ignore[return-value]


def pad_value_for(vol: Volume, pad_value: float | None) -> float:
    """The intensity given to fixed-grid points that fall outside the moving image.

    ``None`` (the default): 0, unless the image's background is negative — the median of its border
    voxels (the six faces of the volume) below 0, as for CT in Hounsfield units — then the image's
    minimum (air).  MR images, whose background is 0 or positive noise, keep 0.
    """
    if pad_value is None:
        d = np.asarray(vol.data)
        faces = np.concatenate([d[[0, -1]].ravel(), d[:, [0, -1]].ravel(), d[:, :, [0, -1]].ravel()])
        return float(d.min()) if float(np.median(faces)) < 0 else 0.0
    v = float(pad_value)
    if not np.isfinite(v):
        raise ConfigError(f"the pad value must be a finite number, got {pad_value!r}")
    return v


def _transform_device(transform) -> torch.device:
    if isinstance(transform, AffineTransform):
        return transform.matrix.device
    if isinstance(transform, DisplacementField):
        return transform.displacement.device
    if isinstance(transform, ThinPlateSpline):
        return transform.control_points.device
    return torch.device("cpu")


def warp_volume(vol: Volume, reference: Volume, transform, *, kind: str = "image",
                interp: str | None = None, pad_value: float | None = None,
                device: torch.device | str | None = None) -> Volume:
    """Resample ``vol`` (moving space) onto ``reference``'s grid through ``transform``
    (``moving_from_fixed``): ``out(p) = vol(T(p))``; outside ``vol`` images get
    :func:`pad_value_for`, label maps 0."""
    dev = torch.device(device) if device is not None else _transform_device(transform)
    if kind == "labels":
        return warp_volumes(None, vol, reference, transform, seg_interp=interp, device=dev)[1]
    img, _ = warp_volumes(vol, None, reference, transform, interp=interp, pad_value=pad_value, device=dev)
    return img


def warp_volumes(image: Volume | None, seg: Volume | None, reference: Volume, transform, *,
                 interp: str | None = None, seg_interp: str | None = None, pad_value: float | None = None,
                 device: torch.device | str | None = None) -> tuple[Volume | None, Volume | None]:
    """:func:`warp_volume` of an image and its segmentation (on the image's grid) in one pass: the
    sampling positions of each slab are computed once for both (:func:`keyreg.warp.warp_image_and_labels`);
    the results are those of two :func:`warp_volume` calls.

    Returns:
        ``(warped image or None, warped segmentation or None)`` on ``reference``'s grid.
    """
    dev = torch.device(device) if device is not None else _transform_device(transform)
    src = lab = None
    pad = 0.0
    if image is not None:
        pad = pad_value_for(image, pad_value)
        src = image.tensor(dev).float()
        if pad != 0.0:  # interpolation weights sum to 1: warp(x - pad) + pad pads with ``pad``, else unchanged
            src = src - pad
    if seg is not None:
        if image is not None and seg.shape != image.shape:
            raise ConfigError(f"segmentation {seg.shape} and image {image.shape} must share one grid")
        lab = seg.tensor(dev)[:, 0]
    aff = (image if image is not None else seg).affine
    img_out, seg_out = warp_image_and_labels(src, lab, aff, reference.shape, reference.affine, transform,
                                             mode=image_interp(interp), label_mode=label_interp(seg_interp))
    img_vol = seg_vol = None
    if img_out is not None:
        out = img_out[0, 0]
        if pad != 0.0:
            out = out + pad
        img_vol = reference.with_data(out.cpu().numpy(), name=image.name, kind="image")
    if seg_out is not None:
        seg_vol = reference.with_data(seg_out[0].cpu().numpy(), name=seg.name, kind="labels")
    return img_vol, seg_vol


def measure_before(metrics: Sequence[str], *, fixed: Volume, moving: Volume, fixed_seg: Volume | None,
                   moving_seg: Volume | None, label_interp: str | None, device: torch.device,
                   pad_value: float | None = None, fixed_surfaces: Any = None) -> dict[str, Any]:
    """Metrics of the unregistered pair (the ``none`` row of the tables): the moving segmentation,
    and the moving image when an image metric asks for it, resampled onto the fixed grid through the
    identity (world space), normalised and padded as for a registration."""
    from .measure import measure_alignment
    from .metrics import METRICS
    from .transforms import AffineTransform

    ident = AffineTransform(torch.eye(4, dtype=torch.float64, device=device))
    image = moving if any(METRICS[m] == "image" for m in metrics) else None
    warped = warped_seg = None
    if image is not None or moving_seg is not None:
        warped, warped_seg = warp_volumes(image, moving_seg, fixed, ident, seg_interp=label_interp,
                                          pad_value=pad_value, device=device)
    return measure_alignment(metrics, fixed=fixed, moving=moving, transform=ident, warped=warped,
                             warped_seg=warped_seg, fixed_seg=fixed_seg, moving_seg=moving_seg,
                             fixed_surfaces=fixed_surfaces)


@dataclass
class AlignmentResult:
    """One transform type of one registration.

    Attributes:
        spec: the transform type (``rigid``, ``affine``, ``tps_<lambda>``).
        transform: ``moving_from_fixed`` (batch 1), world RAS mm.
        fixed, moving: the two images (original grids).
        fixed_keypoints, moving_keypoints: ``(K, 3)`` world RAS mm, the keypoints the fit used.
        weights: ``(K,)`` keypoint weights used by the fit, or ``None``.
        field_stride: sub-grid stride of the dense TPS field.
        warped: the moving image resampled onto the fixed grid (if computed).
        warped_seg: the moving segmentation resampled onto the fixed grid (if given).
        metrics: metric name -> value (filled by the measure stage).
        keypoint_names: ``K`` names of the keypoints (labels of the keypoint files).
        pad_value: intensity outside the moving image (``None``: see :func:`pad_value_for`).
    """

    spec: AlignSpec
    transform: AffineTransform | ThinPlateSpline
    fixed: Volume
    moving: Volume
    fixed_keypoints: np.ndarray
    moving_keypoints: np.ndarray
    weights: np.ndarray | None = None
    field_stride: int = DEFAULT_FIELD_STRIDE
    warped: Volume | None = None
    warped_seg: Volume | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    keypoint_names: list[str] | None = None
    pad_value: float | None = None
    _dense: Any = field(default=None, repr=False)
    _aligned: Any = field(default=None, repr=False)
    _residuals: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def keypoint_residuals(self) -> dict[str, np.ndarray]:
        """``{"residual": (K, 3), "loo": (K, 3)}`` mm: each keypoint's residual ``y - T(x)`` and its
        leave-one-out prediction error (:mod:`keyreg.transforms.residuals`; computed once)."""
        if self._residuals is None:
            from .qc import alignment_residuals

            self._residuals = alignment_residuals(self.spec, self.transform, self.fixed_keypoints,
                                                  self.moving_keypoints, self.weights)
        return self._residuals

    @property
    def matrix(self) -> np.ndarray | None:
        """``(4, 4)`` world RAS matrix fixed -> moving (rigid/affine only; ``None`` for TPS)."""
        if isinstance(self.transform, AffineTransform):
            return self.transform.matrix[0].detach().cpu().double().numpy()
        return None

    def dense_transform(self) -> AffineTransform | DisplacementField:
        """The transform as used for warping on the fixed grid (a TPS becomes a displacement field on
        the fixed grid, evaluated every ``field_stride`` voxels and trilinear in between; computed
        once and cached)."""
        if isinstance(self.transform, AffineTransform):
            return self.transform
        if self._dense is None:
            dev = self.transform.control_points.device
            self._dense = sample_field(self.transform, self.fixed.shape, self.fixed.affine,
                                       stride=self.field_stride, device=dev, full_grid=True)
        return self._dense

    def release_dense(self) -> None:
        """Forget the cached dense field (it is recomputed, identically, on the next use)."""
        self._dense = None

    def displacement(self) -> np.ndarray:
        """``(I, J, K, 3)`` displacement ``u = T(p) - p`` (RAS mm) on the full fixed grid."""
        dense = self.dense_transform()
        if isinstance(dense, AffineTransform):
            dense = sample_field(dense, self.fixed.shape, self.fixed.affine, stride=1, device=dense.matrix.device)
        if dense.shape != tuple(self.fixed.shape):
            dense = dense.upsample(self.fixed.shape, self.fixed.affine)
        return dense.displacement[0].permute(1, 2, 3, 0).cpu().numpy()

    @property
    def aligned_keypoints(self) -> np.ndarray:
        """Moving keypoints mapped into the fixed space, ``T^-1(moving)``: ``(K, 3)`` world mm."""
        return self._aligned_pair()[0]

    @property
    def aligned_residual_mm(self) -> float:
        """Largest ``|T(aligned) - moving|`` (mm): the accuracy of the inverse (0 up to rounding for
        rigid/affine; Newton iterations for TPS)."""
        return float(self._aligned_pair()[1].max(initial=0.0))

    def _aligned_pair(self) -> tuple[np.ndarray, np.ndarray]:
        if self._aligned is None:
            pts = torch.as_tensor(np.asarray(self.moving_keypoints), dtype=torch.float64).unsqueeze(0)
            p, res = map_to_fixed(self.transform.to("cpu"), pts)
            self._aligned = (p[0].numpy(), res[0].numpy())
            if res.numel() and float(res.max()) > INVERSE_WARN_MM:
                warnings.warn(f"{self.name}: the inverse of the transform at the moving keypoints has a residual "
                              f"of {float(res.max()):.3g} mm", stacklevel=3)
        return self._aligned

    def apply(
        self,
        x: Any,
        *,
        kind: Literal["image", "labels", "points"] | None = None,
        interp: str | None = None,
        reference: Any = None,
        points_space: Literal["moving", "fixed"] = "moving",
    ) -> Volume | np.ndarray:
        """Apply this transform to another image, label map or points.

        Args:
            x: an image or label map in the MOVING image's world space (any grid; path, nibabel
                image, Volume, ``(array, affine)``), or ``(N, 3)`` world RAS points.
            kind: ``"image"``, ``"labels"`` or ``"points"`` (default: points for ``(N, 3)``
                arrays, else image).
            interp: ``linear`` / ``nearest`` / ``cubic`` for images; ``nearest`` / ``labelwise``
                for labels.
            reference: output grid (default: the fixed image's grid).
            points_space: ``"moving"``: map moving-space points into the fixed space
                (``T^-1``, like the images; a residual above 0.01 mm is warned about);
                ``"fixed"``: map fixed-space points into the moving space (``T``).

        Returns:
            A :class:`Volume` on the reference grid, or ``(N, 3)`` points.
        """
        if kind not in (None, "image", "labels", "points"):
            raise ConfigError(f"kind must be image, labels or points, got {kind!r}")
        if points_space not in ("moving", "fixed"):
            raise ConfigError(f"points_space must be moving or fixed, got {points_space!r}")
        if kind is None:
            if torch.is_tensor(x):
                x = x.detach().cpu().numpy()
            arr = np.asarray(x) if isinstance(x, (np.ndarray, list)) else None
            kind = "points" if arr is not None and arr.ndim == 2 and arr.shape[1] == 3 else "image"
        if kind == "points":
            from .formats._common import as_points

            pts = torch.from_numpy(as_points(x)).reshape(1, -1, 3)
            t = self.transform.to("cpu")
            if points_space == "fixed":
                return t.map_points(pts)[0].numpy()
            p, res = map_to_fixed(t, pts)
            if res.numel() and float(res.max()) > INVERSE_WARN_MM:
                warnings.warn(f"{self.name}: inverse residual up to {float(res.max()):.3g} mm", stacklevel=2)
            return p[0].numpy()
        vol = load_volume(x, kind="labels" if kind == "labels" else "image")
        ref = self.fixed if reference is None else read_grid(reference)
        return warp_volume(vol, ref, self._transform_for(ref), kind=vol.kind, interp=interp, pad_value=self.pad_value)

    def _transform_for(self, ref: Volume):
        if ref is self.fixed or (ref.shape == self.fixed.shape and np.allclose(ref.affine, self.fixed.affine)):
            return self.dense_transform()
        if isinstance(self.transform, AffineTransform):
            return self.transform
        return sample_field(self.transform, ref.shape, ref.affine, stride=self.field_stride,
                            device=self.transform.control_points.device, full_grid=True)

    def save(self, directory: str | Path, *, write_images: bool = True, visualize: bool = False) -> dict[str, Path]:
        """Write this alignment's outputs (layout in the README); returns name -> path."""
        return export.save_alignment(self, Path(directory), write_images=write_images, visualize=visualize)


@dataclass
class Registration:
    """The result of a registration: keypoints of both images and one result per transform type
    (keypoint aligns first, then refined aligns ``<align>+<stage>`` when the pipeline refined them).

    ``alignment_check`` holds the already-aligned check's outcome (``already_aligned``: the identity
    was kept; ``affine_motion_mm``: RMS motion of the affine fit over the keypoints); empty when the
    check is off."""

    fixed: Volume
    moving: Volume
    fixed_keypoints: ImageKeypoints
    moving_keypoints: ImageKeypoints
    results: dict[str, AlignmentResult]
    fixed_seg: Volume | None = None
    moving_seg: Volume | None = None
    weights: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    excluded_keypoints: list[str] = field(default_factory=list)
    fit_keypoints: tuple[np.ndarray, np.ndarray] | None = None
    alignment_check: dict[str, Any] = field(default_factory=dict)
    fixed_mask: Volume | None = None
    _confidence: Any = field(default=None, repr=False)
    _fixed_surfaces: Any = field(default=None, repr=False)

    @property
    def confidence(self) -> dict[str, Any]:
        """The pair's confidence from its keypoints (:mod:`keyreg.transforms.residuals`):
        ``confidence``, ``median_loo_mm``, ``inlier_fraction`` and ``flag`` (``check`` / ``ok``); for
        an anatomical model also how its keypoints were detected (:func:`keyreg.qc.detection_facts`),
        ``check`` when they give cause (:func:`keyreg.qc.detection_concerns`)."""
        if self._confidence is None:
            from .qc import detection_concerns, detection_facts, pair_confidence_of

            kf, km = self.fit_keypoints or (self.fixed_keypoints.numpy(), self.moving_keypoints.numpy())
            conf = pair_confidence_of(kf, km, self.weights)
            facts = detection_facts(self.fixed_keypoints, self.moving_keypoints)
            reasons = [r for r in (conf["flag_reason"], *detection_concerns(facts)) if r]
            conf["flag"], conf["flag_reason"] = ("check" if reasons else "ok"), "; ".join(reasons)
            self._confidence = {**conf, **facts}
        return self._confidence

    def __getitem__(self, align: str) -> AlignmentResult:
        """The result of a keypoint align (``"affine"``, ``"tps_1"``) or of a refined one
        (``"affine+deformable"``, a :class:`keyreg.refine.RefinedAlignment`)."""
        if align in self.results:
            return self.results[align]
        base, plus, stage = align.partition("+")
        key = parse_aligns([base])[0].name + plus + stage
        if key not in self.results:
            raise ConfigError(f"align {align!r} was not computed; available: {', '.join(self.results)}")
        return self.results[key]

    def __iter__(self) -> Iterator[AlignmentResult]:
        return iter(self.results.values())

    def evaluate(self, metrics: Sequence[str], aligns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Compute metrics for every alignment, or those named in ``aligns`` (stored in each result's
        ``metrics``)."""
        from .measure import measure_alignment

        names = self._metric_names(metrics)
        if isinstance(aligns, str):
            aligns = [aligns]
        wanted = None if aligns is None else {self[a].name for a in aligns}  # ConfigError for an unknown one
        out = {}
        for res in self:
            if wanted is not None and res.name not in wanted:
                continue
            res.metrics = measure_alignment(
                names, fixed=self.fixed, moving=self.moving, transform=res.dense_transform(), warped=res.warped,
                warped_seg=res.warped_seg, fixed_seg=self.fixed_seg, moving_seg=self.moving_seg,
                fixed_surfaces=self._fixed_surfaces)
            if hasattr(res, "refine_metrics"):  # a refined align: whether the safeguard kept its start, time
                res.metrics.update(res.refine_metrics())
            out[res.name] = res.metrics
        return out

    def evaluate_before(self, metrics: Sequence[str], *, label_interp: str | None = None,
                        pad_value: float | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
        """The same metrics for the pair before registration: the moving segmentation (and image, for
        image metrics) resampled onto the fixed grid through the identity (world space); the ``none``
        row of the metric tables (:func:`measure_before`)."""
        return measure_before(self._metric_names(metrics), fixed=self.fixed, moving=self.moving,
                              fixed_seg=self.fixed_seg, moving_seg=self.moving_seg, label_interp=label_interp,
                              device=torch.device(device or "cpu"), pad_value=pad_value,
                              fixed_surfaces=self._fixed_surfaces)

    def _metric_names(self, metrics: Sequence[str]) -> list[str]:
        """Parsed metric names; the fixed map's label surfaces found once for every align (hausd)."""
        from .metrics import parse_metrics

        names = parse_metrics(list(metrics))
        if "hausd" in names and self.fixed_seg is not None and self._fixed_surfaces is None:
            from .metrics import LabelSurfaces

            self._fixed_surfaces = LabelSurfaces(self.fixed_seg.data, self.fixed.spacing)
        return names

    def release_measure_cache(self) -> None:
        """Drop what :meth:`evaluate` keeps across aligns (the fixed map's label surfaces, ~0.2 GB at
        1 mm), e.g. once the last align is measured while the outputs are still being written."""
        self._fixed_surfaces = None

    def save(self, directory: str | Path, *, write_images: bool = True,
             visualize: bool = False) -> dict[str, Path]:
        """Write keypoints and every alignment's outputs under ``directory``."""
        return export.save_registration(self, Path(directory), write_images=write_images, visualize=visualize)
