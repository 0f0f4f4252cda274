"""Peak memory of a process and all its descendants (workers, Ray), sampled in a thread.

Two measures: summed RSS, which counts a page shared by several processes (a library, a
forked worker's inherited heap) once per process, and summed PSS (Linux), which splits
shared pages among the processes that share them and so adds up to what the tree really
occupies. PSS is the one to compare; RSS is kept as the familiar upper bound.
"""

from __future__ import annotations

import contextlib
import threading
import time
from types import TracebackType

import psutil


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.pss_bytes`, `peak.rss_bytes`, `peak.processes`."""

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.rss_bytes = 0
        self.pss_bytes = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="peak-memory", daemon=True)

    @property
    def bytes(self) -> int:
        """The measure to compare: PSS where the system reports it, else RSS."""
        return self.pss_bytes or self.rss_bytes

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has exited
            return
        rss = pss = 0
        for process in tree:
            with contextlib.suppress(psutil.Error):  # exited after listing
                info = process.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
        self.rss_bytes = max(self.rss_bytes, rss)
        self.pss_bytes = max(self.pss_bytes, pss)
        self.processes = max(self.processes, len(tree))

    def _sample_until_stopped(self) -> None:
        # Reading a large process tree's PSS makes the kernel walk its page tables: wait at
        # least 20 times as long as a sample took, so sampling never costs over ~5% of a core.
        pause = self.interval
        while not self._stop.wait(pause):
            started = time.perf_counter()
            self.sample()
            pause = max(self.interval, 20 * (time.perf_counter() - started))

    def start(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
