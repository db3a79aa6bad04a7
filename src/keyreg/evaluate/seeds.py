"""Seeds of the evaluation protocol: every random draw (contrasts, images, pair subsets,
perturbations) is seeded from the evaluation seed and the names of what is drawn, so one draw never
depends on how many others were made before it."""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["seed_of"]


def seed_of(*parts: Any) -> int:
    """A 32-bit seed from ``parts`` (CRC-32 of their ``|``-joined text)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())
