"""``keyreg pretrain``: learn anatomical keypoints: each keypoint regressed onto
the centroid of a named region of the (warped) training label map, plus a dense heatmap-vs-mask term."""

from __future__ import annotations

import argparse

from . import train as _train


def add_arguments(p: argparse.ArgumentParser) -> None:
    _train.add_arguments(p, mode="pretrain")


def run(args: argparse.Namespace) -> int:
    return _train.run(args, mode="pretrain")
