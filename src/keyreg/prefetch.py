"""Inflate compressed inputs while the rest of keyreg (torch: ~1.5 s) is being imported.

The ``keyreg register`` command calls :func:`prefetch` with its input files before its heavy
imports; :func:`keyreg.io.load_volume` then takes the inflated bytes (:func:`take`) instead of
reading the file again.  Standard library and ISA-L only, so that importing this module is free.
A file that changed since, or whose prefetch failed, is simply read again (errors are reported by the
normal reader).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["prefetch", "take"]

#: at most this many files are prefetched (a pair and its segmentations)
MAX_FILES = 4

_lock = threading.Lock()
_jobs: dict[str, tuple[tuple[int, int], threading.Thread, dict]] = {}


def _key(path: Path) -> tuple[str, tuple[int, int]]:
    st = path.stat()
    return str(path.resolve()), (st.st_size, st.st_mtime_ns)


def _inflate(path: Path, out: dict) -> None:
    try:
        from isal import igzip

        out["data"] = igzip.decompress(path.read_bytes())
    except Exception:  # noqa: BLE001 - the normal reader reports the problem
        out["data"] = None


def prefetch(paths) -> None:
    """Start inflating the ``.nii.gz`` files among ``paths`` (others, directories and missing paths
    are ignored) on background threads; nothing happens without ISA-L."""
    try:
        import isal  # noqa: F401
    except ImportError:
        return
    files = [Path(p) for p in paths if p and str(p).lower().endswith(".nii.gz") and Path(p).is_file()]
    for path in files[:MAX_FILES]:
        try:
            key, stamp = _key(path)
        except OSError:
            continue
        with _lock:
            if key in _jobs:
                continue
            out: dict = {}
            thread = threading.Thread(target=_inflate, args=(path, out), name="keyreg-prefetch", daemon=True)
            _jobs[key] = (stamp, thread, out)
        thread.start()


def take(path: str | os.PathLike) -> bytes | None:
    """The inflated bytes of a prefetched file (waiting for them), once; ``None`` if it was not
    prefetched, failed, or changed since."""
    try:
        key, stamp = _key(Path(path))
    except OSError:
        return None
    with _lock:
        job = _jobs.pop(key, None)
    if job is None:
        return None
    stamp0, thread, out = job
    thread.join()
    return out.get("data") if stamp0 == stamp else None
