"""The keypoint detector: backbone + center of mass, with the config that travels with its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..preprocess import PreprocessConfig
from .backbones import build_backbone
from .keypoints import center_of_mass

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
    """

    name: str
    architecture: ArchitectureConfig
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    weighting: Literal["power"] | None = None
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    FORMAT = "keyreg-model"
    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "format_version": self.VERSION, "name": self.name,
                "description": self.description, "architecture": asdict(self.architecture),
                "preprocessing": self.preprocessing.to_dict(), "weighting": self.weighting,
                "training": self.training}

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
        weighting = d.get("weighting")
        if weighting not in (None, "power"):
            raise ConfigError(f"unknown keypoint weighting {weighting!r}")
        return cls(name=str(d.get("name", "model")), architecture=arch,
                   preprocessing=PreprocessConfig.from_dict(d.get("preprocessing", {})),
                   weighting=weighting, description=str(d.get("description", "")),
                   training=dict(d.get("training", {})))


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(points, mass)``: ``(B, K, D)`` normalised coordinates (tensor-axis order,
        corner-aligned, relative to the input grid) and ``(B, K)`` heatmap activation."""
        return center_of_mass(self.backbone(x))
