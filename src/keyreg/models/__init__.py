"""Keypoint detector models: backbones, center of mass, configs, and loading (official + keyreg)."""

from .backbones import ConvNet, UNet, build_backbone
from .checkpoint import (DEFAULT_MODEL, infer_architecture, list_pretrained, load_model,
                         load_official_checkpoint, save_model)
from .detector import ArchitectureConfig, KeypointDetector, ModelConfig
from .keypoints import center_of_mass, power_weights

__all__ = [
    "ArchitectureConfig",
    "ModelConfig",
    "KeypointDetector",
    "ConvNet",
    "UNet",
    "build_backbone",
    "center_of_mass",
    "power_weights",
    "load_model",
    "save_model",
    "load_official_checkpoint",
    "infer_architecture",
    "list_pretrained",
    "DEFAULT_MODEL",
]
