"""Reading and writing volumes (NIfTI and MGZ through nibabel) with their geometry.

A :class:`Volume` pairs a 3-D array in nibabel axis order ``(i, j, k)`` with its 4x4
``world_from_voxel`` affine (RAS+ mm).  Everything a user may hand to keyreg — a path, a nibabel
image, a ``(array, affine)`` pair, a torch tensor with an affine, or a :class:`Volume` — goes
through :func:`load_volume`, which validates it once, at the boundary.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from . import nifti_gzip
from .atomic import atomic_path
from .errors import ConfigError, ImageContentError, ImageIOError, KeyregError, OutputError, first_line
from .geometry import voxel_sizes
from .nifti_gzip import TORCH_COPY_DTYPES

__all__ = ["Volume", "load_volume", "load_volumes", "save_volume", "read_grid", "grid_volume", "NIFTI_SUFFIXES",
           "IMAGE_SUFFIXES", "is_nifti_path", "is_image_path", "nifti_stem", "MAX_VOXELS", "check_same_grid",
           "check_affine", "is_valid_affine", "smallest_integer_dtype"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Every image file keyreg reads: NIfTI, and FreeSurfer MGH/MGZ (outputs are always NIfTI).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
#: Largest volume accepted (voxels); 1024^3 float32 is already 4 GiB.
MAX_VOXELS = 1024**3

VolumeKind = Literal["image", "labels"]


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz``."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_image_path(path: str | os.PathLike) -> bool:
    """True for the image files keyreg reads: ``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh``."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


_INVALID_AFFINE = "invalid affine (must be a finite, invertible 4x4 matrix with the bottom row 0 0 0 1)"


def _affine_problem(a: np.ndarray) -> str | None:
    """Why ``a`` is not a usable world-from-voxel affine (``None``: it is)."""
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or not np.allclose(a[3], (0, 0, 0, 1), atol=1e-6):
        return _INVALID_AFFINE
    if abs(float(np.linalg.det(a[:3, :3]))) < 1e-12:
        if np.linalg.matrix_rank(a[:3, :3]) < 3:
            return _INVALID_AFFINE
        sizes = " x ".join(f"{v:.3g}" for v in voxel_sizes(a))
        return f"voxel sizes {sizes} mm are too small (the affine's determinant is under 1e-12); are the voxel sizes in mm?"
    return None


def is_valid_affine(a: np.ndarray) -> bool:
    """True for a finite ``(4, 4)`` matrix with the bottom row ``0 0 0 1`` whose linear part is
    invertible (``|det| >= 1e-12``)."""
    return _affine_problem(a) is None


def check_affine(affine: Any, where: str, error: type[KeyregError] = ImageContentError) -> np.ndarray:
    """``affine`` as a float64 4x4 world-from-voxel matrix; ``error`` (default
    :class:`ImageContentError`) unless it is finite and invertible.  The one place this is checked,
    for images, grids and the geometry that transform files record (``formats``: ``ShapeError``
    for an argument, ``ImageIOError`` for a file)."""
    if hasattr(affine, "detach"):
        affine = affine.detach().cpu().double().numpy()
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    problem = _INVALID_AFFINE if a is None else _affine_problem(a)
    if problem is not None:
        raise error(f"{where}: {problem}")
    return a


def check_same_grid(vol: "Volume", image: "Volume", role: str = "segmentation") -> None:
    """``vol`` (a segmentation) must lie on ``image``'s grid: equal shapes and affines (1e-3 mm)."""
    if vol.shape != image.shape:
        raise ImageContentError(f"{vol.name}: {role} grid {vol.shape} does not match its image grid {image.shape} "
                                "(shapes and affines must be equal)")
    if not np.allclose(vol.affine, image.affine, atol=1e-3):
        diff = float(np.abs(np.asarray(vol.affine) - np.asarray(image.affine)).max())
        raise ImageContentError(f"{vol.name}: {role} grid does not match its image grid: same shape {vol.shape}, "
                                f"affines differ by up to {diff:.3g} (they must be equal within 1e-3)")


