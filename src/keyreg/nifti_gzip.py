"""Writing NIfTI files fast: ``.nii.gz`` compressed in parallel, as one standard gzip member.

:func:`write_nifti` is the one place keyreg writes a NIfTI file (callers wrap it in
:func:`keyreg.atomic.atomic_path`).  The output decompresses to exactly the bytes nibabel writes.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

__all__ = ["write_nifti", "ParallelGzipWriter", "GZIP_LEVEL", "GZIP_BLOCK", "GZIP_STORE_RATIO"]

#: dtypes whose Fortran-order copy goes through torch's parallel copy.
TORCH_COPY_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "uint8", "int16", "int32", "int64"))

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
            or data.dtype not in TORCH_COPY_DTYPES:
        return img
    t = torch.from_numpy(data)
    fortran = t.permute(*reversed(range(t.ndim))).contiguous().numpy().T
    return type(img)(fortran, img.affine, img.header, extra=img.extra)
