"""Evaluation pairs: which image is registered to which, by pair kind (subject and modality)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..pairing import PAIR_KINDS
from .datasets import EvalImage
from .seeds import seed_of

__all__ = ["EvalPair", "make_pairs"]


@dataclass(frozen=True)
class EvalPair:
    """Indices of the moving and fixed images in the image list, and the pair kind."""

    moving: int
    fixed: int
    kind: str


def make_pairs(images: Sequence[EvalImage], kinds: Sequence[str] = PAIR_KINDS, *,
               max_pairs_per_kind: int | None = None, seed: int = 0) -> list[EvalPair]:
    """All ordered pairs (moving, fixed) of the requested kinds; never an image with itself.

    ``same_subject_cross_modality``: one subject, two modalities; ``cross_subject_same_modality``:
    two subjects, one modality; ``cross_subject_cross_modality``: two subjects, two modalities.
    Entries pointing at the same file are never paired either.  With ``max_pairs_per_kind``, a
    seeded random subset of each kind is kept (in the original order).
    """
    bad = [k for k in kinds if k not in PAIR_KINDS]
    if bad:
        raise ConfigError(f"unknown pair kind {bad[0]!r}; use: {', '.join(PAIR_KINDS)}")
    if max_pairs_per_kind is not None and max_pairs_per_kind < 1:
        raise ConfigError(f"--max_pairs must be >= 1, got {max_pairs_per_kind}")
    out: list[EvalPair] = []
    for kind in dict.fromkeys(kinds):
        sel = []
        for m, mov in enumerate(images):
            for f, fix in enumerate(images):
                if m == f or (mov.image.path is not None and mov.image.path == fix.image.path):
                    continue
                same_subject = mov.subject == fix.subject
                same_modality = mov.modality == fix.modality
                ok = {"same_subject_cross_modality": same_subject and not same_modality,
                      "cross_subject_same_modality": not same_subject and same_modality,
                      "cross_subject_cross_modality": not same_subject and not same_modality}[kind]
                if ok:
                    sel.append(EvalPair(m, f, kind))
        if max_pairs_per_kind is not None and len(sel) > max_pairs_per_kind:
            rng = np.random.default_rng(seed_of(seed, "pairs", kind))
            keep = sorted(rng.choice(len(sel), max_pairs_per_kind, replace=False).tolist())
            sel = [sel[i] for i in keep]
        out += sel
    return out
