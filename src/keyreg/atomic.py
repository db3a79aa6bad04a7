"""Atomic file output: a file or directory gets its final name only once it is complete.

Every output of keyreg is written under a hidden temporary name next to its destination
(``.<name>.<random>.tmp``) and renamed when done, so an error, an interrupt or a full disk never
leaves a half-written file under the final name.  :func:`remove_stale_temporaries` clears what a
killed process (``kill -9``) left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ConfigError, OutputError, first_line

__all__ = ["atomic_path", "atomic_dir", "atomic_write_text", "remove_stale_temporaries", "check_not_overwriting",
           "check_inputs_outside"]


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
        raise OutputError(f"{parent}: cannot create output directory ({first_line(e)})") from None
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=parent)
    except OSError as e:
        raise OutputError(f"{parent}: cannot write here ({first_line(e)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({first_line(e)})") from None
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
        raise OutputError(f"{where}: cannot write here ({first_line(e)})") from None
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
        raise OutputError(f"{path}: cannot write ({first_line(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def remove_stale_temporaries(directory: str | os.PathLike, names: Sequence[str]) -> int:
    """Remove the hidden temporaries of ``names`` in ``directory`` that a killed run left
    (``.<name>.<random>.tmp|old``, from :func:`atomic_dir` / :func:`atomic_path`); returns how many.

    Only call this while no other process writes these names (see :mod:`keyreg.batch`'s lock).
    """
    d = Path(directory)
    if not d.is_dir():
        return 0
    patterns = [re.compile(rf"^\.{re.escape(n)}\.[A-Za-z0-9_]+\.(tmp|old)$") for n in names]
    removed = 0
    for entry in d.iterdir():
        if entry.name.startswith(".") and any(p.match(entry.name) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def check_not_overwriting(output: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """:class:`ConfigError` if writing ``output`` would replace one of ``inputs`` (the same file, a link
    to it, or a file already inside an input directory such as an align directory; a hard link is safe:
    the output replaces the name, not the file)."""
    out = Path(output)
    for src in inputs:
        if src is None:
            continue
        s = Path(src)
        if out.resolve() == s.resolve() or (s.is_dir() and out.exists() and s.resolve() in out.resolve().parents):
            raise ConfigError(f"{output}: the output would overwrite an input ({src}); choose another output name")


def check_inputs_outside(directory: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """:class:`ConfigError` if an input lies inside ``directory``, an output directory that is replaced
    as a whole (:func:`atomic_dir`): the input would be deleted with it."""
    d = Path(directory).resolve()
    for src in inputs:
        if src is not None and d in Path(src).resolve().parents:
            raise ConfigError(f"{src}: an input inside the output directory {directory}, which is replaced as a "
                              "whole; move the input or choose another --save_dir")
