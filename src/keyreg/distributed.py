"""The torchrun environment: the one place that reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
(the batch runner shards pairs with it, the trainer its data and devices).  No torch import."""

from __future__ import annotations

import os

from .errors import ConfigError

__all__ = ["distributed_env"]


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` without it).

    Raises:
        ConfigError: values that are not integers, or a rank outside ``[0, world_size)``.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("the environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world, local
