"""Wall time and peak memory per stage, for benchmark scripts (standard library only at import time,
so that the same file works inside the separate KeyMorph virtual environment).

CPU memory is the process's resident set size (RSS), sampled from ``/proc/self/statm`` every
``interval`` seconds by a background thread (torch releases the GIL inside its kernels, so the
sampler runs while they do).  ``tracemalloc`` does not see torch's allocations, and
``getrusage().ru_maxrss`` only moves when a new all-time high is reached, so neither can tell how
much memory one stage adds.  A stage's **extra** memory is its peak RSS minus the RSS when it
started; the process's peak RSS (``ru_maxrss``) is reported too.  On GPU the same two numbers come
from ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus the memory
allocated at the start of the stage.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager

__all__ = ["StageMeter", "rss_mb", "max_rss_mb"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Current resident set size in MiB (``ru_maxrss`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageMeter:
    """``with meter("warp"): ...`` records seconds and extra peak memory (MiB) per stage.

    Args:
        device: ``"cpu"`` or a CUDA device string; CUDA stages are synchronised before timing and
            measured with the CUDA allocator's statistics.
        interval: RSS sampling period (s).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.002) -> None:
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.interval = interval
        self.seconds: dict[str, float] = {}
        self.extra_mb: dict[str, float] = {}
        self._peak = 0.0
        self._cuda_peak = 0.0
        self._baseline: float | None = None
        self._overall = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss_mb()
            with self._lock:
                if r > self._peak:
                    self._peak = r
            time.sleep(self.interval)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            start_mem = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            start_mem = rss_mb()
            with self._lock:
                self._peak = start_mem
        if self._baseline is None:
            self._baseline = start_mem
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            if self.cuda:
                import torch

                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                self._cuda_peak = max(self._cuda_peak, peak)
            else:
                with self._lock:
                    peak = max(self._peak, rss_mb())
            self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
            self.extra_mb[stage] = max(self.extra_mb.get(stage, 0.0), peak - start_mem)
            self._overall = max(self._overall, peak - self._baseline)

    def overall_extra_mb(self) -> float:
        """Highest memory reached during any measured stage minus the memory before the first one."""
        return self._overall

    def peak_mb(self) -> float:
        """Peak memory of the process: ``ru_maxrss`` on CPU; on GPU the CUDA allocator's highest
        allocation over the measured stages."""
        if self.cuda:
            return self._cuda_peak
        return max_rss_mb()
