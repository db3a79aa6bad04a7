"""Apply and invert saved transforms: the Python API behind ``keyreg apply`` and ``keyreg invert``.

Direction (``docs/conventions.md``): every stored transform is ``moving_from_fixed``: it maps a point
``p`` of the FIXED space (world RAS mm) to the matching point ``T(p)`` of the MOVING space.

* Images and label maps are *pulled*: ``out(p) = x(T(p))`` for every voxel centre ``p`` of the
  reference (fixed) grid; ``x`` lives in the moving space.
* Points go the other way: a point ``q`` of the moving space lands in the fixed space at ``T^-1(q)``
  (exact for linear transforms, Newton iterations otherwise, with the residual ``|T(p) - q|``
  returned).  That is what keeps a landmark on the same anatomy as the warped image.
  ``direction="fixed_to_moving"`` applies ``T`` itself.

Several transforms ``[T1, T2, ..., Tn]`` are composed into one map ``T = T1 o T2 o ... o Tn``: a
reference point goes through ``Tn`` first and ``T1`` last, and the input is resampled once,
``out(p) = x(T1(T2(...Tn(p))))``.  This is the order of ``antsApplyTransforms -t T1 -t T2`` and of
SimpleITK's ``CompositeTransform([T1, T2])``: list the transform nearest the moving image first,
e.g. ``[affine, field]`` for an affine registration followed by a deformable one computed from the
affinely aligned image.  Consecutive linear transforms are multiplied into one matrix.

Modules: :mod:`.saved` reads transforms (any format, with the grids recorded next to them) and
composes them; :mod:`.resample` applies them to images, label maps and points; :mod:`.inverse`
inverts them and :mod:`.save` writes inverses.
"""

from __future__ import annotations

from ..formats.tps import tps_from_dict
from ..transforms.compose import ComposedTransform
from .inverse import InverseResult, invert_on_grid, invert_saved_transform
from .resample import apply_transform, transform_points
from .save import save_inverse
from .saved import ALIGN_DIR_FILES, SavedTransform, compose, load_saved_transform, resolve_reference

__all__ = [
    "SavedTransform",
    "ComposedTransform",
    "InverseResult",
    "ALIGN_DIR_FILES",
    "load_saved_transform",
    "tps_from_dict",
    "compose",
    "resolve_reference",
    "apply_transform",
    "transform_points",
    "invert_on_grid",
    "invert_saved_transform",
    "save_inverse",
]
