#!/usr/bin/env bash
# Train the bundled default model (keyreg-anatomy): anatomical keypoints learned from label maps.
# Usage: scripts/train_default.sh [LABELMAP_DIR] [STEPS] [SAVE_DIR]
#   LABELMAP_DIR: folder with training_seg_01..15.nii.gz (default ../shared/data/labelmaps); 01..12 train
#   STEPS:        steps of the second stage (the shipped model: see docs/models.md)
#   SAVE_DIR:     checkpoints, log.csv and the final model (default runs/anatomy; ignored by git)
# Seeded and resumable: run it again with RESUME=1 to continue exactly from the last checkpoint.
# Runs on CPU or GPU (on a GPU raise STEPS and BATCH); under `torchrun` the same command trains with DDP.
set -euo pipefail
MAPS=${1:-../shared/data/labelmaps}
STEPS=${2:-2000}
SAVE=${3:-runs/anatomy}
BATCH=${BATCH:-2}
TRAIN=$(for i in 01 02 03 04 05 06 07 08 09 10 11 12; do echo "$MAPS/training_seg_$i.nii.gz"; done)
EXTRA=()
if [[ "${RESUME:-0}" == 1 ]]; then EXTRA+=(--resume); fi
COMMON=(--max_rotation 30 --full_sphere_prob 0.5 --max_translation 20 --max_displacement 2
        --batch_size "$BATCH" --checkpoint_every 25 --no_progress)
# 1. from scratch: the regions are built from the training maps (map 01 is the reference; 181 keypoints
#    with the default splits), 900 steps, lr 1e-3 with a cosine decay
if [[ ! -f "$SAVE/stage1/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --name keyreg-anatomy --backbone truncatedunet \
      --num_levels 4 --num_truncated 2 --f_maps 16 --grid_shape 64 --voxel_size 4 "${COMMON[@]}" \
      --steps 900 --lr 1e-3 --lr_schedule cosine --seed 0 --save_dir "$SAVE/stage1" "${EXTRA[@]}"
fi
# 2. continued from stage 1 (same regions, carried in its config), lr 5e-4 with a cosine decay
keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage1/model.safetensors" "${COMMON[@]}" \
    --steps "$STEPS" --lr 5e-4 --lr_schedule cosine --seed 1 --save_dir "$SAVE/stage2" "${EXTRA[@]}"
# 3. install into the package (safetensors + JSON) as the default: scripts/install_model.py (see docs/models.md)
