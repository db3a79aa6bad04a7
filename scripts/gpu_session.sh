#!/usr/bin/env bash
# One prepared run on a lent CUDA GPU (the workplace's `device` tool): continue training the bundled model for a
# fixed wall-time budget, validate it briefly, and time the 1 mm registration on the GPU. Nothing depends on it.
#
#   scripts/gpu_session.sh prepare        # here, once: wheels the GPU image lacks (nibabel, isal) into .whl/
#                                         # and the training label maps into .gpu_data/ (both ignored by git)
#   device run, carry [".whl", ".gpu_data"], timeout_s 600:
#       bash scripts/gpu_session.sh run   # there: results under $OUT (model, log.csv, timings.txt)
#
# The run stays inside one 10-minute command: a throughput probe (20 steps), training for TRAIN_MINUTES (default 6)
# with the cosine schedule sized from the probe, then the timings. Back here: scripts/calibrate_aligned.py
# --write on $OUT's model, scripts/install_model.py, benchmarks/model_validation.py (docs/models.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MAPS=${MAPS:-../shared/data/labelmaps}

if [[ "${1:-}" == prepare ]]; then
  mkdir -p .whl .gpu_data
  grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "nibabel>=5.0" "isal>=1.6"
  cp "$MAPS"/training_seg_*.nii.gz .gpu_data/
  du -sh .whl .gpu_data
  exit 0
fi
[[ "${1:-}" == run ]] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/keyreg_gpu}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-6}
BATCH=${BATCH:-16}
if ! python3 -c "import nibabel, isal" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
TRAIN=$(for i in 01 02 03 04 05 06 07 08 09 10 11 12; do echo ".gpu_data/training_seg_$i.nii.gz"; done)
# the poses, deformations and mirrored subjects of stage 9 (scripts/train_default.sh), from the bundled (stage-9)
# weights, a warm restart at lr 2e-4 with new samples (seed 7; stages 6, 7 and 9 used seeds 5, 6 and 8)
POSES=(--max_rotation 65 --full_sphere_prob 0.1 --max_translation 20 --max_displacement 4 --mirror_maps)
pretrain() { python3 -m keyreg.cli pretrain --label_maps $TRAIN \
    --load_path src/keyreg/pretrained/keyreg-anatomy.safetensors "${POSES[@]}" --batch_size "$BATCH" \
    --lr 2e-4 --lr_schedule cosine --seed 7 --device "$DEVICE" --no_progress "$@"; }

# 1. throughput probe: 20 steps, pairs per second from the log's last row
rm -rf "$WORK"
pretrain --steps 20 --checkpoint_every 0 --save_dir "$WORK/probe" > "$OUT/probe.txt" 2>&1
RATE=$(python3 -c "import csv,sys; r=list(csv.DictReader(open('$WORK/probe/log.csv'))); print(r[-1]['pairs_per_s'])")
STEPS=$(python3 -c "print(max(20, int(float('$RATE') * 60 * $TRAIN_MINUTES / $BATCH)))")
echo "probe: $RATE pairs/s at batch $BATCH -> $STEPS steps in $TRAIN_MINUTES min" | tee "$OUT/timings.txt"

# 2. training: the cosine spans STEPS; --max_minutes stops it cleanly if the probe was optimistic
S=$(date +%s)
pretrain --steps "$STEPS" --max_minutes "$TRAIN_MINUTES" --checkpoint_every 200 --save_dir "$WORK/train" \
    > "$OUT/train.txt" 2>&1
echo "training: $(( $(date +%s) - S )) s wall, $(tail -n 1 "$WORK/train/log.csv" | cut -d, -f1) steps" \
    | tee -a "$OUT/timings.txt"
cp "$WORK/train/model.safetensors" "$WORK/train/model.json" "$WORK/train/log.csv" "$OUT/"

# 3. the 1 mm pair of benchmarks/speed_1mm.py on the GPU: affine only, the full command, and the affine with
#    a deformable refinement (one run each)
[[ "${SKIP_TIMING:-0}" == 1 ]] && exit 0
python3 - "$OUT" "$DEVICE" <<'PY' >> "$OUT/timings.txt" 2>&1
import subprocess, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import speed_1mm
speed_1mm.LABELMAPS = Path(".gpu_data")       # the carried maps instead of ../shared
paths = speed_1mm.build_pair(Path(tempfile.mkdtemp()) / "pair")
base = ["python3", "-m", "keyreg.cli", "register", "--moving", str(paths["moving"]), "--fixed", str(paths["fixed"]),
        "--device", sys.argv[2]]
full = base + ["--moving_seg", str(paths["moving_seg"]), "--fixed_seg", str(paths["fixed_seg"]),
               "--list_of_aligns", "rigid", "affine", "tps_0", "tps_10",
               "--list_of_metrics", "harddice", "hausd", "jdstd", "--save_eval_to_disk"]
refine = base + ["--list_of_aligns", "affine", "--refine", "deformable"]  # issue 12: refinement on the GPU
for name, cmd in (("affine only, no saving", base + ["--list_of_aligns", "affine"]), ("full command", full),
                  ("affine + deformable refinement, 1 mm", refine)):
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        r = subprocess.run(cmd + ["--save_dir", d], capture_output=True, text=True)
        print(f"{name}: {time.perf_counter() - t:.1f} s wall, exit {r.returncode}")
        print("\n".join(r.stdout.splitlines()[-25:]), r.stderr[-2000:])
PY
cat "$OUT/timings.txt"
