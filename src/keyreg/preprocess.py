"""From a volume in its own space to the network's input grid, as a model's config says.

The network input grid is described by its shape and a ``world_from_network_voxel`` affine; the
image is resampled onto it once (trilinear, from the original voxels), so keypoints found on it map
back to world mm exactly through that affine.  Two grid modes:

* ``"ras"`` (BrainMorph and keyreg models): an axis-aligned RAS+ grid of ``voxel_size`` mm and
  ``shape`` voxels centred on the image's field of view — equivalent to reorienting to canonical,
  resampling to ``voxel_size`` and cropping/padding to ``shape`` around the centre.
* ``"fov"`` (the official IXI half-resolution models): the image's own voxel axes stretched to
  ``shape`` (ignoring aspect ratio), optionally with the tensor axes permuted (``permute``).

Intensities are min-max normalised to [0, 1], after optional percentile clipping; label maps are
never normalised (they are not network inputs).  Where a grid reaches beyond the image's field of
view, the network sees 0 (``IntensitySpec.outside="zero"``, the official models' convention and
the default) or the image's background level (``"background"``, set for anatomical models that
keyreg trains or installs): on a turned grid, zeros
beside a noisy background draw the edges of the field of view as a sharp box, which a network can
read as the head's surface.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, ImageContentError
from .geometry import fov_center, voxel_sizes
from .io import Volume
from .warp import resample_affine

__all__ = ["GridSpec", "IntensitySpec", "PreprocessConfig", "network_grid_affine",
           "normalize_intensity", "to_network_input", "network_source", "sample_network_input",
           "background_level", "outside_level", "intensity_range", "OUTSIDE_MODES", "MASKED_BORDER_SHARE"]


def _triple(value: Any, name: str, kind: type = float) -> tuple:
    given = value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be 3 positive numbers, got {given!r}")
    try:
        value = tuple(kind(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be 3 positive numbers, got {given!r}") from None
    if len(value) != 3 or any(not math.isfinite(v) or v <= 0 for v in value):
        raise ConfigError(f"{name} must be 3 positive numbers, got {given!r}")
    return value


@dataclass(frozen=True)
class GridSpec:
    """The network input grid.

    Attributes:
        mode: ``"ras"`` or ``"fov"`` (see module docstring).
        shape: network input shape ``(n0, n1, n2)`` (tensor-axis order).
        voxel_size: mm per voxel along R, A, S (``"ras"`` mode only).
        permute: for ``"fov"``: tensor axis ``m`` of the network input is image axis ``permute[m]``.
    """

    mode: Literal["ras", "fov"] = "ras"
    shape: tuple[int, int, int] = (128, 128, 128)
    voxel_size: tuple[float, float, float] = (2.0, 2.0, 2.0)
    permute: tuple[int, int, int] = (0, 1, 2)

    def __post_init__(self) -> None:
        if self.mode not in ("ras", "fov"):
            raise ConfigError(f"grid mode must be 'ras' or 'fov', got {self.mode!r}")
        object.__setattr__(self, "shape", _triple(self.shape, "grid shape", int))
        object.__setattr__(self, "voxel_size", _triple(self.voxel_size, "voxel_size"))
        if sorted(self.permute) != [0, 1, 2]:
            raise ConfigError(f"permute must be a permutation of (0, 1, 2), got {self.permute!r}")
        object.__setattr__(self, "permute", tuple(int(p) for p in self.permute))

    def half_resolution(self) -> "GridSpec":
        """The same field of view at half the resolution (shape / 2, voxels x 2)."""
        return GridSpec(self.mode, tuple(max(1, s // 2) for s in self.shape),  # type: ignore[arg-type]
                        tuple(v * 2 for v in self.voxel_size), self.permute)  # type: ignore[arg-type]


#: what a network grid holds beyond the image's field of view (:class:`IntensitySpec`)
OUTSIDE_MODES = ("zero", "background")


@dataclass(frozen=True)
class IntensitySpec:
    """Intensity normalisation: min-max to [0, 1] after clipping to percentiles (if given).

    Attributes:
        clip_percentiles: ``(low, high)`` percentiles clipped before the min-max, or None.
        outside: the value of network voxels beyond the image's field of view: ``"zero"``, or
            ``"background"``, the image's background level (:func:`background_level`).
    """

    clip_percentiles: tuple[float, float] | None = None
    outside: Literal["zero", "background"] = "zero"

    def __post_init__(self) -> None:
        if self.outside not in OUTSIDE_MODES:
            raise ConfigError(f"intensity outside must be one of {', '.join(OUTSIDE_MODES)}, got {self.outside!r}")
        p = self.clip_percentiles
        if p is not None:
            p = (float(p[0]), float(p[1]))
            if not 0 <= p[0] < p[1] <= 100:
                raise ConfigError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {p}")
            object.__setattr__(self, "clip_percentiles", p)


@dataclass(frozen=True)
class PreprocessConfig:
    grid: GridSpec = field(default_factory=GridSpec)
    intensity: IntensitySpec = field(default_factory=IntensitySpec)

    def to_dict(self) -> dict:
        return {"grid": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.grid).items()},
                "intensity": {"method": "minmax",
                              "clip_percentiles": (list(self.intensity.clip_percentiles)
                                                   if self.intensity.clip_percentiles else None),
                              **({"outside": self.intensity.outside} if self.intensity.outside != "zero" else {})}}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        try:
            g = dict(d.get("grid", {}))
            inten = dict(d.get("intensity", {}))
            if inten.get("method", "minmax") != "minmax":
                raise ConfigError(f"unknown intensity method {inten.get('method')!r}")
            return cls(GridSpec(**g), IntensitySpec(inten.get("clip_percentiles"), inten.get("outside", "zero")))
        except TypeError as e:
            raise ConfigError(f"invalid preprocessing config: {e}") from None


def network_grid_affine(affine: np.ndarray, shape: Sequence[int], grid: GridSpec) -> np.ndarray:
    """``world_from_network_voxel`` (4x4) for an image with ``affine`` and ``shape``."""
    affine = np.asarray(affine, dtype=np.float64)
    n_net = np.asarray(grid.shape, dtype=np.float64)
    if grid.mode == "ras":
        vs = np.asarray(grid.voxel_size, dtype=np.float64)
        out = np.eye(4)
        out[:3, :3] = np.diag(vs)
        out[:3, 3] = fov_center(affine, shape) - vs * (n_net - 1) / 2
        return out
    # fov: network voxel m along tensor axis a is image voxel m (n_img - 1) / (n_net - 1) along permute[a]
    n_img = np.asarray(shape[:3], dtype=np.float64)
    img_from_net = np.zeros((4, 4))
    for a, src in enumerate(grid.permute):
        img_from_net[src, a] = (n_img[src] - 1) / max(n_net[a] - 1, 1)
    img_from_net[3, 3] = 1
    return affine @ img_from_net


def intensity_range(data: torch.Tensor, spec: IntensitySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The intensities :func:`normalize_intensity` maps to 0 and 1: the image's minimum and maximum,
    or its ``spec.clip_percentiles``."""
    x = data.float()
    if spec.clip_percentiles is None:
        return torch.aminmax(x)
    flat = x.flatten()
    if flat.numel() > 1 << 24:  # quantile has a size limit; a strided subsample is plenty
        flat = flat[:: flat.numel() // (1 << 24) + 1]
    lo, hi = torch.quantile(flat, torch.tensor([p / 100 for p in spec.clip_percentiles], device=x.device,
                                               dtype=x.dtype))
    return lo, hi


def normalize_intensity(data: torch.Tensor, spec: IntensitySpec) -> torch.Tensor:
    """Min-max to [0, 1] (after percentile clipping when ``spec.clip_percentiles`` is set)."""
    lo, hi = intensity_range(data, spec)
    return (data.float().clamp(lo, hi) - lo) / (hi - lo).clamp_min(1e-12)


def _box_pool(volume: torch.Tensor, factors: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Average ``s x s x s`` blocks (``s = floor(factor / 2)`` per axis) before a large down-sampling:
    the Gaussian pre-filter then runs on a volume ``prod(s)`` times smaller.

    Returns:
        ``(pooled, img_from_pooled, box_variance)``: the pooled volume, the ``(4, 4)`` map from its
        voxel indices to the input's (the block centres), and each axis' box variance in input voxels^2.
    """
    s = np.maximum(1, np.floor(np.asarray(factors) / 2)).astype(int)
    img_from_pooled = np.eye(4)
    if (s == 1).all():
        return volume, img_from_pooled, np.zeros(3)
    pad = []
    for axis in (2, 1, 0):  # F.pad order: last axis first; replicate the tail to a multiple of s
        n = volume.shape[2 + axis]
        pad += [0, int(-n % s[axis])]
    x = F.pad(volume, pad, mode="replicate") if any(pad) else volume
    pooled = x  # block means as strided sums along each axis: ~2x faster than avg_pool3d on CPU
    for axis in range(3):
        k = int(s[axis])
        if k > 1:
            parts = [pooled[(slice(None),) * (2 + axis) + (slice(o, None, k),)] for o in range(k)]
            acc = parts[0] + parts[1]
            for part in parts[2:]:
                acc.add_(part)
            pooled = acc
    pooled = pooled.mul_(1.0 / float(np.prod(s)))
    img_from_pooled[:3, :3] = np.diag(s)
    img_from_pooled[:3, 3] = (s - 1) / 2
    return pooled, img_from_pooled, (s.astype(float) ** 2 - 1) / 12


def _antialias(volume: torch.Tensor, factors: np.ndarray, sigma0: np.ndarray | None = None) -> torch.Tensor:
    """Gaussian pre-filter before down-sampling by ``factors`` (per axis, in this volume's voxels):
    sigma = 0.4 factor, less ``sigma0`` (the blur the volume already has, same units)."""
    sig = 0.4 * np.asarray(factors, dtype=np.float64)
    if sigma0 is not None:
        sig = np.sqrt(np.maximum(sig ** 2 - np.asarray(sigma0) ** 2, 0.0))
    blur = [(axis, float(sg)) for axis, (f, sg) in enumerate(zip(factors, sig)) if f > 1.25 and sg > 0.3]
    out = volume
    for axis, sigma in blur:
        out = _gaussian_filter1d(out, sigma, 2 + axis)
    return out


def _gaussian_filter1d(x: torch.Tensor, sigma: float, dim: int, truncate: float = 3.0) -> torch.Tensor:
    """Gaussian filter of ``x`` along ``dim``: scipy's ``gaussian_filter1d(mode="nearest", truncate=3)``
    (radius ``int(truncate * sigma + 0.5)``, normalised taps, the edge voxel repeated), as a sum of
    shifted copies: a few passes over the volume on any device, without importing scipy.ndimage."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    n = x.shape[dim]
    padded = x.index_select(dim, torch.arange(-r, n + r, device=x.device).clamp_(0, n - 1))
    out = padded.narrow(dim, 0, n) * float(w[0])
    for i in range(1, 2 * r + 1):
        out.add_(padded.narrow(dim, i, n), alpha=float(w[i]))
    return out


def network_source(volume: Volume, config: PreprocessConfig, world_from_net: np.ndarray,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The image normalised and anti-aliased for network grids with ``world_from_net``'s voxel
    size (any rotation of such a grid can then be sampled from it).

    A fine image is first averaged in blocks (:func:`_box_pool`), then blurred with the rest of the
    pre-filter (Gaussian, sigma 0.4 x the down-sampling factor in all).

    Returns:
        ``(source, world_from_source)``: ``(1, 1, I', J', K')`` float32 and its ``(4, 4)`` affine.
    """
    spec = config.intensity
    # plain min-max is affine in the intensities, so it commutes with the (linear) pooling and
    # blurring: it is applied to the smaller, filtered volume (the range is the full image's)
    late = spec.clip_percentiles is None
    src = volume.tensor(device).float() if late else normalize_intensity(volume.tensor(device), spec)
    img_from_net = np.linalg.inv(volume.affine) @ world_from_net
    # down-sampling factor along each image axis: how many image voxels one network step spans
    factors = np.sqrt((img_from_net[:3, :3] ** 2).sum(axis=1))
    spans = np.asarray(volume.shape[:3], dtype=np.float64) / factors  # the image's extent in network voxels
    if (spans < 2).any():
        fov = " x ".join(f"{v:.3g}" for v in voxel_sizes(volume.affine) * np.asarray(volume.shape[:3]))
        raise ImageContentError(f"{volume.name}: field of view {fov} mm is smaller than two network voxels "
                                f"({float(voxel_sizes(world_from_net)[0]):.3g} mm); are the voxel "
                                "sizes in mm?")
    pooled, img_from_pooled, box_var = _box_pool(src, factors)
    step = np.diag(img_from_pooled)[:3]
    sigma0 = np.sqrt(box_var) / step  # the box's blur, in pooled voxels
    out = _antialias(pooled, factors / step, sigma0)
    if late:
        lo, hi = intensity_range(src, spec)
        out = (out - lo) / (hi - lo).clamp_min(1e-12)
    return out, volume.affine @ img_from_pooled


def _faces(x: np.ndarray) -> np.ndarray:
    """The voxels on the six faces of a 3-D array, flattened."""
    return np.concatenate([f.reshape(-1) for f in (x[0], x[-1], x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1])])


#: a border with at least this share of its voxels at the image's minimum is a masked or clipped
#: background: zeros beyond the field of view continue it (:func:`background_level`)
MASKED_BORDER_SHARE = 0.1


def background_level(volume: Volume, spec: IntensitySpec) -> float:
    """The image's background level in the network's intensities (``spec``'s normalisation): the
    median of the voxels on the six faces of its array, the noise level of a magnitude image
    (Rician noise of standard deviation sigma: about 1.2 sigma); a scan cut through the head still
    has air on most of its faces.  0 when at least :data:`MASKED_BORDER_SHARE` of those voxels are
    at or below the intensity normalised to 0 (the minimum, or the low clip percentile) (a masked, skull-stripped or clipped background, as in the synthetic
    training images, whose fields of view were cut to zeros)."""
    data = np.asarray(volume.data).reshape(volume.data.shape[:3])
    lo, hi = (float(v) for v in intensity_range(torch.as_tensor(data), spec))
    faces = _faces(data)
    if np.mean(faces <= lo) >= MASKED_BORDER_SHARE:
        return 0.0
    return float(np.clip((np.median(faces) - lo) / max(hi - lo, 1e-12), 0.0, 1.0))


def outside_level(volume: Volume, config: PreprocessConfig) -> float:
    """The value network grids take beyond ``volume``'s field of view (``config.intensity.outside``)."""
    return background_level(volume, config.intensity) if config.intensity.outside == "background" else 0.0


def sample_network_input(source: torch.Tensor, source_affine: np.ndarray, world_from_net: np.ndarray,
                         shape: Sequence[int], outside: float = 0.0) -> torch.Tensor:
    """Trilinear samples of a :func:`network_source` (with its affine ``source_affine``) on the grid
    ``world_from_net`` (``shape``), ``outside`` beyond the image, clamped to [0, 1]: ``(1, 1, *shape)``."""
    img_from_net = torch.as_tensor(np.linalg.inv(source_affine) @ world_from_net)
    if not outside:
        return resample_affine(source, img_from_net, tuple(shape), mode="linear").clamp_(0, 1)
    # resampling is linear and pads with 0: shifting by ``outside`` and back pads with ``outside``
    x = resample_affine(source - outside, img_from_net, tuple(shape), mode="linear")
    return x.add_(outside).clamp_(0, 1)


def to_network_input(
    volume: Volume,
    config: PreprocessConfig,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Resample and normalise an image for the network.

    Returns:
        ``(x, world_from_net)``: ``x`` ``(1, 1, *grid.shape)`` float32 in [0, 1] on ``device``,
        and the 4x4 affine mapping network-grid voxel indices to world mm.
    """
    grid = config.grid
    world_from_net = network_grid_affine(volume.affine, volume.shape, grid)
    src, src_affine = network_source(volume, config, world_from_net, device)
    return sample_network_input(src, src_affine, world_from_net, grid.shape, outside_level(volume, config)), world_from_net
