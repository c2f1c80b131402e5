"""Warm children: forked from a zygote (`sandbox.zygote`) that did a run's imports once.

A site runs the same kind of child over and over, and most of a cold child's start is importing
torch, MONAI and pyradiomics. One zygote per preload tuple imports them at server start
(`start_fork_server`) or at the first run that wants them, then forks a child per run in a few
milliseconds; nothing imports beside a run any more. The zygote costs ~450 MB resident once (its
pages are shared with the children it forks).

A run falls back to a cold child when the zygote cannot serve: it found its imports left a thread
or an open file (exit 71: that preload tuple is never tried warm again), it died (the next run
starts a new one), or it did not answer in time: within the run's wall clock while it may still be importing (its
first fork), within FORK_REPLY_S once it has forked before, since forking takes milliseconds and a
stuck zygote should cost a run seconds, not its whole wall clock.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading

from datasite_setup.isolation.limits import Limits
from datasite_setup.isolation.spawn import DEFAULT_PRELOAD, Child, ChildUsage, child_env
from datasite_setup.sandbox.zygote import PID, REPORT, UNWARMABLE

ZYGOTE_MODULE = "datasite_setup.sandbox.zygote"
MAX_FORK_SERVERS = 2
REAP_TIMEOUT_S = 30.0
FORK_REPLY_S = 10.0
# A child the zygote could not report (it died first) counts as killed: the run fails "crashed".
_UNREPORTED = (int(signal.SIGKILL), ChildUsage(0.0, 0))


class ForkServer:
    """One zygote: a process that imported `preload` and forks a child per `fork` call."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.preload = preload
        self._home = tempfile.TemporaryDirectory(prefix="medfed-zygote-", ignore_cleanup_errors=True)
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        self._has_forked = False
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-B", "-m", ZYGOTE_MODULE, ",".join(preload)],
                stdin=theirs,
                stdout=subprocess.DEVNULL,
                cwd=self._home.name,
                env=child_env(self._home.name, 1),
                start_new_session=True,
                close_fds=True,
            )

    def fork(self, limits: Limits, timeout: float) -> Child | None:
        """A child forked for a run with `limits`, or None when the zygote cannot serve: it did not
        answer within `timeout` (within FORK_REPLY_S once it has forked a child before)."""
        if self._has_forked:
            timeout = min(timeout, FORK_REPLY_S)
        scratch = tempfile.TemporaryDirectory(prefix="medfed-sandbox-", ignore_cleanup_errors=True)
        channel, channel_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        report, report_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        request = pickle.dumps({"rlimits": limits.rlimits(), "scratch": scratch.name})
        try:
            with self._lock:
                socket.send_fds(self._control, [request], [channel_theirs.fileno(), err_write, report_theirs.fileno()])
            report.settimeout(timeout)
            data, fds, _, _ = socket.recv_fds(report, PID.size, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            data, fds = b"", []
        finally:
            channel_theirs.close()
            report_theirs.close()
            os.close(err_write)
        if len(data) != PID.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            for end in (channel, report):
                end.close()
            os.close(err_read)
            scratch.cleanup()
            return None
        (pid,) = PID.unpack(data)
        self._has_forked = True
        return Child(pid, fds[0], channel, err_read, scratch, True, functools.partial(_reported_exit, report))

    def unwarmable(self) -> bool:
        return self.proc.poll() == UNWARMABLE

    def stop(self) -> None:
        """End of requests: the zygote exits once the children it still runs are reported."""
        self._control.close()
        try:
            self.proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._home.cleanup()


def _reported_exit(report: socket.socket) -> tuple[int, ChildUsage]:
    """The wait status and usage the zygote reaped for this child (which the parent has killed)."""
    report.settimeout(REAP_TIMEOUT_S)
    try:
        data = report.recv(REPORT.size)
    except OSError:
        data = b""
    finally:
        report.close()
    if len(data) != REPORT.size:
        return _UNREPORTED
    status, cpu_seconds, max_rss_kb = REPORT.unpack(data)
    return status, ChildUsage(cpu_seconds, max_rss_kb)


class ForkServers:
    """The zygotes of this process, one per preload tuple, the most recently used MAX_FORK_SERVERS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, ...], ForkServer] = {}
        self._unwarmable: set[tuple[str, ...]] = set()

    def start(self, preload: tuple[str, ...]) -> ForkServer | None:
        """The running zygote for `preload`, started if there is none; None for a tuple that cannot run warm."""
        evicted = []
        with self._lock:
            server = self._servers.pop(preload, None)
            if server is not None and server.proc.poll() is not None:
                if server.unwarmable():
                    self._unwarmable.add(preload)
                evicted.append(server)
                server = None
            if server is None and preload not in self._unwarmable:
                server = ForkServer(preload)
            if server is not None:
                self._servers[preload] = server
            while len(self._servers) > MAX_FORK_SERVERS:
                evicted.append(self._servers.pop(next(iter(self._servers))))
        for old in evicted:
            old.stop()
        return server

    def fork(self, preload: tuple[str, ...], limits: Limits, timeout: float) -> Child | None:
        """A warm child, or None: the run starts cold, and a zygote that failed is replaced next time."""
        server = self.start(preload)
        if server is None:
            return None
        child = server.fork(limits, timeout)
        if child is None:
            with self._lock:
                if self._servers.get(preload) is server:
                    del self._servers[preload]
            server.proc.kill()
            server.stop()
            if server.unwarmable():
                with self._lock:
                    self._unwarmable.add(preload)
        return child

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers = {}
        for server in servers:
            server.stop()


FORK_SERVERS = ForkServers()
atexit.register(FORK_SERVERS.stop_all)


def start_fork_server(preload: tuple[str, ...] = DEFAULT_PRELOAD) -> None:
    """Start the zygote for `preload` now (a server does at start), so that the first run is warm too."""
    FORK_SERVERS.start(preload)


def stop_fork_servers() -> None:
    """Stop every zygote (tests; a server's zygotes also end with it, at EOF on their control socket)."""
    FORK_SERVERS.stop_all()
