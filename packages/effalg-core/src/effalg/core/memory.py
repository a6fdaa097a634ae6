"""Process memory as users count it: anonymous resident memory (``RssAnon``; file-backed safetensors mmap pages do
not count), and the peak of a block of work (calibration and search report theirs)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["rss_anon", "PeakMemory", "reports_peak_memory"]


def rss_anon(pid: int | str = "self") -> int:
    """Anonymous resident memory of process ``pid`` in bytes (``RssAnon`` of ``/proc/<pid>/status``); Linux only."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"rss_anon: no RssAnon line in /proc/{pid}/status (not Linux?)")


class PeakMemory:
    """Context: samples this process's ``RssAnon`` every ``interval`` seconds on a daemon thread; ``peak_mib`` is
    the peak above the value at entry (None where ``/proc`` is unavailable)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        try:
            self._start = self._peak = rss_anon()
        except (OSError, RuntimeError):
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_anon())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_anon())
        self.peak_mib = (self._peak - self._start) / 2**20


def reports_peak_memory(logger: Any, what: str) -> Callable:
    """Decorator: run the function under :class:`PeakMemory` and log (info) its peak anonymous memory as ``what``."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with PeakMemory() as mem:
                out = fn(*args, **kwargs)
            if mem.peak_mib is not None:
                logger.info("%s: peak anonymous memory %+.0f MiB above its start", what, mem.peak_mib)
            return out

        return wrapper

    return deco
