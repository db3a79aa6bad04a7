"""ITK/ANTs displacement-field NIfTI files (``*_warp.nii.gz``, ANTs ``1Warp.nii.gz``).

Convention: the field lives on the FIXED grid (NIfTI affine = the fixed image's RAS vox2world) and
holds ``u(p)`` in mm with ``T(p) = p + u(p)`` the MOVING point (``moving_from_fixed``).  On disk the
array is ``(X, Y, Z, 1, 3)`` with intent ``vector`` (1007) and LPS components: component 0 = +Left,
1 = +Posterior, 2 = +Superior, i.e. the RAS vector with components 0 and 1 negated.  In memory
(keyreg) the components are RAS.  Outside the grid ``u = 0``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .. import nifti_gzip
from ..atomic import atomic_path
from ..errors import ImageIOError, OutputError, ShapeError
from ..geometry import as_affine_tensor, voxel_sizes
from ..io import check_affine, is_nifti_path
from ..transforms.field import DisplacementField
from ._common import PathLike, existing_file, reading

__all__ = ["write_displacement_field", "read_displacement_field", "field_from_displacement",
           "displacement_from_field", "INTENT_VECTOR", "INTENT_DISPVECT"]

#: NIfTI intent codes accepted for displacement fields.
INTENT_DISPVECT = 1006
INTENT_VECTOR = 1007

_FLIP = np.array([-1.0, -1.0, 1.0], dtype=np.float32)


def _check_affine(affine, name: str = "displacement field") -> np.ndarray:
    return check_affine(affine, name, ShapeError)


def _check_displacement(displacement_ras) -> np.ndarray:
    if torch.is_tensor(displacement_ras):
        displacement_ras = displacement_ras.detach().cpu().numpy()
    d = np.asarray(displacement_ras)
    if d.ndim != 4 or d.shape[3] != 3:
        raise ShapeError(f"displacement must be (X, Y, Z, 3), got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ShapeError("displacement contains NaN or Inf")
    return d


def write_displacement_field(path: PathLike, displacement_ras, affine,
                             header: nib.Nifti1Header | None = None) -> Path:
    """Write a displacement field as an ITK/ANTs-compatible NIfTI file, atomically.

    Args:
        path: ``.nii`` or ``.nii.gz`` output.
        displacement_ras: ``(X, Y, Z, 3)`` ``u(p)`` in mm, RAS components, on the fixed grid:
            ``T(p) = p + u(p)`` maps a fixed point to the moving point.
        affine: ``(4, 4)`` RAS world-from-voxel affine of the fixed grid.
        header: optional fixed-image NIfTI-1 header to start from (copied; its geometry, data
            type, scaling, intent and units are replaced; a NIfTI-2 header is ignored).

    Returns:
        ``path``.  The file holds float32 ``(X, Y, Z, 1, 3)`` LPS components (0 and 1 negated),
        intent ``vector`` (1007), xyz units mm, qform = sform = ``affine`` with both codes 1.

    Raises:
        ShapeError: wrong shapes or non-finite values.  OutputError: bad name or unwritable.
    """
    if not is_nifti_path(path):
        raise OutputError(f"{path}: displacement field name must end in .nii or .nii.gz")
    d = _check_displacement(displacement_ras)
    a = _check_affine(affine)
    # float32 LPS components in Fortran order (NIfTI's): one pass, no further copy when written
    lps = np.empty(d.shape, dtype=np.float32, order="F")
    np.multiply(d, _FLIP, out=lps, casting="unsafe")
    lps = lps[:, :, :, None, :]
    hdr = None
    if isinstance(header, nib.Nifti1Header) and not isinstance(header, nib.Nifti2Header):
        hdr = nib.Nifti1Header.from_header(header)  # a NIfTI-2 header is not reused
    if hdr is not None:
        hdr.set_data_dtype(np.float32)  # before the image is built, so no scaling is inherited
    img = nib.Nifti1Image(lps, a, header=hdr)
    h = img.header
    h.set_data_dtype(np.float32)
    h.set_slope_inter(1.0, 0.0)
    h["cal_min"] = 0.0
    h["cal_max"] = 0.0
    img.set_qform(a, code=1)
    img.set_sform(a, code=1)
    h.set_zooms((*voxel_sizes(a), 1.0, 1.0))
    h.set_intent("vector", (), name="")
    h.set_xyzt_units(xyz="mm", t="unknown")
    h["descrip"] = b"keyreg displacement u, LPS mm"
    with atomic_path(path) as tmp:
        nifti_gzip.write_nifti(img, tmp)  # looked up at call time: one place writes NIfTI files
    return Path(path)


def read_displacement_field(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement-field NIfTI file.

    Args:
        path: a NIfTI file of shape ``(X, Y, Z, 1, 3)`` with intent 1006 (disp. vector) or 1007
            (vector), LPS components (as written by ITK, ANTs and :func:`write_displacement_field`).

    Returns:
        ``(displacement_ras, affine)``: ``(X, Y, Z, 3)`` float32 ``u(p)`` in mm with RAS
        components (``T(p) = p + u(p)``, fixed -> moving) and the ``(4, 4)`` float64 RAS affine of
        the grid (nibabel's best affine).

    Raises:
        ImageIOError: missing/corrupt file, another shape (e.g. the 4-D ``(X, Y, Z, 3)`` layout, which
            ITK reads as a scalar image), another intent, or non-finite values.
    """
    p = existing_file(path, "a displacement field NIfTI")
    if not is_nifti_path(p):
        raise ImageIOError(f"{p}: not a NIfTI file name (expected .nii or .nii.gz)")
    with reading(p, "a displacement field NIfTI"):
        try:
            img = nib.load(str(p))
        except nib.filebasedimages.ImageFileError as e:
            raise ValueError(str(e)) from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageIOError(f"{p}: not a NIfTI image")
        shape = img.shape
        if len(shape) != 5 or shape[3] != 1 or shape[4] != 3:
            raise ImageIOError(f"{p}: a displacement field must have shape (X, Y, Z, 1, 3) "
                               f"(ITK/ANTs layout), got {tuple(shape)}")
        intent = int(img.header["intent_code"])
        if intent not in (INTENT_DISPVECT, INTENT_VECTOR):
            raise ImageIOError(f"{p}: intent code {intent}; a displacement field needs 1007 (vector) "
                               "or 1006 (displacement vector)")
        try:
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except (zlib.error, EOFError) as e:
            raise ValueError(f"corrupt or truncated data: {e}") from None
        if not np.all(np.isfinite(data)):
            raise ImageIOError(f"{p}: displacement field contains NaN or Inf")
        d = data[:, :, :, 0, :] * _FLIP
        affine = np.asarray(img.affine, dtype=np.float64)
    return np.ascontiguousarray(d, dtype=np.float32), affine