@dataclass
class Volume:
    """A 3-D array with its geometry.

    Attributes:
        data: ``(I, J, K)`` array in nibabel axis order; float32 for images, int64 for labels (or
            their smallest integer type, ``load_volume(..., compact_labels=True)``, as the pipeline reads
            segmentations).
        affine: ``(4, 4)`` float64, world (RAS+ mm) from voxel.
        header: the source NIfTI header, reused for outputs on this grid (``None`` if built in memory).
        name: a short name for messages and output files.
        kind: ``"image"`` or ``"labels"``.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    name: str = "volume"
    kind: VolumeKind = "image"
    path: Path | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in voxel_sizes(self.affine))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The data as a ``(1, 1, I, J, K)`` tensor (float32 images, integer labels)."""
        return torch.as_tensor(self.data, device=device)[None, None]

    def with_data(self, data: np.ndarray, *, name: str | None = None,
                  kind: VolumeKind | None = None) -> "Volume":
        """A new volume on the same grid (same affine and header) holding ``data``."""
        return Volume(data, self.affine, self.header, name or self.name, kind or self.kind)

    def __repr__(self) -> str:
        sp = "x".join(f"{s:g}" for s in self.spacing)
        return (f"Volume(name={self.name!r}, kind={self.kind}, shape={self.shape}, spacing={sp} mm, "
                f"orientation={self.orientation}, dtype={self.data.dtype})")


def _read_nifti(path: Path) -> nib.spatialimages.SpatialImage:
    """A NIfTI-1/2 or MGH/MGZ image, its header checked (zero voxel sizes are refused, not set to 1 mm)."""
    if not path.exists():
        if path.is_symlink():
            raise ImageIOError(f"{path}: broken symbolic link (to {os.readlink(path)})")
        raise ImageIOError(f"{path}: file does not exist")
    if path.is_dir():
        raise ImageIOError(f"{path}: is a directory, expected a NIfTI file")
    if not is_image_path(path):
        raise ImageIOError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz, or FreeSurfer .mgz)")
    mgh = str(path).lower().endswith((".mgz", ".mgh"))
    what = "MGH/MGZ" if mgh else "NIfTI"
    try:
        data = _inflated_nifti(path)
        with _nibabel_reports() as fixes:
            img = nib.load(str(path)) if data is None else _nifti_from_bytes(data)
        raw = None if mgh else _raw_nifti_header(path if data is None else data, type(img.header))
    except Exception as e:  # nibabel raises many types for bad headers (HeaderDataError, KeyError, ...)
        raise ImageIOError(f"{path}: cannot read as {what} ({first_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        raise ImageIOError(f"{path}: not a {what} image")
    if raw is not None and int(raw["sform_code"]) == 0:  # the affine comes from pixdim (qform or fallback)
        pix = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(pix)) or np.any(pix == 0):
            raise ImageContentError(f"{path}: voxel size (pixdim) {pix.tolist()} has a zero or non-finite value "
                                    f"and there is no sform: the image has no valid geometry")
    _warn_header_fixes(path, fixes)
    return img


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())


@contextlib.contextmanager
def _nibabel_reports() -> Iterator[list[str]]:
    """The reports nibabel logs inside the block (the header fixes it makes while reading, e.g. a
    negative pixdim made positive), collected instead of printed: nibabel prints them on its own,
    without the file's name."""
    logger = nib.imageglobals.logger
    records, handlers, propagate = _Records(), logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [records], False
    try:
        yield records.messages
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _warn_header_fixes(path: Path, messages: list[str]) -> None:
    """One warning per header fix of a file that was read (issued from here, so a file read twice
    warns once)."""
    for message in dict.fromkeys(m for m in messages if m):
        warnings.warn(f"{path}: nibabel repaired the header while reading: {message}", stacklevel=1)


