"""The keypoint detector: backbone + center of mass, with the config that travels with its weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..preprocess import PreprocessConfig
from .backbones import build_backbone
from .keypoints import center_of_mass
from .regions import RegionAtlas

__all__ = ["ArchitectureConfig", "ModelConfig", "KeypointDetector"]

Backbone = Literal["conv", "unet", "truncatedunet"]


@dataclass(frozen=True)
class ArchitectureConfig:
    """Network shape.  ``num_levels``, ``num_truncated`` and ``f_maps`` concern the U-Nets only."""

    backbone: Backbone
    num_keypoints: int
    num_levels: int = 4
    num_truncated: int = 1
    f_maps: int = 32
    in_channels: int = 1
    dim: int = 3

    def __post_init__(self) -> None:
        if self.backbone not in ("conv", "unet", "truncatedunet"):
            raise ConfigError(f"unknown backbone {self.backbone!r}: use conv, unet or truncatedunet")
        if self.num_keypoints < 1:
            raise ConfigError(f"num_keypoints must be >= 1, got {self.num_keypoints}")
        if self.backbone == "unet" and self.num_truncated:
            object.__setattr__(self, "num_truncated", 0)
        if self.backbone != "conv" and not (self.num_levels >= 2 and 0 <= self.num_truncated < self.num_levels):
            raise ConfigError(f"a U-Net needs num_levels >= 2 and 0 <= num_truncated < num_levels, "
                              f"got num_levels={self.num_levels}, num_truncated={self.num_truncated}")

    def describe(self) -> str:
        if self.backbone == "conv":
            return f"conv K={self.num_keypoints}"
        t = f" t={self.num_truncated}" if self.backbone == "truncatedunet" else ""
        return f"{self.backbone} K={self.num_keypoints} L={self.num_levels}{t} f_maps={self.f_maps}"


@dataclass
class ModelConfig:
    """Everything needed to rebuild and use a model besides its weights (the JSON next to them).

    Attributes:
        name: short name (bundled models are selected by it).
        architecture: network shape.
        preprocessing: how images are brought to the network input grid.
        weighting: default keypoint weighting for fits: ``"power"`` or ``None`` (uniform).
        description: one line for ``keyreg models``.
        training: provenance (data, command, steps, ...), free-form.
        regions: for anatomical models, the definition of every keypoint (one region per output
            channel, with its name); ``None`` for unnamed models (official checkpoints).
        orientation_search: test-time orientation search of anatomical models
            (``keyreg.models.inference``): ``"always"``, ``"auto"`` (``True``) or off (``False``).
        names: keypoint names of a model without regions (``None``: ``K-1 .. K-N``); anatomical
            models take their names from ``regions``.
        fit_exclude: glob patterns of keypoint names left out of fits by default (the anatomical
            default model: ``Extracerebral-*``, whose head-shape variability would pull a brain
            alignment); a user's own exclusion list replaces it.
        aligned_tolerance_mm: the smallest motion (RMS over the fit keypoints, mm) the model
            resolves; a fit that moves a pair's keypoints less keeps the identity
            (:func:`keyreg.transforms.keep_identity_if_aligned`); calibrated on aligned pairs by
            ``scripts/calibrate_aligned.py``; 0 for models without a calibration.
        shift_ensemble_voxels: anatomical models: the final keypoints are the mean of the chosen
            canonical reading and four readings on grids shifted by this many network voxels
            (:func:`keyreg.models.inference.shifted_grids`); 0 reads once.
        check_view_ensemble: anatomical models: the final keypoints also average the reading of the
            orientation search's check pass (the canonical grid turned by 40°) when it agrees with the
            canonical reading; that pass is always read, so it costs no pass.
    """

    name: str
    architecture: ArchitectureConfig
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    weighting: Literal["power"] | None = None
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    regions: RegionAtlas | None = None
    orientation_search: bool | str = False
    fit_exclude: tuple[str, ...] = ()
    names: tuple[str, ...] | None = None
    aligned_tolerance_mm: float = 0.0
    shift_ensemble_voxels: float = 0.0
    check_view_ensemble: bool = False

    FORMAT = "keyreg-model"
    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "format_version": self.VERSION, "name": self.name,
                "description": self.description, "architecture": asdict(self.architecture),
                "preprocessing": self.preprocessing.to_dict(), "weighting": self.weighting,
                "training": self.training,
                **({"regions": self.regions.to_dict()} if self.regions is not None else {}),
                "orientation_search": self.orientation_search, "fit_exclude": list(self.fit_exclude),
                **({"aligned_tolerance_mm": self.aligned_tolerance_mm} if self.aligned_tolerance_mm else {}),
                **({"shift_ensemble_voxels": self.shift_ensemble_voxels} if self.shift_ensemble_voxels else {}),
                **({"check_view_ensemble": True} if self.check_view_ensemble else {}),
                **({"keypoint_names": list(self.names)} if self.names is not None and self.regions is None else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("format") != cls.FORMAT:
            raise ConfigError(f"not a keyreg model config (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) > cls.VERSION:
            raise ConfigError(f"model config version {d.get('format_version')} is newer than this keyreg "
                              f"understands ({cls.VERSION}); upgrade keyreg")
        try:
            arch = ArchitectureConfig(**d["architecture"])
        except (TypeError, KeyError) as e:
            raise ConfigError(f"invalid architecture in model config: {e}") from None
        regions = RegionAtlas.from_dict(d["regions"]) if d.get("regions") is not None else None
        if regions is not None and len(regions) != arch.num_keypoints:
            raise ConfigError(f"model config defines {len(regions)} regions for {arch.num_keypoints} keypoints")
        exclude = d.get("fit_exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise ConfigError(f"fit_exclude must be a list of name patterns, got {exclude!r}")
        names = d.get("keypoint_names")
        if names is not None and (not isinstance(names, list) or len(names) != arch.num_keypoints
                                  or not all(isinstance(n, str) for n in names)):
            raise ConfigError(f"keypoint_names must be a list of {arch.num_keypoints} strings")
        if names is not None and len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"keypoint_names must be distinct (keypoints are matched by name), {twice!r} occurs "
                              f"{names.count(twice)} times")
        search = d.get("orientation_search", False)
        if search not in (True, False, "auto", "always"):
            raise ConfigError(f"orientation_search must be true, false, 'auto' or 'always', got {search!r}")
        tol = d.get("aligned_tolerance_mm", 0.0)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1e3:
            raise ConfigError(f"aligned_tolerance_mm must be a number of mm >= 0, got {tol!r}")
        shift = d.get("shift_ensemble_voxels", 0.0)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift <= 8:
            raise ConfigError(f"shift_ensemble_voxels must be a number of voxels in [0, 8], got {shift!r}")
        check_view = d.get("check_view_ensemble", False)
        if not isinstance(check_view, bool):
            raise ConfigError(f"check_view_ensemble must be true or false, got {check_view!r}")
        weighting = d.get("weighting")
        if weighting not in (None, "power"):
            raise ConfigError(f"unknown keypoint weighting {weighting!r}")
        return cls(name=str(d.get("name", "model")), architecture=arch,
                   preprocessing=PreprocessConfig.from_dict(d.get("preprocessing", {})),
                   weighting=weighting, description=str(d.get("description", "")),
                   training=dict(d.get("training", {})), regions=regions, orientation_search=search,
                   fit_exclude=tuple(exclude), names=tuple(names) if names is not None else None,
                   aligned_tolerance_mm=float(tol), shift_ensemble_voxels=float(shift),
                   check_view_ensemble=check_view)

    def fit_mask(self, exclude: Sequence[str] | None = None) -> list[bool] | None:
        """Which keypoints enter fits: names matching none of ``exclude`` (default: ``fit_exclude``);
        ``None`` when every keypoint does."""
        from fnmatch import fnmatchcase

        patterns = self.fit_exclude if exclude is None else tuple(exclude)
        if not patterns:
            return None
        names = self.keypoint_names or [f"K-{k + 1}" for k in range(self.architecture.num_keypoints)]
        return [not any(fnmatchcase(n, p) for p in patterns) for n in names]

    @property
    def keypoint_names(self) -> list[str] | None:
        """One name per keypoint (anatomical models: their regions'), ``None`` for unnamed models."""
        if self.regions is not None:
            return self.regions.names
        return list(self.names) if self.names is not None else None

    @keypoint_names.setter
    def keypoint_names(self, names: Sequence[str] | None) -> None:
        if self.regions is not None:
            raise ConfigError("an anatomical model's keypoint names come from its regions")
        if names is not None and len(names) != self.architecture.num_keypoints:
            raise ConfigError(f"{len(names)} names for {self.architecture.num_keypoints} keypoints")
        self.names = None if names is None else tuple(str(n) for n in names)


class KeypointDetector(nn.Module):
    """``image (B, 1, *grid) -> keypoints (B, K, 3)`` in the normalised frame of the input grid.

    The backbone's parameters live under ``self.backbone`` with the official names.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        a = config.architecture
        self.config = config
        self.backbone = build_backbone(a.backbone, a.num_keypoints, num_levels=a.num_levels,
                                       num_truncated=a.num_truncated, f_maps=a.f_maps,
                                       in_channels=a.in_channels, dim=a.dim)

    @property
    def num_keypoints(self) -> int:
        return self.config.architecture.num_keypoints

    @property
    def device(self) -> torch.device:
        first = next(iter(self.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw heatmaps ``(B, K, *spatial')``."""
        return self.backbone(x)

    def infer(self, x: torch.Tensor, *, use_amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: ``(points, mass)`` of :meth:`forward` without autograd (bf16 autocast on CUDA
        with ``use_amp``).

        On CPU a batch of one image is run as a batch of two (the image twice): for single images
        torch picks its native 3-D convolution, 2x slower here than mkldnn's, which it uses for
        batches; and mkldnn's results for an image do not depend on the batch's size or its other
        images (tested), so an image's keypoints are the same whatever it is run with.
        """
        n = x.shape[0]
        if n == 1 and x.device.type == "cpu":
            x = torch.cat([x, x])
        x = x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x.contiguous()
        amp = use_amp and x.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            u, mass = self(x)
        return u[:n], mass[:n]

    def forward(self, x: torch.Tensor, return_heatmaps: bool = False):
        """Returns ``(points, mass)``: ``(B, K, D)`` normalised coordinates (tensor-axis order,
        corner-aligned, relative to the input grid) and ``(B, K)`` heatmap activation; with
        ``return_heatmaps=True`` the raw heatmaps ``(B, K, *spatial')`` instead."""
        heat = self.backbone(x)
        return heat if return_heatmaps else center_of_mass(heat)
