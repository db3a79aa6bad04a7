"""Install a trained anatomical model into the package as a bundled model and make it the default.

    python scripts/install_model.py runs/anat/stage12/model.safetensors \
        --steps 900+550+2500+2400+3000+8000+9000+2750+1600 --wall "..." --images 122800
    python scripts/calibrate_aligned.py src/keyreg/pretrained/keyreg-anatomy.safetensors --write

(calibrated after installing: the tolerance depends on the shift ensemble, if one is set here)

Writes src/keyreg/pretrained/<name>.safetensors + .json (no pickles) and src/keyreg/pretrained/DEFAULT.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

from keyreg.errors import KeyregError
from keyreg.models.checkpoint import PRETRAINED_DIR, load_model, save_model
from keyreg.preprocess import OUTSIDE_MODES

BACKBONES = {"truncatedunet": "truncated U-Net", "unet": "U-Net", "conv": "convolutional network"}


def describe_network(config) -> str:
    """``truncated U-Net, 64^3 at 4 mm``: the backbone and the network input grid of a model config."""
    grid = config.preprocessing.grid
    shape = f"{grid.shape[0]}^3" if len(set(grid.shape)) == 1 else "x".join(map(str, grid.shape))
    vox = grid.voxel_size
    at = f"{vox[0]:g} mm" if len(set(vox)) == 1 else "x".join(f"{v:g}" for v in vox) + " mm"
    return f"{BACKBONES.get(config.architecture.backbone, config.architecture.backbone)}, {shape} at {at}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="trained model (.safetensors of a keyreg run)")
    p.add_argument("--name", default="keyreg-anatomy")
    p.add_argument("--steps", required=True, help="steps of each stage, e.g. 900+2000")
    p.add_argument("--images", type=int, required=True, help="training images seen")
    p.add_argument("--wall", required=True, help="wall time and machine, free text")
    p.add_argument("--regions_stats", help="JSON with the regions' consistency statistics")
    p.add_argument("--orientation_search", choices=["always", "auto"], default="auto",
                   help="the model's orientation search (auto: the full search only when the upright pass "
                        "does not fit the template; benchmarks/search_modes.py)")
    p.add_argument("--shift_ensemble_voxels", type=float, default=0.0,
                   help="average the final keypoints over readings shifted by this many network voxels "
                        "(default 0: one reading; 1 lowers the keypoint error by about 0.2 mm at 4 more "
                        "passes per image, see docs/models.md)")
    p.add_argument("--check_view_ensemble", action=argparse.BooleanOptionalAction, default=True,
                   help="average the final keypoints with the orientation search's check pass (default: on; "
                        "no extra pass, see docs/models.md)")
    p.add_argument("--outside", choices=OUTSIDE_MODES, default="background",
                   help="what the network sees beyond an image's field of view (default: the image's "
                        "background level; see keyreg.preprocess)")
    args = p.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", args.name):
        raise SystemExit(f"install_model: error: --name {args.name!r} must be a plain file stem "
                         "(letters, digits, '.', '_', '-'; not starting with '.')")
    stats = None
    if args.regions_stats:
        if not Path(args.regions_stats).is_file():
            raise SystemExit(f"install_model: error: --regions_stats {args.regions_stats} does not exist")
        try:
            stats = json.loads(Path(args.regions_stats).read_text())
        except (OSError, UnicodeError, ValueError) as e:
            raise SystemExit(f"install_model: error: --regions_stats {args.regions_stats}: not readable JSON ({e})")
    try:  # a file or a bundled name; a missing or unreadable model is one line
        m = load_model(args.model)
    except KeyregError as e:
        raise SystemExit(f"install_model: error: {e}") from None
    c = m.config
    if c.regions is None:
        raise SystemExit("not an anatomical model (no regions in its config)")
    c.name = args.name
    c.orientation_search = args.orientation_search
    c.shift_ensemble_voxels = args.shift_ensemble_voxels
    c.check_view_ensemble = args.check_view_ensemble
    c.fit_exclude = c.fit_exclude or ("Extracerebral-*",)
    c.preprocessing = replace(c.preprocessing, intensity=replace(c.preprocessing.intensity, outside=args.outside))
    c.aligned_tolerance_mm = 0.0  # depends on the ensembles: calibrated on the installed model
    print(f"next: python scripts/calibrate_aligned.py {PRETRAINED_DIR / args.name}.safetensors --write")
    c.description = (f"anatomical keypoints: {len(c.regions)} named region centroids; {describe_network(c)}; "
                     "any orientation (search), any MRI contrast")
    c.training = {
        "data": "../shared/data/labelmaps training_seg_01..12 (synthetic contrasts); validation 13..15",
        "command": "scripts/train_default.sh ../shared/data/labelmaps 2500 runs/anat 2400 3000 8000 9000 3300 1600",
        "steps": args.steps, "images_seen": args.images, "wall_time": args.wall,
        "batch": "2 pairs (4 images) per step", "model_card": "docs/models.md",
    }
    if stats is not None:
        c.training["regions_consistency"] = stats
    weights, config = save_model(m, PRETRAINED_DIR / args.name)
    (PRETRAINED_DIR / "DEFAULT").write_text(args.name + "\n")
    print("installed", weights, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
