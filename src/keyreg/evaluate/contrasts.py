"""Synthetic contrasts of label maps: how per-label mean intensities are drawn for a contrast name,
and how an image is made from a label map and those means (the training generator when installed)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["synthesizer"]


def _fallback_means(table_size: int, generator: torch.Generator) -> torch.Tensor:
    """``(1, table_size)``: one random intensity per label id, uniform in [0.1, 1]; background (id 0)
    in [0, 0.1]."""
    means = 0.1 + 0.9 * torch.rand((1, table_size), generator=generator, dtype=torch.float64)
    means[0, 0] = 0.1 * float(torch.rand((), generator=generator, dtype=torch.float64))
    return means.float()


def _fallback_synthesize(labels: torch.Tensor, generator: torch.Generator, means: torch.Tensor, *,
                         noise_std: float = 0.04) -> torch.Tensor:
    """The per-label intensities ``means`` plus Gaussian noise, clipped to [0, 1]."""
    img = means[0][labels.clamp_min(0)]
    img = img + noise_std * torch.randn(img.shape, generator=generator)
    return img.clamp_(0, 1)


def synthesizer() -> tuple[Callable[[int, str, torch.Generator], torch.Tensor],
                            Callable[[torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor], str]:
    """``(draw_means, synthesize, name)``: the training generator ``keyreg.train.synth`` when it is
    installed (named contrasts ``t1``/``t2``/``pd`` use its tissue-class means; other names are
    random draws; skull stripping off, so image and segmentation cover the same head), else a
    simple fallback (a random intensity per label id and Gaussian noise)."""
    try:
        from ..train import synth  # type: ignore[attr-defined]
        draw, make = synth.random_means, synth.synthesize_image
    except (ImportError, AttributeError):
        return (lambda size, name, g: _fallback_means(size, g),
                lambda labels, g, means: _fallback_synthesize(labels, g, means),
                "keyreg.evaluate fallback (random intensity per label id + Gaussian noise)")
    named = {k.lower() for k in getattr(synth, "NAMED_CONTRASTS", {})}

    def draw_means(size: int, name: str, g: torch.Generator) -> torch.Tensor:
        return draw(1, size, g, contrast=name.lower() if name.lower() in named else None)

    def synthesize(labels: torch.Tensor, g: torch.Generator, means: torch.Tensor) -> torch.Tensor:
        return make(labels, g, means=means, skull_strip=False).float()

    return draw_means, synthesize, "keyreg.train.synth.synthesize_image (one means table per contrast name)"
