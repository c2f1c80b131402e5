"""Starting a sandboxed child cold: a fresh interpreter with a scrubbed environment, its own scratch
dir and session, the run's resource limits already in force, and a Unix socket pair as its only
channel to the parent (the child's stdin; stdout goes to /dev/null). `fork_server` starts warm
children with the same environment.

The resource limits are set by `preexec_fn`, which runs Python between fork and exec, a known
hazard in threaded programs; it is kept to `setrlimit` calls on pre-built arguments (no imports,
no locks), which is as small as that window gets.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, NamedTuple

from datasite_setup.isolation.limits import Limits
from datasite_setup.sandbox.grants import PROJECT_ROOT

CHILD_MODULE = "datasite_setup.sandbox.child_main"
# pydicom is here because importing it pulls in urllib3, which opens a socket at import time to
# probe for IPv6: after the audit hook that is refused, and every task that touches a domain (the
# brain MR domain imports pydicom) would fail with "refused:socket.__new__".
DEFAULT_PRELOAD = ("numpy", "torch", "radiomics", "pydicom", "monai", "opacus", "datasite_setup.site_tasks")
PASSED_ENV = ("LANG",)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@functools.cache
def _project_import_path() -> str | None:
    """PYTHONPATH the child needs to import this project, or None when the install already provides it."""
    probe = subprocess.run(
        [sys.executable, "-B", "-c", f"import {CHILD_MODULE}"],
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    return None if probe.returncode == 0 else str(PROJECT_ROOT)


def child_env(scratch: str, threads: int) -> dict[str, str]:
    """Nothing of the server's environment (its secrets live there) beyond what the child needs;
    its BLAS/OpenMP pools sized to `threads`. A fixed user name, because libraries ask for one at
    import (MONAI's `getpass.getuser()`) and the child may have no passwd entry to find."""
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LOGNAME": "sandbox"}
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    env.update({name: str(threads) for name in THREAD_ENV})
    pythonpath = _project_import_path()
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def _apply_limits(rlimits: tuple[tuple[int, int, int], ...]) -> None:
    """preexec_fn: runs in the forked child before exec, so it only makes setrlimit calls."""
    for which, soft, hard in rlimits:
        resource.setrlimit(which, (soft, hard))


def run_threads(limits: Limits) -> int:
    """The threads a run's BLAS/OpenMP/torch pools get: the server's OMP_NUM_THREADS, else one
    per core, and at most half of `max_threads`, so the pools leave room for the code's own."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    wanted = int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))
    return max(1, min(wanted, limits.max_threads // 2))


class ChildUsage(NamedTuple):
    """What the kernel counted for a reaped child: CPU seconds (user + system) and peak RSS (KiB)."""

    cpu_seconds: float
    max_rss_kb: int


@dataclass
class Child:
    """A started child, cold or forked warm from the zygote: its pid and a pidfd (signals and exit
    notice that cannot reach a reused pid), the parent's ends of its channel and stderr pipe, the
    scratch dir it owns, and how to collect its exit status once it is gone."""

    pid: int
    pidfd: int
    channel: socket.socket
    stderr: int
    scratch: tempfile.TemporaryDirectory
    warm: bool
    reap: Callable[[], tuple[int, ChildUsage]]

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def release(self) -> None:
        """Close the channel, the stderr pipe and the pidfd and remove the scratch dir (the child is reaped)."""
        self.channel.close()
        os.close(self.stderr)
        os.close(self.pidfd)
        self.scratch.cleanup()


def _wait(proc: subprocess.Popen) -> tuple[int, ChildUsage]:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, ChildUsage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def spawn(limits: Limits) -> Child:
    """Start a cold child: a fresh interpreter that imports the run's preloads once it is confined."""
    scratch = tempfile.TemporaryDirectory(prefix="medfed-sandbox-", ignore_cleanup_errors=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    err_read, err_write = os.pipe2(os.O_CLOEXEC)
    try:
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-B", "-m", CHILD_MODULE],
                stdin=theirs,
                stdout=subprocess.DEVNULL,
                stderr=err_write,
                cwd=scratch.name,
                env=child_env(scratch.name, run_threads(limits)),
                preexec_fn=functools.partial(_apply_limits, limits.rlimits()),
                start_new_session=True,
                close_fds=True,
            )
    except BaseException:
        ours.close()
        os.close(err_read)
        scratch.cleanup()
        raise
    finally:
        os.close(err_write)
    return Child(proc.pid, os.pidfd_open(proc.pid), ours, err_read, scratch, False, functools.partial(_wait, proc))
