#!/usr/bin/env bash
# Train the bundled default model (keyreg-anatomy): anatomical keypoints learned from label maps.
# Usage: scripts/train_default.sh [LABELMAP_DIR] [STEPS] [SAVE_DIR] [STEPS4] [STEPS5] [STEPS6] [STEPS7] [STEPS9] [STEPS12]
#   LABELMAP_DIR: folder with training_seg_01..15.nii.gz (default ../shared/data/labelmaps); 01..12 train
#   STEPS:        steps of the third stage (the shipped model: see docs/models.md)
#   SAVE_DIR:     checkpoints, log.csv and the final model (default runs/anatomy; ignored by git)
#   STEPS4:       steps of the fourth stage (0 skips it and the fifth; the final model is then stage 3's)
#   STEPS5:       steps of the fifth stage (0 skips it and the sixth; the final model is then stage 4's)
#   STEPS6:       steps of the sixth stage (0 skips it and the seventh; the final model is then stage 5's)
#   STEPS7:       steps of the seventh stage (0 skips it and the ninth; the final model is then stage 6's)
#   STEPS9:       steps of the ninth stage's cosine (0 skips it; the final model is then stage 7's); it stops at
#                 five sixths of them (stage 8 was a trial that was not adopted: docs/models.md)
#   STEPS12:      steps of the twelfth stage (fields of view that end within the head; 0 skips it and the final
#                 model is then stage 9's; stages 10 and 11 were trials that were not adopted)
# Seeded and resumable: a stage whose model.safetensors exists is skipped; run it again with RESUME=1 to continue
# the unfinished stage exactly from its last checkpoint.
# Runs on CPU or GPU (on a GPU raise STEPS and BATCH); under `torchrun` the same command trains with DDP.
set -euo pipefail
MAPS=${1:-../shared/data/labelmaps}
STEPS=${2:-2500}
SAVE=${3:-runs/anatomy}
STEPS4=${4:-2400}
STEPS5=${5:-3000}
STEPS6=${6:-8000}
STEPS7=${7:-9000}
STEPS9=${8:-3300}
STEPS12=${9:-1600}
BATCH=${BATCH:-2}
TRAIN=$(for i in 01 02 03 04 05 06 07 08 09 10 11 12; do echo "$MAPS/training_seg_$i.nii.gz"; done)
# --resume for a stage that has checkpoints (RESUME=1); a stage not yet begun starts afresh
resume() { if [[ "${RESUME:-0}" == 1 && -f "$1/checkpoints/latest" ]]; then echo --resume; fi; }
COMMON=(--max_rotation 30 --full_sphere_prob 0.5 --max_translation 20 --max_displacement 2
        --batch_size "$BATCH" --checkpoint_every 25 --no_progress)
