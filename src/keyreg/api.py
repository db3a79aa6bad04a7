"""The Python API: detect keypoints, fit transforms, warp, measure, save.

Example:
    >>> import keyreg                                                     # doctest: +SKIP
    >>> reg = keyreg.register("moving.nii.gz", "fixed.nii.gz", aligns=("affine", "tps_0"))
    >>> reg["affine"].matrix          # 4x4 world RAS, fixed -> moving
    >>> reg["tps_0"].warped           # keyreg.io.Volume on the fixed grid
    >>> reg["affine"].apply("moving_labels.nii.gz", kind="labels")
    >>> reg.save("out/")
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import ConfigError, ImageContentError
from .geometry import apply_affine, fov_center, fov_half_extent, normalized_to_voxel
from .io import Volume, load_volume, save_volume
from .models import KeypointDetector, load_model, power_weights
from .preprocess import PreprocessConfig, normalize_intensity, to_network_input
from .transforms import (DEFAULT_FIELD_STRIDE, AffineTransform, AlignSpec, DisplacementField,
                         ThinPlateSpline, fit_transform, invert_points, parse_aligns, sample_field)
from .warp import ImageInterp, LabelInterp, warp_image, warp_labels

__all__ = [
    "ImageKeypoints",
    "AlignmentResult",
    "Registration",
    "register",
    "detect_keypoints",
    "fit_alignments",
    "resolve_device",
    "resolve_model",
    "Timer",
]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return dev


def resolve_model(model: str | Path | KeypointDetector | None, device: torch.device, *,
                  half_resolution: bool = False, backbone: str | None = None,
                  num_keypoints: int | None = None) -> KeypointDetector:
    """A ready model on ``device``: a loaded one, a path, a bundled name, or ``None`` (the default)."""
    if not isinstance(model, KeypointDetector):
        model = load_model(model, backbone=backbone, num_keypoints=num_keypoints, device=device)
    else:
        model = model.to(device).eval()
    if half_resolution:
        pre = model.config.preprocessing
        model.config.preprocessing = PreprocessConfig(pre.grid.half_resolution(), pre.intensity)
    return model


class Timer:
    """Accumulates wall time per named stage (``with timer("warp"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class ImageKeypoints:
    """Keypoints of one image.

    Attributes:
        points: ``(K, 3)`` float64 world RAS mm.
        mass: ``(K,)`` total heatmap activation (for ``power`` weights).
        world_from_net: ``(4, 4)`` the network grid's affine.
        grid_shape: the network grid shape.
    """

    points: torch.Tensor
    mass: torch.Tensor
    world_from_net: np.ndarray
    grid_shape: tuple[int, int, int]

    def numpy(self) -> np.ndarray:
        return self.points.detach().cpu().numpy()


def detect_keypoints(
    model: KeypointDetector,
    volumes: Sequence[Volume],
    *,
    device: torch.device | str | None = None,
    use_amp: bool = False,
    batch_size: int = 1,
) -> list[ImageKeypoints]:
    """One network pass per image (batched ``batch_size`` at a time); keypoints in world mm.

    The default ``batch_size=1`` makes an image's keypoints independent of the images it is
    processed with: on CPU, convolutions over a batch of 2 differ from batch 1 in the last bits
    (of order 1e-5 mm), which would make a pair's result depend on batch order, resumption or sharding.
    """
    device = torch.device(device) if device is not None else model.device
    pre = model.config.preprocessing
    out: list[ImageKeypoints] = []
    for start in range(0, len(volumes), batch_size):
        chunk = volumes[start : start + batch_size]
        inputs, affines = zip(*(to_network_input(v, pre, device) for v in chunk))
        x = torch.cat(inputs, dim=0)
        amp = use_amp and device.type == "cuda"
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            u, mass = model(x)
        for b, aff in enumerate(affines):
            idx = normalized_to_voxel(u[b].double(), pre.grid.shape)
            world = apply_affine(torch.as_tensor(aff, device=idx.device), idx)
            out.append(ImageKeypoints(world, mass[b].float(), aff, pre.grid.shape))
    return out


def fit_alignments(
    fixed_kp: ImageKeypoints,
    moving_kp: ImageKeypoints,
    aligns: Sequence[AlignSpec],
    weights: torch.Tensor | None = None,
) -> dict[str, AffineTransform | ThinPlateSpline]:
    """Fit every requested transform (``moving_from_fixed``) from one pair of keypoint sets.

    TPS coordinates are normalised by the fixed network grid's field of view (see
    ``docs/conventions.md``), which keeps lambda's official meaning.
    """
    pf, pm = fixed_kp.points.unsqueeze(0), moving_kp.points.unsqueeze(0)
    w = None if weights is None else weights.unsqueeze(0)
    center = torch.as_tensor(fov_center(fixed_kp.world_from_net, fixed_kp.grid_shape), device=pf.device)
    scale = fov_half_extent(fixed_kp.world_from_net, fixed_kp.grid_shape)
    return {spec.name: fit_transform(spec, pf, pm, w, center=center, scale=scale) for spec in aligns}


@dataclass
class AlignmentResult:
    """One transform type of one registration.

    Attributes:
        spec: the transform type (``rigid``, ``affine``, ``tps_<lambda>``).
        transform: ``moving_from_fixed`` (batch 1), world RAS mm.
        fixed, moving: the two images (original grids).
        fixed_keypoints, moving_keypoints: ``(K, 3)`` world RAS mm.
        weights: ``(K,)`` keypoint weights used by the fit, or ``None``.
        warped: the moving image resampled onto the fixed grid (if computed).
        warped_seg: the moving segmentation resampled onto the fixed grid (if given).
        metrics: metric name -> value (filled by :meth:`Registration.evaluate`).
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
    _dense: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def matrix(self) -> np.ndarray | None:
        """``(4, 4)`` world RAS matrix fixed -> moving (rigid/affine only; ``None`` for TPS)."""
        if isinstance(self.transform, AffineTransform):
            return self.transform.matrix[0].detach().cpu().double().numpy()
        return None

    def dense_transform(self) -> AffineTransform | DisplacementField:
        """The transform as used for warping on the fixed grid (a TPS becomes a displacement field
        sampled every ``field_stride`` voxels; computed once and cached)."""
        if isinstance(self.transform, AffineTransform):
            return self.transform
        if self._dense is None:
            dev = self.transform.control_points.device
            self._dense = sample_field(self.transform, self.fixed.shape, self.fixed.affine,
                                       stride=self.field_stride, device=dev)
        return self._dense

    def displacement(self) -> np.ndarray:
        """``(I, J, K, 3)`` displacement ``u = T(p) - p`` (RAS mm) on the full fixed grid."""
        dense = self.dense_transform()
        if isinstance(dense, AffineTransform):
            dense = sample_field(dense, self.fixed.shape, self.fixed.affine, stride=1,
                                 device=dense.matrix.device)
        full = dense.upsample(self.fixed.shape, self.fixed.affine)
        return full.displacement[0].permute(1, 2, 3, 0).cpu().numpy()

    @property
    def aligned_keypoints(self) -> np.ndarray:
        """Moving keypoints mapped into the fixed space, ``T^-1(moving)``: ``(K, 3)`` world mm."""
        pts = torch.as_tensor(self.moving_keypoints, dtype=torch.float64)
        if isinstance(self.transform, AffineTransform):
            inv = torch.linalg.inv(self.transform.matrix[0].detach().cpu().double())
            return apply_affine(inv, pts).numpy()
        tps = self.transform.to("cpu")
        p, _ = invert_points(tps, pts.unsqueeze(0))
        return p[0].numpy()

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
                (``T^-1``, like the images); ``"fixed"``: map fixed-space points into the moving
                space (``T``).

        Returns:
            A :class:`Volume` on the reference grid, or ``(N, 3)`` points.
        """
        if kind is None:
            arr = np.asarray(x) if isinstance(x, (np.ndarray, list)) else None
            kind = "points" if arr is not None and arr.ndim == 2 and arr.shape[1] == 3 else "image"
        if kind == "points":
            pts = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(1, -1, 3)
            t = self.transform.to("cpu")
            if points_space == "fixed":
                return t.map_points(pts)[0].numpy()
            if isinstance(t, AffineTransform):
                return t.inverse().map_points(pts)[0].numpy()
            return invert_points(t, pts)[0][0].numpy()
        vol = load_volume(x, kind="labels" if kind == "labels" else "image")
        ref = self.fixed if reference is None else load_volume(reference, kind="image") \
            if not isinstance(reference, Volume) else reference
        return warp_volume(vol, ref, self._transform_for(ref), kind=vol.kind, interp=interp)

    def _transform_for(self, ref: Volume):
        if ref is self.fixed or (ref.shape == self.fixed.shape and np.allclose(ref.affine, self.fixed.affine)):
            return self.dense_transform()
        if isinstance(self.transform, AffineTransform):
            return self.transform
        return sample_field(self.transform, ref.shape, ref.affine, stride=self.field_stride,
                            device=self.transform.control_points.device)

    def save(self, directory: str | Path, *, write_images: bool = True) -> dict[str, Path]:
        """Write this alignment's outputs (see ``docs/outputs.md``); returns name -> path."""
        from .export import save_alignment

        return save_alignment(self, Path(directory), write_images=write_images)


def warp_volume(vol: Volume, reference: Volume, transform, *, kind: str = "image",
                interp: str | None = None) -> Volume:
    """Resample ``vol`` (moving space) onto ``reference``'s grid through ``transform``."""
    device = _transform_device(transform)
    if kind == "labels":
        out = warp_labels(vol.tensor(device)[:, 0], vol.affine, reference.shape, reference.affine,
                          transform, mode=_label_interp(interp))[0]
        return reference.with_data(out.cpu().numpy(), name=vol.name, kind="labels")
    out = warp_image(vol.tensor(device).float(), vol.affine, reference.shape, reference.affine,
                     transform, mode=_image_interp(interp))[0, 0]
    return reference.with_data(out.cpu().numpy(), name=vol.name, kind="image")


def _transform_device(transform) -> torch.device:
    if isinstance(transform, AffineTransform):
        return transform.matrix.device
    if isinstance(transform, DisplacementField):
        return transform.displacement.device
    return transform.control_points.device


def _image_interp(interp: str | None) -> ImageInterp:
    interp = interp or "linear"
    if interp not in ("linear", "nearest", "cubic"):
        raise ConfigError(f"unknown image interpolation {interp!r}: use linear, nearest or cubic")
    return interp  # type: ignore[return-value]


def _label_interp(interp: str | None) -> LabelInterp:
    interp = interp or "nearest"
    if interp not in ("nearest", "labelwise"):
        raise ConfigError(f"unknown label interpolation {interp!r}: use nearest or labelwise")
    return interp  # type: ignore[return-value]


@dataclass
class Registration:
    """The result of :func:`register`: keypoints of both images and one result per transform type."""

    fixed: Volume
    moving: Volume
    fixed_keypoints: ImageKeypoints
    moving_keypoints: ImageKeypoints
    results: dict[str, AlignmentResult]
    fixed_seg: Volume | None = None
    moving_seg: Volume | None = None
    weights: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, align: str) -> AlignmentResult:
        key = parse_aligns([align])[0].name
        if key not in self.results:
            raise KeyError(f"{align!r} was not computed; available: {', '.join(self.results)}")
        return self.results[key]

    def __iter__(self) -> Iterator[AlignmentResult]:
        return iter(self.results.values())

    def evaluate(self, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Compute metrics for every alignment (stored in each result's ``metrics``)."""
        from .metrics import compute_metrics

        out = {}
        fixed_norm = normalize_intensity(torch.as_tensor(self.fixed.data), _NO_CLIP).numpy()
        lo, hi = float(self.moving.data.min()), float(self.moving.data.max())
        for res in self:
            # image metrics compare min-max normalised intensities (the moving image's own range)
            warped = None if res.warped is None else (res.warped.data - lo) / (hi - lo)
            res.metrics = compute_metrics(
                metrics, warped_image=warped, fixed_image=fixed_norm,
                warped_seg=None if res.warped_seg is None else res.warped_seg.data,
                fixed_seg=None if self.fixed_seg is None else self.fixed_seg.data,
                spacing=self.fixed.spacing, transform=res.dense_transform(),
                fixed_shape=self.fixed.shape, fixed_affine=self.fixed.affine,
                moving_seg=None if self.moving_seg is None else self.moving_seg.data,
                moving_affine=self.moving.affine)
            out[res.name] = res.metrics
        return out

    def save(self, directory: str | Path, *, write_images: bool = True,
             visualize: bool = False) -> dict[str, Path]:
        """Write keypoints and every alignment's outputs under ``directory``."""
        from .export import save_registration

        return save_registration(self, Path(directory), write_images=write_images, visualize=visualize)


_NO_CLIP = PreprocessConfig().intensity


def _check_seg(seg: Volume | None, image: Volume, role: str) -> None:
    if seg is None:
        return
    if seg.shape != image.shape or not np.allclose(seg.affine, image.affine, atol=1e-3):
        raise ImageContentError(
            f"{seg.name}: {role} segmentation grid {seg.shape} does not match its image grid {image.shape} "
            f"(shapes and affines must be equal)")


def register(
    moving: Any,
    fixed: Any,
    *,
    model: str | Path | KeypointDetector | None = None,
    aligns: Sequence[str] = ("affine", "tps_0"),
    moving_seg: Any = None,
    fixed_seg: Any = None,
    weighted: bool | None = None,
    device: str | torch.device | None = None,
    use_amp: bool = False,
    half_resolution: bool = False,
    warp: bool = True,
    label_interp: str = "nearest",
    field_stride: int = DEFAULT_FIELD_STRIDE,
    keypoints: tuple[ImageKeypoints, ImageKeypoints] | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed`` with every transform type in ``aligns``, from one keypoint
    detection per image.

    Args:
        moving, fixed: images (path, nibabel image, :class:`Volume`, or ``(array, affine)``).
        model: bundled model name, model file, a loaded :class:`KeypointDetector`, or ``None``
            for the default bundled model.
        aligns: any of ``rigid``, ``affine``, ``tps_<lambda>``.
        moving_seg, fixed_seg: optional label maps on their images' grids.
        weighted: use ``power`` keypoint weights (default: the model's setting).
        device: ``"cpu"``, ``"cuda"``, or ``None`` for the best available.
        use_amp: bf16 autocast for the network on GPU.
        half_resolution: run the network at half the model's resolution.
        warp: resample the moving image (and segmentation) onto the fixed grid.
        label_interp: ``nearest`` or ``labelwise`` for segmentations.
        field_stride: sub-grid stride of the dense TPS field.
        keypoints: precomputed ``(fixed, moving)`` keypoints (skips the network).

    Returns:
        A :class:`Registration`; ``reg[align]`` is an :class:`AlignmentResult`.
    """
    timer = Timer()
    specs = parse_aligns(list(aligns))
    _label_interp(label_interp)
    dev = resolve_device(device)
    with timer("load"):
        fixed_v = load_volume(fixed, kind="image")
        moving_v = load_volume(moving, kind="image")
        fixed_s = None if fixed_seg is None else load_volume(fixed_seg, kind="labels")
        moving_s = None if moving_seg is None else load_volume(moving_seg, kind="labels")
        _check_seg(fixed_s, fixed_v, "fixed")
        _check_seg(moving_s, moving_v, "moving")
    net = model if isinstance(model, KeypointDetector) else None
    if keypoints is None or (weighted is None and model is not None):
        with timer("model"):
            net = resolve_model(model, dev, half_resolution=half_resolution)
    if keypoints is None:
        with timer("keypoints"):
            kf, km = detect_keypoints(net, [fixed_v, moving_v], device=dev, use_amp=use_amp)
    else:
        kf, km = keypoints
    if weighted is None:
        weighted = net is not None and net.config.weighting == "power"
    w = power_weights(kf.mass.unsqueeze(0), km.mass.unsqueeze(0))[0] if weighted else None
    with timer("fit"):
        transforms = fit_alignments(kf, km, specs, w)
    w_np = None if w is None else w.detach().cpu().numpy()
    results = {}
    for spec in specs:
        results[spec.name] = AlignmentResult(
            spec, transforms[spec.name], fixed_v, moving_v, kf.numpy(), km.numpy(), w_np, field_stride)
    reg = Registration(fixed_v, moving_v, kf, km, results, fixed_s, moving_s, w_np, timer.seconds)
    if warp:
        _warp_all(reg, dev, label_interp, timer)
    return reg


def _warp_all(reg: Registration, device: torch.device, label_interp: str, timer: Timer) -> None:
    moving_t = reg.moving.tensor(device)  # original intensities: outputs keep the moving image's units
    moving_seg_t = None if reg.moving_seg is None else reg.moving_seg.tensor(device)[:, 0]
    for res in reg:
        with timer("dense_field"):
            dense = res.dense_transform()
        with timer("warp"):
            out = warp_image(moving_t, reg.moving.affine, reg.fixed.shape, reg.fixed.affine, dense)
            res.warped = reg.fixed.with_data(out[0, 0].cpu().numpy(), name=f"{reg.moving.name}_{res.name}")
            if moving_seg_t is not None:
                seg = warp_labels(moving_seg_t, reg.moving.affine, reg.fixed.shape, reg.fixed.affine, dense,
                                  mode=_label_interp(label_interp))
                res.warped_seg = reg.fixed.with_data(seg[0].cpu().numpy(), kind="labels",
                                                     name=f"{reg.moving.name}_{res.name}_seg")


def save_warped(res: AlignmentResult, path: str | Path) -> Path:
    """Write the warped image of ``res`` with the fixed image's header."""
    if res.warped is None:
        raise ConfigError("nothing to save: the registration was run with warp=False")
    return save_volume(res.warped.data, res.fixed, path)
