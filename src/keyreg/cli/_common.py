"""Pieces shared by sub-commands' argument parsers."""

from __future__ import annotations

import argparse

__all__ = ["add_device_arguments"]


def add_device_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: GPU when available)")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast for the network on GPU")
