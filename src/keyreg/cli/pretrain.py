"""``keyreg pretrain``: regress keypoints onto reference points that move with the image."""

from __future__ import annotations

import argparse

from . import train as _train


def add_arguments(p: argparse.ArgumentParser) -> None:
    _train.add_arguments(p, mode="pretrain")


def run(args: argparse.Namespace) -> int:
    return _train.run(args, mode="pretrain")
