"""Reading and writing volumes (NIfTI through nibabel) with their geometry, and atomic file output.

A :class:`Volume` pairs a 3-D array in nibabel axis order ``(i, j, k)`` with its 4x4
``world_from_voxel`` affine (RAS+ mm).  Everything a user may hand to keyreg — a path, a nibabel
image, a ``(array, affine)`` pair, a torch tensor with an affine, or a :class:`Volume` — goes
through :func:`load_volume`, which validates it once, at the boundary.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from .errors import ImageContentError, ImageIOError, KeyregError, OutputError
from .geometry import voxel_sizes

__all__ = ["Volume", "load_volume", "load_volumes", "save_volume", "read_grid", "grid_volume", "atomic_path", "atomic_dir",
           "atomic_write_text", "write_nifti", "ParallelGzipWriter", "NIFTI_SUFFIXES", "IMAGE_SUFFIXES",
           "is_nifti_path", "is_image_path", "nifti_stem", "MAX_VOXELS", "check_same_grid", "check_affine", "is_valid_affine",
           "clean_stale_temporaries"]

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


def is_valid_affine(a: np.ndarray) -> bool:
    """True for a finite ``(4, 4)`` matrix whose linear part is invertible (``|det| >= 1e-12``)."""
    return (a.shape == (4, 4) and bool(np.all(np.isfinite(a)))
            and abs(float(np.linalg.det(a[:3, :3]))) >= 1e-12)


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
    if a is None or not is_valid_affine(a):
        raise error(f"{where}: invalid affine (must be a finite, invertible 4x4 matrix)")
    return a


def check_same_grid(vol: "Volume", image: "Volume", role: str = "segmentation") -> None:
    """``vol`` (a segmentation) must lie on ``image``'s grid: equal shapes and affines (1e-3 mm)."""
    if vol.shape != image.shape or not np.allclose(vol.affine, image.affine, atol=1e-3):
        raise ImageContentError(
            f"{vol.name}: {role} grid {vol.shape} does not match its image grid {image.shape} "
            f"(shapes and affines must be equal)")


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
        raise ImageIOError(f"{path}: file does not exist")
    if path.is_dir():
        raise ImageIOError(f"{path}: is a directory, expected a NIfTI file")
    if not is_image_path(path):
        raise ImageIOError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz, or FreeSurfer .mgz)")
    mgh = str(path).lower().endswith((".mgz", ".mgh"))
    what = "MGH/MGZ" if mgh else "NIfTI"
    try:
        data = _inflated_nifti(path)
        img = nib.load(str(path)) if data is None else _nifti_from_bytes(data)
        raw = None if mgh else _raw_nifti_header(path if data is None else data, type(img.header))
    except Exception as e:  # nibabel raises many types for bad headers (HeaderDataError, KeyError, ...)
        raise ImageIOError(f"{path}: cannot read as {what} ({_short(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        raise ImageIOError(f"{path}: not a {what} image")
    if raw is not None and int(raw["sform_code"]) == 0:  # the affine comes from pixdim (qform or fallback)
        pix = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(pix)) or np.any(pix == 0):
            raise ImageContentError(f"{path}: voxel size (pixdim) {pix.tolist()} has a zero or non-finite value "
                                    f"and there is no sform: the image has no valid geometry")
    return img


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


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


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
        raise ImageIOError(f"{where}: corrupt or truncated data ({_short(e)})") from None
    except Exception as e:  # nibabel's own errors for inconsistent headers
        raise ImageIOError(f"{where}: cannot read the voxel data ({_short(e)})") from None
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


_TORCH_COPY_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "uint8", "int16", "int32", "int64"))