def field_from_displacement(displacement_ras, affine) -> DisplacementField:
    """Wrap a ``(X, Y, Z, 3)`` RAS displacement array as a keyreg :class:`DisplacementField`.

    Args:
        displacement_ras: ``(X, Y, Z, 3)`` mm, RAS components, ``T(p) = p + u(p)`` (fixed -> moving).
        affine: ``(4, 4)`` RAS world-from-voxel affine of the grid.

    Returns:
        A field with batch 1: ``displacement`` ``(1, 3, X, Y, Z)`` float32, ``grid_affine`` float64.
    """
    d = _check_displacement(displacement_ras)
    a = _check_affine(affine)
    t = torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)).permute(3, 0, 1, 2)[None].contiguous()
    return DisplacementField(t, as_affine_tensor(a))


def displacement_from_field(field: DisplacementField, shape: Sequence[int], affine) -> np.ndarray:
    """The ``(X, Y, Z, 3)`` RAS displacement array of a batch-1 field on the grid ``(shape, affine)``.

    A field on a coarser grid that shares the target grid's corner voxels (as produced by
    :func:`keyreg.transforms.sample_field` with ``stride > 1``) is interpolated with
    :meth:`DisplacementField.upsample` (trilinear, corner-aligned).

    Args:
        field: batch-1 :class:`DisplacementField` (RAS mm, ``T(p) = p + u(p)``).
        shape: ``(X, Y, Z)`` of the target (fixed) grid.
        affine: ``(4, 4)`` RAS world-from-voxel affine of the target grid.

    Returns:
        ``(X, Y, Z, 3)`` float32, RAS mm.

    Raises:
        ShapeError: batch size other than 1, or a field grid that does not span the target grid.
    """
    if field.batch_size != 1:
        raise ShapeError(f"field must have batch size 1, got {field.batch_size}")
    shape = tuple(int(s) for s in shape[:3])
    a = _check_affine(affine)
    ga = field.grid_affine.detach().cpu().double().numpy()
    # The field's grid must be the target grid or a corner-aligned sub-grid of it.
    steps = [(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(shape, field.shape)]
    expected = a @ np.diag([*steps, 1.0])
    tol = 1e-4 * max(1.0, float(np.max(np.abs(a))))
    if np.abs(ga - expected).max() > tol:
        raise ShapeError(f"the field's grid {tuple(field.shape)} is not a corner-aligned sub-grid of "
                         f"the target grid {shape} (affines differ)")
    if tuple(field.shape) != shape:
        field = field.upsample(shape, a)
    return field.displacement[0].permute(1, 2, 3, 0).detach().cpu().float().numpy()