# 1. from scratch: the regions are built from the training maps (map 01 is the reference; 181 keypoints
#    with the default splits), 900 steps, lr 1e-3 with a cosine decay
if [[ ! -f "$SAVE/stage1/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --name keyreg-anatomy --backbone truncatedunet \
      --num_levels 4 --num_truncated 2 --f_maps 16 --grid_shape 64 --voxel_size 4 "${COMMON[@]}" \
      --steps 900 --lr 1e-3 --lr_schedule cosine --seed 0 --save_dir "$SAVE/stage1" $(resume "$SAVE/stage1")
fi
# 2. continued from stage 1 (same regions, carried in its config), lr 5e-4 on a 2000-step cosine, stopped at
#    step 550 (stage 3, closer to the poses the orientation search shows the network, replaces the rest)
if [[ ! -f "$SAVE/stage2/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage1/model.safetensors" "${COMMON[@]}" \
      --steps 2000 --stop_at 550 --lr 5e-4 --lr_schedule cosine --seed 1 --save_dir "$SAVE/stage2" $(resume "$SAVE/stage2")
fi
# 3. near-canonical poses: the orientation search presents the network every image within ~63 degrees of
#    the canonical pose (24 cube rotations) and then canonically, so the whole sphere is rare here
#    (10 %) and rotations are uniform in [0, 65] degrees; lr 3e-4, cosine over STEPS
NEAR=(--max_rotation 65 --full_sphere_prob 0.1 --max_translation 20 --max_displacement 2
      --batch_size "$BATCH" --checkpoint_every 25 --no_progress)
if [[ ! -f "$SAVE/stage3/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage2/model.safetensors" "${NEAR[@]}" \
      --steps "$STEPS" --lr 3e-4 --lr_schedule cosine --seed 2 --save_dir "$SAVE/stage3" $(resume "$SAVE/stage3")
fi
# 4. the same poses again, a warm restart at lr 2e-4 on a cosine over STEPS4 (stage 3 ended on a plateau
#    set by its decayed learning rate: median keypoint error 6.8 mm over its last 750 steps)
if [[ "$STEPS4" -gt 0 && ! -f "$SAVE/stage4/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage3/model.safetensors" "${NEAR[@]}" \
      --steps "$STEPS4" --lr 2e-4 --lr_schedule cosine --seed 3 --save_dir "$SAVE/stage4" $(resume "$SAVE/stage4")
fi
# 5. a second warm restart from stage 4, the same poses and learning rate, new samples (seed 4), a cosine over
#    STEPS5 (stage 4 had still gained 0.6 mm of median keypoint error on the held-out maps)
if [[ "$STEPS4" -gt 0 && "$STEPS5" -gt 0 && ! -f "$SAVE/stage5/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage4/model.safetensors" "${NEAR[@]}" \
      --steps "$STEPS5" --lr 2e-4 --lr_schedule cosine --seed 4 --save_dir "$SAVE/stage5" $(resume "$SAVE/stage5")
fi
# 6. a longer warm restart from stage 5 at lr 3e-4 on a cosine over STEPS6, with twice the nonlinear deformation
#    (up to 4 mm): the held-out keypoints of stage 5 placed an affinely posed layout and read little of the
#    subject's own anatomy (benchmarks/keypoint_error_parts.py); larger deformations vary the anatomy of the
#    12 training subjects as much as real subjects differ beyond an affine (about 2 mm at the centroids)
if [[ "$STEPS4" -gt 0 && "$STEPS5" -gt 0 && "$STEPS6" -gt 0 && ! -f "$SAVE/stage6/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage5/model.safetensors" "${NEAR[@]}" --max_displacement 4 \
      --steps "$STEPS6" --lr 3e-4 --lr_schedule cosine --seed 5 --save_dir "$SAVE/stage6" $(resume "$SAVE/stage6")
fi
# 7. a warm restart from stage 6 with its poses and deformations, lr 2e-4 on a cosine over STEPS7, new samples
#    (seed 6): stage 6's held-out keypoint error was still falling at its end
if [[ "$STEPS4" -gt 0 && "$STEPS5" -gt 0 && "$STEPS6" -gt 0 && "$STEPS7" -gt 0 && ! -f "$SAVE/stage7/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage6/model.safetensors" "${NEAR[@]}" --max_displacement 4 \
      --steps "$STEPS7" --lr 2e-4 --lr_schedule cosine --seed 6 --save_dir "$SAVE/stage7" $(resume "$SAVE/stage7")
fi
# 9. a warm restart from stage 7 on twice the subjects: every training map and its left-right mirror image
#    (--mirror_maps; stage 7 read the mirrored training subjects about as badly as held-out ones), the same
#    poses and deformations, lr 1e-4 on a cosine over STEPS9, stopped at five sixths of it (seed 8)
if [[ "$STEPS4" -gt 0 && "$STEPS5" -gt 0 && "$STEPS6" -gt 0 && "$STEPS7" -gt 0 && "$STEPS9" -gt 0 && ! -f "$SAVE/stage9/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage7/model.safetensors" "${NEAR[@]}" --max_displacement 4 \
      --mirror_maps --steps "$STEPS9" --stop_at $((STEPS9 * 5 / 6)) --lr 1e-4 --lr_schedule cosine --seed 8 \
      --save_dir "$SAVE/stage9" $(resume "$SAVE/stage9")
fi
# 12. from stage 9, the same poses, deformations and subjects, and 30 % of the images with a field of view that
#    ends within the head (--fov_cut: zero beyond a plane, or outside a slab; the targets stay the true centroids):
#    stage 9 squeezed the whole layout into what a partial scan shows (benchmarks/partial_fov.py); lr 1e-4 on a
#    cosine over STEPS12 (seed 12)
if [[ "$STEPS4" -gt 0 && "$STEPS5" -gt 0 && "$STEPS6" -gt 0 && "$STEPS7" -gt 0 && "$STEPS9" -gt 0 && "$STEPS12" -gt 0 \
      && ! -f "$SAVE/stage12/model.safetensors" ]]; then
  keyreg pretrain --label_maps $TRAIN --load_path "$SAVE/stage9/model.safetensors" "${NEAR[@]}" --max_displacement 4 \
      --mirror_maps --fov_cut 0.3 --steps "$STEPS12" --lr 1e-4 --lr_schedule cosine --seed 12 \
      --save_dir "$SAVE/stage12" $(resume "$SAVE/stage12")
fi
# install into the package (safetensors + JSON) as the default: scripts/install_model.py (see docs/models.md)
