"""One run's budget, and the resource limits the kernel enforces it with."""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """One run's budget.

    `cpu_seconds` (RLIMIT_CPU), `wall_seconds` (the parent's clock), `memory_mb` (RLIMIT_AS),
    `max_threads` (live threads of the child, main thread included: with `thread_cgroup`, counted
    by the kernel in a pids cgroup of the run's own where the server may make one; else the parent
    approves each new one, `thread_cap`), `max_open_files` (RLIMIT_NOFILE, which binds root as
    well), `max_result_mb` (the result frame; the parent stops reading beyond it). The child can
    start no process at all (seccomp).

    RLIMIT_AS counts virtual memory, which shared libraries and thread stacks inflate beyond what
    is touched: on the 2-core dev VM numpy alone maps ~0.1 GB, numpy+torch ~0.6 GB, and every
    extra thread adds its stack (8 MB by default).
    """

    cpu_seconds: int = 600
    wall_seconds: float = 900
    memory_mb: int = 4096
    max_threads: int = 64
    max_open_files: int = 256
    max_result_mb: int = 256
    thread_cgroup: bool = True

    def __post_init__(self) -> None:
        if self.cpu_seconds < 1 or self.wall_seconds <= 0 or self.memory_mb < 64:
            raise ValueError(f"limits must be positive (memory at least 64 MB): {self}")
        if self.max_threads < 4 or self.max_open_files < 32 or self.max_result_mb < 1:
            raise ValueError(f"limits too small (at least 4 threads, 32 open files, 1 MB of result): {self}")

    @property
    def max_result_bytes(self) -> int:
        return self.max_result_mb * 1024 * 1024

    def rlimits(self) -> tuple[tuple[int, int, int], ...]:
        """(resource, soft, hard) for setrlimit in the child before it starts; the open-file limit
        no higher than this process's own hard limit, which an unprivileged server cannot exceed."""
        memory = self.memory_mb * 1024 * 1024
        files = self.max_open_files
        hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard_files != resource.RLIM_INFINITY:
            files = min(files, hard_files)
        return (
            (resource.RLIMIT_CPU, self.cpu_seconds, self.cpu_seconds + 1),
            (resource.RLIMIT_AS, memory, memory),
            (resource.RLIMIT_NOFILE, files, files),
            (resource.RLIMIT_CORE, 0, 0),
        )
