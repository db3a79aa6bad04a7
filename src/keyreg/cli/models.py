"""``keyreg models``: list bundled models or describe a model file."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model name or file to describe (default: list bundled models)")


def run(args: argparse.Namespace) -> int:
    from ..models import list_pretrained, load_model
    from ..models.checkpoint import _resolve_default

    if args.model:
        m = load_model(args.model)
        c = m.config
        g = c.preprocessing.grid
        n_params = sum(p.numel() for p in m.parameters())
        print(f"name:          {c.name}")
        print(f"architecture:  {c.architecture.describe()} ({n_params / 1e6:.2f} M parameters)")
        grid = (f"{g.mode}, {'x'.join(map(str, g.shape))}" +
                (f" at {'x'.join(f'{v:g}' for v in g.voxel_size)} mm" if g.mode == "ras" else
                 f", axes {g.permute}"))
        print(f"input grid:    {grid}")
        print(f"weighting:     {c.weighting or 'uniform'}")
        if c.description:
            print(f"description:   {c.description}")
        for k, v in c.training.items():
            print(f"training.{k}: {v}")
        return 0
    models = list_pretrained()
    if not models:
        print("no bundled models installed")
        return 0
    default = _resolve_default()
    width = max(len(n) for n in models)
    for name, c in models.items():
        mark = "*" if name == default else " "
        print(f"{mark} {name:<{width}}  {c.architecture.describe():<36} {c.description}")
    print("(* = default, used when no --load_path is given)")
    return 0
