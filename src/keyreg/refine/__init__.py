"""Dense refinement after the keypoint fit: affine and diffeomorphic (stationary velocity) instance
optimisation in the fixed image's physical space, with MIND-SSC (multi-modal) or LNCC similarity.

* :mod:`.similarity`: MIND-SSC descriptors, LNCC, Gaussian/box filters (pure functions).
* :mod:`.velocity`: level grids, scaling and squaring, composition, regularisation.
* :mod:`.optimize`: the coarse-to-fine Adam loops.
* :mod:`.run`: :func:`refine_transform` (start transform + images -> refined transform + report),
  the safeguard (:func:`~.run.safeguard_verdict`, from the images only) and the inverse.
* :mod:`.outputs`: :func:`refine_registration` (a Registration's aligns -> ``<align>+<stage>``) and
  their files (``warp.nii.gz``, ``inverse_warp.nii.gz``, ``refine.json``).
"""

from .optimize import AffineConfig, Budget, DeformableConfig, optimize_affine, optimize_velocity
from .outputs import RefinedAlignment, refine_registration, safeguard_note
from .run import (STAGES, RefinedTransform, RefineOptions, RefineResult, check_fixed_mask, inverse_field,
                  refine_transform, refined_name, safeguard_verdict)
from .similarity import SIMILARITIES, lncc_loss, mind_loss, mind_ssc, normalized_mutual_information
from .velocity import integrate_velocity, level_grid

__all__ = [
    "SIMILARITIES",
    "STAGES",
    "AffineConfig",
    "Budget",
    "DeformableConfig",
    "RefineOptions",
    "RefineResult",
    "RefinedAlignment",
    "RefinedTransform",
    "check_fixed_mask",
    "integrate_velocity",
    "inverse_field",
    "level_grid",
    "lncc_loss",
    "mind_loss",
    "mind_ssc",
    "normalized_mutual_information",
    "optimize_affine",
    "optimize_velocity",
    "refine_registration",
    "refine_transform",
    "refined_name",
    "safeguard_note",
    "safeguard_verdict",
]
