"""Peak resident memory of this process and all its descendants (workers, Ray), sampled."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


class PeakMemory:
    """`with PeakMemory() as peak: ...; peak.bytes` is the largest sum of RSS seen over the
    process tree (sampled every `interval` seconds; shared pages count once per process)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="peak-memory", daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a worker that just exited
                continue
        self.bytes = max(self.bytes, total)
        return total

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
