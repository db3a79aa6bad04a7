"""Install a trained anatomical model into the package as a bundled model and make it the default.

    python scripts/install_model.py runs/anat/stage9/model.safetensors \
        --steps 900+550+2500+2400+3000+8000+9000+2750 --wall "..." --images 116400
    python scripts/calibrate_aligned.py src/keyreg/pretrained/keyreg-anatomy.safetensors --write

(calibrated after installing: the tolerance depends on the shift ensemble, if one is set here)

Writes src/keyreg/pretrained/<name>.safetensors + .json (no pickles) and src/keyreg/pretrained/DEFAULT.
"""

from __future__ import annotations

import argparse
import json

from keyreg.models.checkpoint import PRETRAINED_DIR, load_model, save_model


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
                        "no extra pass under auto, see docs/models.md)")
    args = p.parse_args()
    m = load_model(args.model)
    c = m.config
    if c.regions is None:
        raise SystemExit("not an anatomical model (no regions in its config)")
    c.name = args.name
    c.orientation_search = args.orientation_search
    c.shift_ensemble_voxels = args.shift_ensemble_voxels
    c.check_view_ensemble = args.check_view_ensemble
    c.fit_exclude = c.fit_exclude or ("Extracerebral-*",)
    c.aligned_tolerance_mm = 0.0  # depends on the ensembles: calibrated on the installed model
    print(f"next: python scripts/calibrate_aligned.py {PRETRAINED_DIR / args.name}.safetensors --write")
    c.description = (f"anatomical keypoints: {len(c.regions)} named region centroids; truncated U-Net, 64^3 at 4 mm; "
                     "any orientation (search), any MRI contrast")
    c.training = {
        "data": "../shared/data/labelmaps training_seg_01..12 (synthetic contrasts); validation 13..15",
        "command": "scripts/train_default.sh ../shared/data/labelmaps 2500 runs/anat 2400 3000 8000 9000 3300",
        "steps": args.steps, "images_seen": args.images, "wall_time": args.wall,
        "batch": "2 pairs (4 images) per step", "model_card": "docs/models.md",
    }
    if args.regions_stats:
        c.training["regions_consistency"] = json.load(open(args.regions_stats))
    weights, config = save_model(m, PRETRAINED_DIR / args.name)
    (PRETRAINED_DIR / "DEFAULT").write_text(args.name + "\n")
    print("installed", weights, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