def _inflated_nifti(path: Path) -> bytes | None:
    """A ``.nii.gz`` file's bytes, inflated at once with ISA-L when installed (~2x zlib's speed, and it
    releases the GIL: two inputs read on threads decompress in parallel; prefetched bytes are taken,
    :mod:`keyreg.prefetch`); ``None`` for other files or without ISA-L (nibabel then reads the file)."""
    if not str(path).lower().endswith(".nii.gz"):
        return None
    try:
        from isal import igzip
    except ImportError:  # no ISA-L wheels: nibabel's reader, same result
        return None
    from .prefetch import take

    data = take(path)
    return igzip.decompress(path.read_bytes()) if data is None else data


def _nifti_from_bytes(data: bytes) -> nib.spatialimages.SpatialImage:
    """A NIfTI-1 or -2 image from a single file's inflated bytes (told apart by ``sizeof_hdr``)."""
    size = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(data[:4], "big")
    return (nib.Nifti2Image if size == 540 else nib.Nifti1Image).from_bytes(data)


def _raw_nifti_header(source: Path | bytes, header_class: type) -> Any:
    """The header as stored (from the file, or from its inflated bytes), before nibabel's fixes
    (which turn a zero pixdim into 1 mm)."""
    if isinstance(source, bytes):
        return header_class.from_fileobj(io.BytesIO(source), check=False)
    from nibabel.openers import ImageOpener

    with ImageOpener(str(source)) as f:
        return header_class.from_fileobj(f, check=False)


def _array_from_image(img: nib.spatialimages.SpatialImage, where: str) -> np.ndarray:
    shape = img.shape
    _check_dims(shape, where)
    n = int(np.prod(shape[:3], dtype=np.int64))
    if n > MAX_VOXELS:
        raise ImageContentError(
            f"{where}: {shape[:3]} is {n:,} voxels, more than the {MAX_VOXELS:,} keyreg accepts")
    dtype = np.dtype(img.get_data_dtype())
    _check_dtype(dtype, where)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise ImageIOError(f"{where}: corrupt or truncated data ({first_line(e)})") from None
    except Exception as e:  # nibabel's own errors for inconsistent headers
        raise ImageIOError(f"{where}: cannot read the voxel data ({first_line(e)})") from None
    return data


def _check_dtype(dtype: np.dtype, where: str) -> None:
    """Scalar real voxels only: RGB/structured and complex data would be silently mangled."""
    if dtype.fields is not None or dtype.kind == "V":
        raise ImageContentError(f"{where}: voxels of type {dtype} (RGB or structured) are not a scalar image")
    if dtype.kind == "c":
        raise ImageContentError(f"{where}: complex-valued voxels are not supported (take the magnitude first)")
    if dtype.kind not in "biuf":
        raise ImageContentError(f"{where}: voxels of type {dtype} are not numbers")


def _check_dims(shape: tuple[int, ...], where: str) -> None:
    extra = [s for s in shape[3:] if s != 1]
    if len(shape) < 3 or extra:
        raise ImageContentError(
            f"{where}: expected a 3-D volume (or 4-D with one volume), got shape {tuple(shape)}")
    if min(shape[:3]) < 2:
        raise ImageContentError(f"{where}: every spatial axis needs at least 2 voxels, got {tuple(shape)}")


def _c_order(data: np.ndarray) -> np.ndarray:
    """``data`` in C order.  NIfTI voxels are read in Fortran order, and every later step is faster on
    C-ordered arrays (``grid_sample`` reads a Fortran-ordered 256^3 image 3.6x slower); torch's
    parallel copy transposes it ~2x faster than numpy's."""
    if data.flags.c_contiguous:
        return data
    if data.flags.writeable and data.dtype in TORCH_COPY_DTYPES and min(data.strides) >= 0:
        return torch.from_numpy(data).contiguous().numpy()
    return np.ascontiguousarray(data)


#: a label map with more distinct ids than this is most likely an integer intensity image given as
#: labels (whole-brain parcellations have a few hundred to about a thousand)
MANY_LABEL_IDS = 2000


