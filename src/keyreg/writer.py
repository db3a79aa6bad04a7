"""Writing results on a background thread while the next pair is computed (batches).

A :class:`BackgroundWriter` runs write jobs (plain callables) one after another on one thread, in
the order they were submitted.  It is bounded: :meth:`BackgroundWriter.submit` blocks while
``max_pending`` jobs are unfinished, so at most that many results wait in memory besides the one
being computed.  Every job's outcome is kept (its return value or its exception) and handed back by
:meth:`BackgroundWriter.finished` / :meth:`BackgroundWriter.close`: nothing is lost or raised on
the wrong thread.  The jobs themselves must be atomic (keyreg's writers use
:func:`keyreg.atomic.atomic_dir` / :func:`keyreg.atomic.atomic_path`), so a job that fails, or one that
never runs because the batch was interrupted, leaves no half-written file.

zlib (the ``.nii.gz`` compression) and torch release the GIL, so writing and computing overlap.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BackgroundWriter", "WriteOutcome", "StagedDir"]


@dataclass
class WriteOutcome:
    """What became of one job: its ``key``, its return ``value`` or the ``error`` it raised."""

    key: Any
    value: Any = None
    error: BaseException | None = None


class BackgroundWriter:
    """One writer thread with a bounded number of unfinished jobs (see the module docstring).

    Example:
        >>> with BackgroundWriter(max_pending=1) as w:                    # doctest: +SKIP
        ...     w.submit("pair-1", lambda: write_pair(...))
        ...     for done in w.finished(): ...
    """

    def __init__(self, max_pending: int = 1) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._slots = threading.Semaphore(max_pending)
        self._lock = threading.Condition()
        self._jobs: deque[tuple[Any, Callable[[], Any]]] = deque()
        self._done: list[WriteOutcome] = []
        self._closed = False
        self._cancel = False
        self._thread: threading.Thread | None = None

    def submit(self, key: Any, job: Callable[[], Any]) -> None:
        """Queue ``job`` (called with no arguments on the writer thread); blocks while
        ``max_pending`` jobs are unfinished.  After a job raised a ``BaseException`` that is not an
        ``Exception`` (``KeyboardInterrupt``), queued and new jobs are dropped: the caller re-raises
        it from the outcomes (:meth:`finished`)."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._slots.acquire()
        with self._lock:
            if self._cancel:  # a job was interrupted: nothing more is started
                self._slots.release()
                return
            self._jobs.append((key, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keyreg-writer", daemon=False)
                self._thread.start()
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._lock.wait()
                if not self._jobs or self._cancel:
                    return
                key, job = self._jobs.popleft()
            try:
                out = WriteOutcome(key, value=job())
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                out = WriteOutcome(key, error=e)
            del job  # the job's data (a pair's arrays) is not kept while the thread waits for the next
            with self._lock:
                self._done.append(out)
                if out.error is not None and not isinstance(out.error, Exception):  # KeyboardInterrupt & co.
                    self._cancel = True
                    self._jobs.clear()
            self._slots.release()

    def finished(self) -> list[WriteOutcome]:
        """Outcomes of the jobs finished since the last call, in submission order."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self, *, cancel: bool = False) -> list[WriteOutcome]:
        """Wait for the jobs (``cancel``: only for the one running; the queued ones are dropped, never
        started) and stop the thread; returns the outcomes not yet collected."""
        with self._lock:
            self._closed = True
            if cancel:
                self._cancel = True
                self._jobs.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        return self.finished()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)


class _Aborted(Exception):
    """Thrown into an open :func:`~keyreg.atomic.atomic_dir` to discard it."""


class StagedDir:
    """An :func:`~keyreg.atomic.atomic_dir` written in several steps, e.g. one align at a time by
    :meth:`keyreg.pipeline.Registrar.stream`, in line or as jobs of a :class:`BackgroundWriter`.

    :meth:`run` calls ``step(tmp)`` with the temporary directory (created by the first step);
    :meth:`commit` renames it to its final path; :meth:`abort` deletes it.  A step that raises deletes
    the temporary directory (an ``OSError`` comes out as :class:`~keyreg.errors.OutputError`, as from
    ``atomic_dir``) and every later step and the commit do nothing: the final path only ever holds a
    complete directory.  The steps of one directory must run one after another (one thread at a
    time), in the order they are meant to be written.
    """

    def __init__(self, path) -> None:
        from pathlib import Path

        self.path = Path(path)
        self._cm: Any = None
        self.failed = False
        self.closed = False

    def run(self, step: Callable[[Any], Any]) -> Any:
        """``step(tmp)`` in the temporary directory (``None`` when an earlier step failed)."""
        from .atomic import atomic_dir

        if self.failed or self.closed:
            return None
        try:
            if self._cm is None:
                cm = atomic_dir(self.path)
                self._tmp = cm.__enter__()
                self._cm = cm
            return step(self._tmp)
        except BaseException as e:
            self.failed = True
            cm, self._cm = self._cm, None
            if cm is not None:
                cm.__exit__(type(e), e, e.__traceback__)  # deletes it; raises OSErrors as OutputError
            raise

    def commit(self) -> None:
        """Give the temporary directory its final name (nothing after a failed step)."""
        if self.failed or self.closed:
            return
        if self._cm is None:
            self.run(lambda tmp: None)
        self.closed = True
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def abort(self) -> None:
        """Delete the temporary directory, if one was made; later steps do nothing."""
        self.closed = True
        cm, self._cm = self._cm, None
        if cm is not None:
            try:
                raise _Aborted
            except _Aborted as e:
                cm.__exit__(type(e), e, e.__traceback__)
