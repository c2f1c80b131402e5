"""Waiting for the processes a benchmark started to go quiet before it times anything.

On a 2-core machine a site's zygote importing torch and pyradiomics, or a store syncing,
would run beside what is timed; every benchmark waits for its processes to settle first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any


def wait_until_idle(processes: Callable[[], Iterable[Any]], timeout_s: float, window_s: float = 0.5) -> float:
    """Wait until `processes()` (psutil processes, asked anew each time) together use less than
    5% of a core; return the seconds waited."""
    import psutil

    def cpu() -> dict[int, float]:
        seconds = {}
        for proc in processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                seconds[proc.pid] = times.user + times.system
        return seconds

    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        before = cpu()
        time.sleep(window_s)
        after = cpu()
        if sum(value - before.get(pid, 0.0) for pid, value in after.items()) < 0.05 * window_s:
            break
    return round(time.perf_counter() - started, 2)


def with_children(pids: Iterable[int]) -> Callable[[], list[Any]]:
    """These processes and all their descendants, looked up each time (sandbox children come and go)."""
    import psutil

    def processes() -> list[Any]:
        found = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
        return found

    return processes
