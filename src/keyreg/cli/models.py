"""``keyreg models``: list bundled models or describe a model file."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model name or file to describe (default: list bundled models)")
    p.add_argument("--keypoints", action="store_true",
                   help="with a model: list every keypoint (name, FreeSurfer labels of its region)")


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
        beyond = "the image's background level" if c.preprocessing.intensity.outside == "background" else "zeros"
        print(f"input grid:    {grid}; beyond the image: {beyond}")
        print(f"weighting:     {c.weighting or 'uniform'}")
        if c.description:
            print(f"description:   {c.description}")
        for k, v in c.training.items():
            print(f"training.{k}: {v}")
        if c.regions is None:
            print(f"keypoints:     {c.architecture.num_keypoints}, unnamed (K-1 .. K-{c.architecture.num_keypoints})")
            return 0
        whole = sum(r.center is None for r in c.regions.regions)
        print(f"keypoints:     {len(c.regions)} named anatomical points ({whole} whole structures, "
              f"{len(c.regions) - whole} sub-regions); orientation search "
              f"{({True: 'auto'}.get(c.orientation_search, c.orientation_search) or 'off')}"
              + ("; check-view ensemble" if c.check_view_ensemble else "")
              + (f"; shift ensemble of {c.shift_ensemble_voxels:g} voxel(s)" if c.shift_ensemble_voxels else ""))
        if args.keypoints:
            for k, r in enumerate(c.regions.regions, start=1):
                print(f"  {k:4d}  {r.name:<58} labels {','.join(map(str, r.labels))}")
        else:
            shown = ", ".join(c.regions.names[:6])
            print(f"               {shown}, ... (--keypoints lists all)")
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
