"""Pieces shared by sub-commands' argument parsers."""

from __future__ import annotations

import argparse

__all__ = ["add_device_arguments", "add_search_argument", "add_exclude_argument", "parse_exclusions"]


def add_device_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: GPU when available)")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast for the network on GPU")


def add_search_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--orientation_search", choices=["always", "auto", "off"], default=None,
                   help="test-time orientation search of an anatomical model: always (the image is looked at "
                        "in the 24 rotations of the cube; robust to any orientation), auto (the image as it is "
                        "first; when that reading fails its checks, the search, half turns first, stopping at the "
                        "first pose that passes them; fast on upright images) "
                        "or off (default: the model's setting, auto for keyreg-anatomy)")


def add_exclude_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--exclude_keypoints", nargs="+", default=None, metavar="PATTERN",
                   help="leave keypoints whose name matches any of these globs out of every fit (fnmatch: "
                        "'Left-Hippocampus', '*Cortex/anterior*', 'K-1*'; unnamed models have the names "
                        "K-1 .. K-N); replaces the model's default list (keyreg-anatomy: 'Extracerebral-*'); "
                        "'none' uses every keypoint")


def parse_exclusions(patterns: list[str] | None) -> tuple[str, ...] | None:
    """``--exclude_keypoints``: not given -> ``None`` (the model's default); ``none`` -> ``()`` (every keypoint)."""
    from ..errors import ConfigError

    if patterns is None:
        return None
    if any(p.lower() == "none" for p in patterns):
        if len(patterns) > 1:
            raise ConfigError("--exclude_keypoints none (use every keypoint) cannot be combined with patterns")
        return ()
    return tuple(patterns)