def _warn_if_many_ids(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` (C-ordered integers), after a warning when they hold more than
    :data:`MANY_LABEL_IDS` distinct ids: every id would get its own Dice, silently meaningless for an
    image.  Exact when the ids span fewer than 2^22 values (counted in chunks); otherwise counted on
    a subsample of about 2 million voxels (a lower bound)."""
    flat = labels.reshape(-1)
    if flat.dtype == bool or not flat.size:
        return labels
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < 1 << 22:
        seen = np.zeros(hi - lo + 1, dtype=bool)
        for start in range(0, flat.size, 1 << 22):
            seen[flat[start:start + (1 << 22)].astype(np.int64) - lo] = True
        n = int(np.count_nonzero(seen))
    else:
        n = len(np.unique(flat[:: max(1, flat.size // 2_000_000)]))
    if n > MANY_LABEL_IDS:
        warnings.warn(f"{where}: label map has {n} or more distinct ids; is it an intensity image?", stacklevel=2)
    return labels


def _validate(data: np.ndarray, affine: np.ndarray, kind: VolumeKind, where: str,
              compact: bool = False) -> np.ndarray:
    _check_dims(data.shape, where)
    _check_dtype(data.dtype, where)
    data = data.reshape(data.shape[:3])
    check_affine(affine, where)
    if kind == "labels":
        if data.dtype == np.uint64 and data.size and int(data.max()) > np.iinfo(np.int64).max:
            raise ImageContentError(f"{where}: label id {int(data.max())} is larger than 2^63 - 1, the largest "
                                    f"id keyreg keeps exactly")
        if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
            return _warn_if_many_ids(_c_order(data.astype(_integer_dtype(data) if compact else np.int64, copy=False)),
                                     where)
        if not np.all(np.isfinite(data)):
            raise ImageContentError(f"{where}: label map contains NaN or Inf")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ImageContentError(f"{where}: label map has non-integer values (is it an image?)")
        if rounded.size and float(np.abs(rounded).max()) >= 2.0**63:
            raise ImageContentError(f"{where}: label ids beyond +-2^63 cannot be kept exactly")
        return _warn_if_many_ids(rounded.astype(_integer_dtype(rounded) if compact else np.int64, order="C"), where)
    source = data
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, as one line
        data = _c_order(np.asarray(data, dtype=np.float32))
    if not np.all(np.isfinite(data)):
        bad = int((~np.isfinite(data)).sum())
        if np.all(np.isfinite(source)):
            raise ImageContentError(f"{where}: {bad} voxels exceed float32's range (up to "
                                    f"{float(np.abs(source).max()):.3g}; check the header's scl_slope / scl_inter)")
        raise ImageContentError(f"{where}: {bad} voxel{'s are' if bad > 1 else ' is'} NaN or Inf")
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        raise ImageContentError(f"{where}: image is constant (value {lo:g}), nothing to register")
    if hi - lo > 1e30:  # min-max normalisation in float32 would overflow
        raise ImageContentError(f"{where}: intensity range [{lo:.3g}, {hi:.3g}] is too large (more than 1e30)")
    return data


#: NIfTI spatial units (``xyzt_units``) keyreg converts to mm.
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _geometry_in_mm(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, nib.Nifti1Header | None]:
    """``(affine, header)`` of a nibabel image with world coordinates in mm: a NIfTI header whose
    spatial unit is metres or microns scales the affine (as ITK reads it), and its copy says mm, so that
    outputs written on this grid carry a consistent header."""
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None
    affine = np.asarray(img.affine, dtype=np.float64)
    if header is None:
        return affine, None
    unit, time_unit = header.get_xyzt_units()
    scale = _MM_PER_UNIT.get(unit, 1.0)
    if scale != 1.0:
        affine = np.diag([scale, scale, scale, 1.0]) @ affine
        header = header.copy()
        header.set_xyzt_units(xyz="mm", t=time_unit)
        header.set_qform(affine, code=int(header["qform_code"]) or 1)
        header.set_sform(affine, code=int(header["sform_code"]) or 1)
    return affine, header


def load_volume(
    source: Any,
    *,
    kind: VolumeKind = "image",
    name: str | None = None,
    affine: np.ndarray | None = None,
    compact_labels: bool = False,
) -> Volume:
    """Read and validate a volume.

    Args:
        source: a path (``.nii`` / ``.nii.gz``), a nibabel image, a :class:`Volume`, a
            ``(array, affine)`` tuple, or a numpy array / torch tensor together with ``affine``.
            Arrays are in nibabel axis order ``(i, j, k)``; a leading ``(1, 1)`` or trailing
            singleton axis is dropped.
        kind: ``"image"`` (float32; must be finite and not constant) or ``"labels"`` (integer
            ids; never intensity-normalised).
        name: name used in messages and output files (defaults to the file name).
        affine: ``(4, 4)`` world-from-voxel affine when ``source`` is an array or tensor.
        compact_labels: labels in the smallest of uint8, int16, int32, int64 that holds their ids
            (the same ids in 1/8 to 1/4 of the memory at 256^3), instead of int64.

    Raises:
        ImageIOError: missing, unreadable or corrupt file.
        ImageContentError: wrong dimensionality, NaN/Inf, constant image, non-integer labels.
    """
    header = None
    path = None
    if isinstance(source, Volume):
        where = name or source.name
        data = _validate(source.data, source.affine, kind, where, compact_labels)
        return Volume(data, np.asarray(source.affine, np.float64), source.header,
                      name or source.name, kind, source.path)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        img = _read_nifti(path)
        data = _array_from_image(img, where)
        affine, header = _geometry_in_mm(img)
        name = name or nifti_stem(path)
    elif isinstance(source, nib.spatialimages.SpatialImage):
        where = name or "image"
        data = _array_from_image(source, where)
        affine, header = _geometry_in_mm(source)
    else:
        if isinstance(source, tuple) and len(source) == 2 and affine is None:
            source, affine = source
        where = name or "array"
        if affine is None:
            raise ImageContentError(f"{where}: an array needs an affine (pass affine=... or (array, affine))")
        if torch.is_tensor(source):
            source = source.detach().cpu().numpy()
        data = np.asarray(source)
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
    data = _validate(np.asarray(data), affine, kind, where, compact_labels)
    return Volume(data, np.asarray(affine, dtype=np.float64), header, name or "volume", kind, path)


def load_volumes(sources: Sequence[tuple[Any, VolumeKind]], *, workers: int | None = None,
                 compact_labels: bool = False) -> list[Volume]:
    """:func:`load_volume` of several ``(source, kind)`` at once, files read on threads (gzip
    decompression and numpy's checks release the GIL, so several cores decompress in parallel).

    The volumes are those of one :func:`load_volume` call each; when several inputs are bad, the
    error raised is that of the first in ``sources`` order, as when they are read one by one.
    """
    files = [i for i, (src, _) in enumerate(sources) if isinstance(src, (str, os.PathLike))]
    n = min(len(files), workers or min(4, os.cpu_count() or 1))
    if n < 2:
        return [load_volume(src, kind=kind, compact_labels=compact_labels) for src, kind in sources]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n, thread_name_prefix="keyreg-load") as pool:
        futures = [pool.submit(load_volume, src, kind=kind, compact_labels=compact_labels) for src, kind in sources]
        return [f.result() for f in futures]


def grid_volume(shape: Any, affine: np.ndarray, name: str = "grid",
                header: nib.Nifti1Header | None = None) -> Volume:
    """A geometry-only :class:`Volume`: ``shape`` ``(I, J, K)`` and ``affine`` (world RAS from voxel).

    Its ``data`` is a read-only broadcast of one zero (no memory), so it can serve as the reference
    grid of :func:`save_volume`, :meth:`Volume.with_data` and the warping functions.
    """
    where = f"{name}: grid"
    try:
        shape = tuple(int(s) for s in tuple(shape)[:3])
    except (TypeError, ValueError, OverflowError):
        raise ImageContentError(f"{where}: the shape must be 3 integers, got {shape!r}") from None
    _check_dims(shape, where)
    affine = check_affine(affine, where)
    return Volume(np.broadcast_to(np.zeros((), np.float32), shape), affine, header, name, "image")


def read_grid(source: Any, *, name: str | None = None) -> Volume:
    """The grid of a NIfTI file (shape, affine, header) without reading its voxels; also of a nibabel
    image or an ``(array, affine)`` pair (their voxels are not looked at).

    Returns a geometry-only volume (see :func:`grid_volume`); a :class:`Volume` is returned as is.

    Raises:
        ImageIOError: missing or unreadable file.  ImageContentError: not 3-D, too large, bad affine.
        ConfigError: something else.
    """
    if isinstance(source, Volume):
        return source
    if isinstance(source, tuple) and len(source) == 2:
        return grid_volume(np.shape(source[0]), np.asarray(source[1], dtype=np.float64), name or "grid")
    if isinstance(source, nib.spatialimages.SpatialImage):
        affine, header = _geometry_in_mm(source)
        return grid_volume(source.shape[:3], affine, name or "grid", header)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a grid is a path, a nibabel image, (array, affine) or a Volume, got {type(source).__name__}")
    path = Path(source)
    img = _read_nifti(path)
    _check_dims(img.shape, str(path))
    n = int(np.prod(img.shape[:3], dtype=np.int64))
    if n > MAX_VOXELS:
        raise ImageContentError(f"{path}: {img.shape[:3]} is {n:,} voxels, more than the {MAX_VOXELS:,} keyreg accepts")
    affine, header = _geometry_in_mm(img)
    return grid_volume(img.shape[:3], affine, name or nifti_stem(path), header)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz`` / ``.mgz`` / ``.mgh`` (any case)."""
    path = Path(path)
    name = path.name
    for suf in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def save_volume(
    data: np.ndarray | torch.Tensor,
    reference: Volume,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``data`` on the grid of ``reference`` (its affine and header) to a NIfTI file, atomically.

    Args:
        data: ``(I, J, K)`` array on ``reference``'s grid, or ``(I, J, K, ...)`` for vector data.
        reference: volume whose geometry and header the output carries (the fixed image).
        path: ``.nii`` or ``.nii.gz`` output path.
        dtype: on-disk dtype (default: float32 for float data; for integer data the smallest of
            uint8, int16, int32, int64 that holds every value, so large label ids stay exact).
    """
    if torch.is_tensor(data):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.shape[:3] != reference.shape:
        raise ImageContentError(f"{path}: data shape {data.shape} does not match grid {reference.shape}")
    if dtype is None:
        dtype = _integer_dtype(data) if np.issubdtype(data.dtype, np.integer) else np.float32
    if not is_nifti_path(path):
        raise OutputError(f"{path}: output name must end in .nii or .nii.gz")
    header = reference.header.copy() if reference.header is not None else None
    img = nib.Nifti1Image(data.astype(dtype, copy=False), reference.affine, header=header, dtype=dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    with atomic_path(path) as tmp:
        nifti_gzip.write_nifti(img, tmp)  # looked up at call time: one place writes NIfTI files
    return Path(path)


def smallest_integer_dtype(lo: int, hi: int) -> type:
    """The smallest of uint8, int16, int32, int64 that holds every integer in ``[lo, hi]`` (label ids
    are never truncated; small types keep label maps small in memory and fast to compress)."""
    for t in (np.uint8, np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return t
    return np.int64


def _integer_dtype(data: np.ndarray) -> type:
    """:func:`smallest_integer_dtype` of an array's values (int32 for an empty array)."""
    return np.int32 if data.size == 0 else smallest_integer_dtype(int(data.min()), int(data.max()))
