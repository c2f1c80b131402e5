"""Warm spares: children that did their imports ahead of the run that will use them.

Most of a child's start is imports, and a site runs the same kind of child over and over, so
after a run (and at server start, `prewarm`) spare children for its (preload, limits) are
started, up to SPARES_PER_KIND, that import their preloads and then wait for a payload; the next
run takes the oldest. With two, runs that follow each other at once (training, evaluation, the
next round's training) each find one that has finished or nearly finished importing; a run that
took the last spare starts one at once. Imports are CPU work all the same: on a small machine a
spare importing beside a run slows it (a fork server would avoid re-importing altogether). A spare
imports with one-thread BLAS/OpenMP so that it is still single-threaded when it confines itself
(the child checks; a spare that fails the check exits and the run starts cold, as does any run
that finds no spare). Cost: ~450 MB resident per idle spare with torch and radiomics.
"""

from __future__ import annotations

import atexit
import threading

from datasite_setup.isolation.limits import Limits
from datasite_setup.isolation.spawn import DEFAULT_PRELOAD, Child, spawn

SPARES_PER_KIND = 2  # training then evaluation back to back: each finds one that has finished importing
MAX_SPARES = 4


class SparePool:
    """Warm children waiting for a run, up to `count` per (preload, limits), oldest taken first, at
    most MAX_SPARES in all; a kind whose spare failed its warm-up check is not tried again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[tuple[tuple[str, ...], Limits], list[Child]] = {}
        self._unwarmable: set[tuple[tuple[str, ...], Limits]] = set()

    def take(self, preload: tuple[str, ...], limits: Limits) -> Child | None:
        key = (preload, limits)
        with self._lock:
            queue = self._children.get(key, [])
            child = queue.pop(0) if queue else None
        if child is not None and child.proc.poll() is not None:
            with self._lock:
                self._unwarmable.add(key)
            child.discard()
            return None
        return child

    def refill(self, preload: tuple[str, ...], limits: Limits, count: int) -> None:
        key = (preload, limits)
        while True:
            with self._lock:
                if key in self._unwarmable or len(self._children.get(key, [])) >= count:
                    return
            child = spawn(preload, limits, warm=True)
            evicted = []
            with self._lock:
                queue = self._children.setdefault(key, [])
                if len(queue) >= count:
                    evicted.append(child)
                else:
                    queue.append(child)
                    self._children[key] = self._children.pop(key)  # most recently used kind last
                    while sum(map(len, self._children.values())) > MAX_SPARES:
                        oldest = next(iter(self._children))
                        evicted.append(self._children[oldest].pop(0))
                        if not self._children[oldest]:
                            del self._children[oldest]
            for old in evicted:
                old.discard()
            if child in evicted:
                return

    def discard_all(self) -> None:
        with self._lock:
            children = [c for queue in self._children.values() for c in queue]
            self._children = {}
        for child in children:
            child.discard()


SPARES = SparePool()
atexit.register(SPARES.discard_all)


def prewarm(limits: Limits, preload: tuple[str, ...] = DEFAULT_PRELOAD, spares: int = SPARES_PER_KIND) -> None:
    """Start spare children now (a server calls this at start) so the first runs are warm too."""
    SPARES.refill(preload, limits, spares)


def discard_spares() -> None:
    """Stop every spare child (tests; a server's spares also die with it)."""
    SPARES.discard_all()
