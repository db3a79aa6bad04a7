"""Pieces shared by sub-commands' argument parsers."""

from __future__ import annotations

import argparse

__all__ = ["add_device_arguments", "add_search_argument"]


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
