"""What a run returns to the site, and how a failure is named for the admin's audit log.

Every name is built from a fixed set, never from text the code chose, so a failure carries no
data values.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from datasite_setup.isolation.limits import Limits
from datasite_setup.isolation.spawn import ChildUsage

_ALLOCATION_FAILURE = (b"MemoryError", b"bad_alloc", b"Cannot allocate memory", b"cannot allocate memory", b"can't allocate memory", b"out of memory")


@dataclass(frozen=True)
class IsolatedOutcome:
    """What came back. `failure` is None on success, else one of "timeout", "cpu", "memory",
    "threads", "open-files", "result-size" (the run hit that limit), "refused:<audit event>",
    "error:<builtin exception type>", "error:CodecError" (a result the codec cannot carry),
    "crashed".

    `stdout` is what the code printed (first 10 000 characters): untrusted text that no output
    contract has checked. `stderr_tail` is the child's raw fd 2 (interpreter crashes, native
    library messages) for the site's own logs only: code can write anything there, so it must
    never be forwarded to the data scientist. `confinement` names the layers that were in force;
    `warm` says the run's child was forked from a zygote whose imports were done before the run.
    `peak_rss_mb` and `cpu_seconds` are what the kernel counted for the child (its peak resident
    memory includes the preloaded libraries it shares with the zygote): what an admin sets the
    `[execution]` limits against.
    """

    ok: bool
    result: Any
    failure: str | None
    stdout: str
    seconds: float
    confinement: tuple[str, ...] = ()
    stderr_tail: str = ""
    warm: bool = False
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0


_LIMIT_FAILURES = {"MemoryError": "memory", "TooManyOpenFiles": "open-files", "ResultTooLarge": "result-size"}


def failure_from_frame(frame: dict[str, Any]) -> str | None:
    if frame["ok"]:
        return None
    error = frame["error_type"]
    return _LIMIT_FAILURES.get(error, f"error:{error}")


def failure_from_exit(status: int, usage: ChildUsage, limits: Limits, stderr: bytes) -> str:
    """Why a child that sent no frame died: SIGXCPU (or SIGKILL at the hard limit) is the CPU budget;
    an allocation failure (RLIMIT_AS makes mmap fail, native code may then abort) is memory."""
    code = os.waitstatus_to_exitcode(status)
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and usage.cpu_seconds >= limits.cpu_seconds):
        return "cpu"
    if any(marker in stderr for marker in _ALLOCATION_FAILURE):
        return "memory"
    if usage.max_rss_kb * 1024 >= 0.9 * limits.memory_mb * 1024 * 1024:
        return "memory"
    return "crashed"