def _c_order(data: np.ndarray) -> np.ndarray:
    """``data`` in C order.  NIfTI voxels are read in Fortran order, and every later step is faster on
    C-ordered arrays (``grid_sample`` reads a Fortran-ordered 256^3 image 3.6x slower); torch's
    parallel copy transposes it ~2x faster than numpy's."""
    if data.flags.c_contiguous:
        return data
    if data.flags.writeable and data.dtype in _TORCH_COPY_DTYPES and min(data.strides) >= 0:
        return torch.from_numpy(data).contiguous().numpy()
    return np.ascontiguousarray(data)


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
            return _c_order(data.astype(_integer_dtype(data) if compact else np.int64, copy=False))
        if not np.all(np.isfinite(data)):
            raise ImageContentError(f"{where}: label map contains NaN or Inf")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ImageContentError(f"{where}: label map has non-integer values (is it an image?)")
        if rounded.size and float(np.abs(rounded).max()) >= 2.0**63:
            raise ImageContentError(f"{where}: label ids beyond +-2^63 cannot be kept exactly")
        return rounded.astype(_integer_dtype(rounded) if compact else np.int64, order="C")
    data = _c_order(np.asarray(data, dtype=np.float32))
    if not np.all(np.isfinite(data)):
        bad = int((~np.isfinite(data)).sum())
        raise ImageContentError(f"{where}: {bad} voxels are NaN or Inf")
    lo, hi = float(data.min()), float(data.max())
    if hi == lo:
        raise ImageContentError(f"{where}: image is constant (value {lo:g}), nothing to register")
    if hi - lo > 1e30:  # min-max normalisation in float32 would overflow
        raise ImageContentError(f"{where}: intensity range [{lo:.3g}, {hi:.3g}] is too large (more than 1e30)")
    return data


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
        affine = img.affine
        header = img.header if isinstance(img.header, nib.Nifti1Header) else None
        name = name or nifti_stem(path)
    elif isinstance(source, nib.spatialimages.SpatialImage):
        where = name or "image"
        data = _array_from_image(source, where)
        affine = source.affine
        header = source.header if isinstance(source.header, nib.Nifti1Header) else None
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
    """The grid of a NIfTI file (shape, affine, header) without reading its voxels.

    Returns a geometry-only volume (see :func:`grid_volume`); a :class:`Volume` is returned as is.

    Raises:
        ImageIOError: missing or unreadable file.  ImageContentError: not 3-D, too large, bad affine.
    """
    if isinstance(source, Volume):
        return source
    path = Path(source)
    img = _read_nifti(path)
    _check_dims(img.shape, str(path))
    n = int(np.prod(img.shape[:3], dtype=np.int64))
    if n > MAX_VOXELS:
        raise ImageContentError(f"{path}: {img.shape[:3]} is {n:,} voxels, more than the {MAX_VOXELS:,} keyreg accepts")
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None
    return grid_volume(img.shape[:3], img.affine, name or nifti_stem(path), header)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz`` / ``.mgz`` / ``.mgh`` (any case)."""
    path = Path(path)
    name = path.name
    for suf in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.nii.gz``, ...) so that writers choosing a format by
    extension behave.  On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create output directory ({_short(e)})") from None
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=parent)
    except OSError as e:
        raise OutputError(f"{parent}: cannot write here ({_short(e)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({_short(e)})") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing what is there (a directory as a whole: it is moved aside
    first and deleted after, so ``dst`` never holds a mix of old and new entries)."""
    old = None
    if os.path.lexists(dst) and (src.is_dir() or (dst.is_dir() and not dst.is_symlink())):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, merge: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; it becomes ``path`` only if the block succeeds.

    On success an existing ``path`` (a directory) is replaced as a whole; on any error (or an
    interrupt) the temporary directory is deleted, so a half-written result never carries the
    final name.  Used for per-pair output directories, whose completion marker is written last.

    With ``merge=True``, ``path`` is a directory that may hold other things (a user's output
    directory): the temporary directory is made inside it and, on success, each of its entries
    replaces the entry of the same name in ``path``; other entries are kept.  Used by workflows
    that write several top-level outputs at once (``keyreg groupwise``).
    """
    path = Path(path)
    where = path if merge else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=where))
    except OSError as e:
        raise OutputError(f"{where}: cannot write here ({_short(e)})") from None
    try:
        yield tmp
        if merge:
            for entry in sorted(tmp.iterdir()):
                _replace(entry, path / entry.name)
            tmp.rmdir()
        else:
            os.chmod(tmp, 0o777 & ~_umask())
            _replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):  # a file inside: name it by its final path, not the temporary one
            raise OutputError(str(e).replace(str(tmp), str(path))) from None
        raise OutputError(f"{path}: cannot write ({_short(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted :func:`atomic_dir` / :func:`atomic_path` calls left directly in
    ``directory`` (hidden ``.<name>.*.tmp`` / ``.old`` entries, e.g. after ``kill -9``); returns them.

    Only call this while no other process writes into ``directory`` (see :mod:`keyreg.batch`'s lock).
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for entry in sorted(d.iterdir()):
        n = entry.name
        if n.startswith(".") and (n.endswith(".old") or ".tmp" in n):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


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
        write_nifti(img, tmp)
    return Path(path)


#: gzip level of written ``.nii.gz`` files (nibabel's default, 1: fastest deflate).
GZIP_LEVEL = 1
#: Uncompressed bytes per independently compressed block of a ``.nii.gz`` file.
GZIP_BLOCK = 4 << 20
#: A block whose first 1/16 deflates to more than this fraction of its size is stored (deflate's
#: uncompressed blocks) instead of compressed: float fields of fine-grained values (a TPS
#: displacement field) deflate to ~93 % at ~30 MB/s of CPU, stored they cost nothing but a copy.
GZIP_STORE_RATIO = 0.9


def _fast_deflate():
    """ISA-L's deflate (``isal.isal_zlib``, zlib's interface) when installed, else ``zlib``.

    At level 1 ISA-L deflates a 1 mm brain image ~6x faster than zlib (~220 vs ~33 MB/s of CPU here)
    to a slightly smaller stream; both write standard deflate, so the files read the same everywhere.
    """
    try:
        from isal import isal_zlib
    except ImportError:  # an exotic platform without ISA-L wheels: zlib, same format, slower
        return zlib
    return isal_zlib


_DEFLATE = _fast_deflate()


class ParallelGzipWriter(io.RawIOBase):
    """A write-only file object producing one standard gzip member, compressed in parallel.

    The byte stream is cut into blocks of :data:`GZIP_BLOCK` bytes, each deflated on its own by a
    thread pool (zlib and ISA-L release the GIL) and ended with a sync flush, so the raw deflate streams
    concatenate into one valid stream (the way ``pigz`` works); a final empty block, the CRC-32
    and the length close the member.  Any gzip reader (nibabel, ITK, FSL, ``gzip -d``) reads the
    file; only the first bytes of each block lose their back-references (sizes within ~1 %).

    A block that hardly compresses (its first 1/16 deflates to more than ``store_ratio`` of its size,
    :data:`GZIP_STORE_RATIO`) is written as stored deflate blocks: the same standard stream, a few
    percent larger, for a twentieth of the CPU.  The choice depends on the bytes only (the same data
    give the same file); ``store_ratio=1`` compresses every block.

    Blocks are deflated by ISA-L when it is installed (``fast``, :func:`_fast_deflate`), else by zlib:
    different compressed bytes, the same decompressed bytes.
    """

    def __init__(self, fileobj, *, level: int = GZIP_LEVEL, block: int = GZIP_BLOCK,
                 workers: int | None = None, store_ratio: float = GZIP_STORE_RATIO,
                 fast: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        super().__init__()
        self._f = fileobj
        self._level = level
        self._lib = _DEFLATE if fast else zlib
        self._store_ratio = store_ratio
        self._block = block
        self._buf = bytearray()
        self._crc = 0
        self._size = 0
        self._pending: list = []
        self._workers = max(1, workers or min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._workers) if self._workers > 1 else None
        self._f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header: deflate, no name, mtime 0

    def _compressor(self, level: int):
        """A raw-deflate compressor: ISA-L for levels 1-3 when installed (:func:`_fast_deflate`),
        zlib otherwise (level 0 is zlib's stored blocks: ISA-L's level 0 is a fast compression)."""
        lib = self._lib if 1 <= level <= 3 else zlib
        return lib.compressobj(level, lib.DEFLATED, -15, 9), lib.Z_SYNC_FLUSH

    def _deflate(self, data: bytes) -> bytes:
        level = self._level
        if level > 0 and self._store_ratio < 1 and len(data) >= 4096:
            probe = memoryview(data)[: len(data) // 16]
            c, sync = self._compressor(level)
            if len(c.compress(probe)) + len(c.flush(sync)) > self._store_ratio * len(probe):
                level = 0  # incompressible: stored blocks
        c, sync = self._compressor(level)
        return c.compress(data) + c.flush(sync)

    def _submit(self, data: bytes) -> None:
        self._crc = _DEFLATE.crc32(data, self._crc)  # ISA-L's when installed: 4x zlib's
        self._size += len(data)
        if self._pool is None:
            self._f.write(self._deflate(data))
            return
        self._pending.append(self._pool.submit(self._deflate, data))
        while len(self._pending) > 2 * self._workers:  # bounded memory: write finished blocks in order
            self._f.write(self._pending.pop(0).result())

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n, pos = len(mv), 0
        if self._buf:  # complete the pending partial block first
            pos = min(n, self._block - len(self._buf))
            self._buf += mv[:pos]
            if len(self._buf) < self._block:
                return n
            self._submit(bytes(self._buf))
            self._buf = bytearray()
        while n - pos >= self._block:  # whole blocks straight from the caller's buffer: one copy each
            self._submit(bytes(mv[pos : pos + self._block]))
            pos += self._block
        self._buf += mv[pos:]
        return n

    def tell(self) -> int:
        return self._size + len(self._buf)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == self.tell():
            return offset
        raise OSError("ParallelGzipWriter cannot seek")

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._f is None:
            return super().close()
        try:
            if self._buf:
                self._submit(bytes(self._buf))
                self._buf = bytearray()
            for fut in self._pending:
                self._f.write(fut.result())
            self._pending = []
            self._f.write(zlib.compressobj(self._level, zlib.DEFLATED, -15, 9).flush(zlib.Z_FINISH))
            self._f.write(self._crc.to_bytes(4, "little") + (self._size & 0xFFFFFFFF).to_bytes(4, "little"))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._f = None
            super().close()

    def __enter__(self) -> "ParallelGzipWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the caller discards the file: stop without writing a trailer
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._f = None
            super().close()
            return
        self.close()


def write_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """``nib.save(img, path)``; a ``.nii.gz`` is compressed in parallel (:class:`ParallelGzipWriter`),
    byte-identical to nibabel's output once decompressed."""
    path = Path(path)
    if not path.name.lower().endswith(".gz") or not isinstance(img, nib.Nifti1Image) \
            or isinstance(img, nib.Nifti2Image):
        nib.save(img, str(path))
        return
    img = _with_fortran_data(img)
    with open(path, "wb") as raw, ParallelGzipWriter(raw) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})


def _with_fortran_data(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``img`` with its array in Fortran order, the order NIfTI stores: nibabel then writes each
    slice with one memory copy instead of a strided one (2.9 s of strided copies for the outputs of
    a 1 mm registration); the transposition is torch's parallel copy."""
    data = img.dataobj
    if not isinstance(data, np.ndarray) or data.ndim < 2 or data.flags.f_contiguous or not data.flags.c_contiguous \
            or data.dtype not in _TORCH_COPY_DTYPES:
        return img
    t = torch.from_numpy(data)
    fortran = t.permute(*reversed(range(t.ndim))).contiguous().numpy().T
    return type(img)(fortran, img.affine, img.header, extra=img.extra)


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
