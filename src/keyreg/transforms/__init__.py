"""Closed-form transforms between keypoints (pure, batched, differentiable) and their evaluation.

All transforms map FIXED world points to MOVING world points (RAS mm): ``moving_from_fixed``.
"""

from .compose import ComposedTransform, compose_transforms
from .field import DEFAULT_FIELD_STRIDE, DisplacementField, SpatialTransform, check_field_stride, sample_field
from .invert import invert_points, map_to_fixed
from .linear import AffineTransform, fit_affine, fit_rigid
from .residuals import KeypointResiduals, keypoint_residuals, loo_errors, pair_confidence
from .robust import RobustFit, robust_fit
from .selection import NUM_PARAMS, identity_suffices, keep_identity_if_aligned, keypoint_motion_mm
from .spec import AlignSpec, fit_transform, parse_align, parse_aligns
from .tps import ThinPlateSpline, fit_tps, tps_kernel

__all__ = [
    "AffineTransform",
    "ComposedTransform",
    "compose_transforms",
    "ThinPlateSpline",
    "DisplacementField",
    "SpatialTransform",
    "AlignSpec",
    "fit_rigid",
    "fit_affine",
    "fit_tps",
    "fit_transform",
    "tps_kernel",
    "parse_align",
    "parse_aligns",
    "sample_field",
    "check_field_stride",
    "invert_points",
    "map_to_fixed",
    "identity_suffices",
    "NUM_PARAMS",
    "keep_identity_if_aligned",
    "keypoint_motion_mm",
    "DEFAULT_FIELD_STRIDE",
    "KeypointResiduals",
    "keypoint_residuals",
    "loo_errors",
    "pair_confidence",
    "RobustFit",
    "robust_fit",
]
