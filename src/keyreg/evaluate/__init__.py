"""Accuracy and robustness evaluation: many pairs, explicit seeded perturbations, every align.

The protocol (``keyreg evaluate``):

* **Images** come with a segmentation each, from a directory pair, a CSV, or label maps with
  synthetic contrasts (:func:`images_from_directories`, :func:`images_from_csv`,
  :func:`images_from_label_maps`).  Every image has a ``subject`` and a ``modality``.
* **Pairs** (:func:`make_pairs`) are of three kinds: ``same_subject_cross_modality``,
  ``cross_subject_same_modality`` and ``cross_subject_cross_modality``.  An image is never paired
  with itself (same entry or same file).
* **Perturbations** (:func:`draw_perturbation`): the moving image is rotated by each angle of
  ``rotations`` about ONE axis — a random unit axis drawn per (pair, angle) from the seed, or a
  given axis — through the centre of its field of view, then scaled isotropically by a random
  factor in ``[1 - scaling, 1 + scaling]`` about that centre and translated by a random vector
  uniform in ``[-translation, translation]^3`` mm.  A rotation of 180° is a half turn (never the
  identity) and 135° is not 45°.
* **How the perturbation is applied** (``mode``): ``"header"`` multiplies the moving image's
  world-from-voxel affine by the perturbation ``P`` (``A' = P A``): the voxels are untouched, so
  nothing is interpolated or cropped, and the segmentation, which shares the affine, moves with
  it exactly.  keyreg works in world space (a ``ras`` network grid resamples the image onto an
  axis-aligned grid), so for it this is the same as rotating the content.  ``"resample"`` resamples
  the image (trilinear) and its segmentation (nearest) on their own grid through ``P``
  (``I'(x) = I(P^-1 x)``, corners may leave the field of view); it is needed for models whose
  network grid follows the image's voxel axes (``fov`` grids: the official IXI models), which
  would not see a header rotation.  ``"auto"`` (default) picks ``resample`` for ``fov`` models and
  ``header`` otherwise.  (A ``ras`` network grid is centred on the image's field of view, so a
  translation moves the grid with the image: translations test the fits and resampling, not the
  network.)
* **Synthetic contrasts** (label-map inputs): each contrast name is one seeded draw of per-label
  mean intensities shared by every label map (``t1``/``t2``/``pd`` follow those MRI contrasts with
  the training generator ``keyreg.train.synth``; noise, blur, bias and gamma are drawn per image).
* **Keypoints** are detected once per image and perturbation (cached), **metrics** (default hard
  Dice: background excluded, labels present in either map, labels absent from both not counted)
  are computed on the fixed grid for every align, plus ``none`` = before registration (the moving
  segmentation resampled through the identity in world space).

Outputs (:func:`write_outputs`): ``evaluation.csv`` (one row per pair, perturbation, align and
metric), ``summary.md`` (mean ± std per pair kind × align × rotation) and ``dice_vs_rotation.png``.

Modules, in the order of the protocol: :mod:`.datasets` (images with segmentations),
:mod:`.contrasts` (synthetic contrasts of label maps), :mod:`.pairs` (pair kinds),
:mod:`.perturbations` (seeded perturbations and applying them), :mod:`.protocol` (the loop, through
:class:`keyreg.pipeline.Registrar`) and :mod:`.report` (CSV, summary tables, plot); :mod:`.seeds`
derives every seed from names, so each draw is reproducible on its own.
"""

from __future__ import annotations

from ..pairing import PAIR_KINDS
from .datasets import EvalImage, images_from_csv, images_from_directories, images_from_label_maps
from .pairs import EvalPair, make_pairs
from .perturbations import Perturbation, PerturbMode, draw_perturbation, perturb
from .protocol import EvaluationResult, evaluate
from .report import CSV_COLUMNS, format_evaluation_summary, write_outputs

__all__ = [
    "PAIR_KINDS",
    "EvalImage",
    "EvalPair",
    "Perturbation",
    "PerturbMode",
    "EvaluationResult",
    "images_from_directories",
    "images_from_csv",
    "images_from_label_maps",
    "make_pairs",
    "draw_perturbation",
    "perturb",
    "evaluate",
    "write_outputs",
    "format_evaluation_summary",
    "CSV_COLUMNS",
]
