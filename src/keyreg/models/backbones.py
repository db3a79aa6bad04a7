"""Keypoint backbones with the module structure and parameter names of the official checkpoints.

* ``conv``: 9 blocks ``Conv(k3, bias) -> InstanceNorm (no affine) -> ReLU``, max-pool after blocks
  2, 4, 6, 8; channels ``1 -> 32 -> 64 -> 64 -> 128 -> 128 -> 256 -> 256 -> 512 -> K``.
  Heatmaps at 1/16 of the input size.  Keys ``block{1..9}.conv.{weight,bias}``.
* ``unet`` / ``truncatedunet``: the 3-D U-Net of pytorch-3dunet as used by KeyMorph/BrainMorph:
  ``f_maps * 2**l`` channels at level ``l``; each level a double conv of
  ``GroupNorm -> Conv(k3, no bias) -> ReLU`` (8 groups, 1 when the norm sees fewer than 8
  channels); max-pool between encoder levels; decoders upsample (nearest) to the skip's size and
  concatenate ``[skip, upsampled]``; a final 1x1 conv with bias.  ``truncatedunet`` drops the last
  ``t`` decoders, so heatmaps come out at ``1 / 2**t`` of the input size.  Keys
  ``encoders.{l}.basic_module.SingleConv{1,2}.{groupnorm,conv}.*``, ``decoders.*``, ``final_conv.*``.

Each backbone maps ``(B, C, *spatial)`` to ``(B, K, *spatial')`` heatmaps; 2-D variants use
``dim=2``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvNet", "UNet", "build_backbone", "CONV_CHANNELS"]

CONV_CHANNELS = (32, 64, 64, 128, 128, 256, 256, 512)


def _conv(dim: int):
    return nn.Conv3d if dim == 3 else nn.Conv2d


class ConvBlock(nn.Module):
    """``Conv -> InstanceNorm -> ReLU`` with an optional 2x max-pool (parameter ``conv`` only)."""

    def __init__(self, cin: int, cout: int, pool: bool, dim: int = 3) -> None:
        super().__init__()
        self.conv = _conv(dim)(cin, cout, kernel_size=3, padding=1)
        self.norm = (nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)(cout)
        self.pool = pool
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        if self.pool:
            x = (F.max_pool3d if self.dim == 3 else F.max_pool2d)(x, 2)
        return x


class ConvNet(nn.Module):
    """The ``conv`` backbone (official ``ConvNetCoM`` without its center-of-mass layer)."""

    def __init__(self, num_keypoints: int, in_channels: int = 1, dim: int = 3) -> None:
        super().__init__()
        chans = (in_channels, *CONV_CHANNELS, num_keypoints)
        for b in range(1, 10):
            pool = b in (2, 4, 6, 8)
            self.add_module(f"block{b}", ConvBlock(chans[b - 1], chans[b], pool, dim))
        self.reduction = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in range(1, 10):
            x = getattr(self, f"block{b}")(x)
        return x


class SingleConv(nn.Module):
    """``GroupNorm (on the input) -> Conv(k3, no bias) -> ReLU``."""

    def __init__(self, cin: int, cout: int, num_groups: int, dim: int) -> None:
        super().__init__()
        groups = num_groups if cin >= num_groups else 1
        if cin % groups:
            raise ValueError(f"{cin} channels are not divisible into {groups} groups")
        self.groupnorm = nn.GroupNorm(groups, cin)
        self.conv = _conv(dim)(cin, cout, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(self.groupnorm(x)))


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, encoder: bool, num_groups: int, dim: int) -> None:
        super().__init__()
        mid = max(cout // 2, cin) if encoder else cout
        self.SingleConv1 = SingleConv(cin, mid, num_groups, dim)
        self.SingleConv2 = SingleConv(mid, cout, num_groups, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SingleConv2(self.SingleConv1(x))


class Encoder(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool, num_groups: int, dim: int) -> None:
        super().__init__()
        self.pool = pool
        self.dim = dim
        self.basic_module = DoubleConv(cin, cout, True, num_groups, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = (F.max_pool3d if self.dim == 3 else F.max_pool2d)(x, 2)
        return self.basic_module(x)


class Decoder(nn.Module):
    def __init__(self, cin: int, cout: int, num_groups: int, dim: int) -> None:
        super().__init__()
        self.basic_module = DoubleConv(cin, cout, False, num_groups, dim)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.basic_module(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """The ``unet`` / ``truncatedunet`` backbone.

    Args:
        num_keypoints: ``K`` output heatmaps.
        num_levels: ``L`` encoder levels (>= 2).
        num_truncated: ``t`` decoders removed from the end (0 = full U-Net); ``t < L``.
        f_maps: channels of the first level.
        num_groups: GroupNorm groups.
    """

    def __init__(self, num_keypoints: int, num_levels: int = 4, num_truncated: int = 0,
                 f_maps: int = 32, in_channels: int = 1, num_groups: int = 8, dim: int = 3) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        if not 0 <= num_truncated < num_levels:
            raise ValueError(f"num_truncated must be in [0, {num_levels - 1}], got {num_truncated}")
        f = [f_maps * 2**level for level in range(num_levels)]
        self.encoders = nn.ModuleList(
            Encoder(in_channels if i == 0 else f[i - 1], f[i], i > 0, num_groups, dim)
            for i in range(num_levels))
        self.decoders = nn.ModuleList(
            Decoder(f[i] + f[i + 1], f[i], num_groups, dim)
            for i in reversed(range(num_truncated, num_levels - 1)))
        self.final_conv = _conv(dim)(f[num_truncated], num_keypoints, kernel_size=1)
        self.reduction = 2**num_truncated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.insert(0, x)
        for dec, skip in zip(self.decoders, skips[1:]):
            x = dec(skip, x)
        return self.final_conv(x)


def build_backbone(backbone: str, num_keypoints: int, *, num_levels: int = 4, num_truncated: int = 1,
                   f_maps: int = 32, in_channels: int = 1, dim: int = 3) -> nn.Module:
    """Construct ``conv``, ``unet`` or ``truncatedunet`` (``unet`` ignores ``num_truncated``)."""
    if backbone == "conv":
        return ConvNet(num_keypoints, in_channels, dim)
    if backbone == "unet":
        return UNet(num_keypoints, num_levels, 0, f_maps, in_channels, dim=dim)
    if backbone == "truncatedunet":
        return UNet(num_keypoints, num_levels, num_truncated, f_maps, in_channels, dim=dim)
    raise ValueError(f"unknown backbone {backbone!r}: use conv, unet or truncatedunet")
