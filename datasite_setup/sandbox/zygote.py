"""The fork server: `python -m datasite_setup.sandbox.zygote MODULES`, one process that imports a
run's libraries once and forks a child for each run, which confines itself as a cold child does.

Importing torch, MONAI and pyradiomics is most of a child's start (~1.3 s of CPU on the 2-core
dev VM); a fresh interpreter per run pays it every time, and importing ahead in a spare that
waits beside the current run still takes CPU from it. Forking a process that has imported them
costs a few milliseconds, and the pages stay shared.

This process never runs untrusted code and holds nothing of the site: a scrubbed environment, no
data-dir path, no secret. What makes a fork as safe as a cold start:
- imports run with one-thread BLAS/OpenMP, and the zygote checks it is still single-threaded with
  no file open (Landlock binds only the thread that applies it; a file opened before it would stay
  readable); otherwise it exits 71 and the parent runs cold;
- the forked child closes every descriptor but its channel, its stderr and /dev/null before it
  reads its payload, starts a session of its own, sets the run's resource limits, and reseeds
  every random generator (a forked child would otherwise repeat the zygote's random stream, and
  every run would draw the same noise);
- anything that goes wrong in the forked child ends it (`os._exit`): it never returns into this loop.

Protocol (stdin is a SOCK_SEQPACKET socket to the parent): each request is one message, a pickle
(the parent is trusted) of `{"rlimits", "scratch"}` with three descriptors attached: the child's
channel, the write end of its stderr pipe, and a report socket. On the report socket the zygote
sends the child's pid with a pidfd attached, and after the child exits `REPORT` (wait status,
CPU seconds, peak RSS in KiB). The zygote reaps its children itself: only a parent can collect
an exit status and the resource usage the parent's failure names rest on. At EOF on stdin it
reports the children still running, then exits.
"""

from __future__ import annotations

import os
import pickle
import random
import resource
import selectors
import socket
import struct
import sys
import tempfile
import traceback
from typing import NoReturn

from datasite_setup.sandbox.child_main import confine_and_run, threads
from datasite_setup.sandbox.preload import preload

PID = struct.Struct("=q")
REPORT = struct.Struct("=qdq")
UNWARMABLE = 71
_CHANNEL_FD = 3


def _open_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.add(int(name))
    return found


def _reseed() -> None:
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def _take_scratch(scratch: str) -> None:
    """Where a cold child started in its scratch dir, this one started in the zygote's: its path
    entry (`python -m` puts the start dir first), HOME, TMPDIR and tempfile's cached choice all
    move to the run's scratch, so nothing looks in a dir the run may not read."""
    start_dir = os.getcwd()
    sys.path[:] = [scratch if entry in (start_dir, "") else entry for entry in sys.path]
    sys.path_importer_cache.pop(start_dir, None)
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    tempfile.tempdir = None
    os.chdir(scratch)


def _become_child(request: dict, channel: int, stderr: int) -> NoReturn:
    """In the forked child: the run's session, limits and descriptors, then confine and run. An
    error before the harness runs goes to the run's stderr and ends this child, never the loop."""
    try:
        os.setsid()
        for which, soft, hard in request["rlimits"]:
            resource.setrlimit(which, (soft, hard))
        os.dup2(stderr, 2)
        os.dup2(channel, _CHANNEL_FD)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.closerange(_CHANNEL_FD + 1, os.sysconf("SC_OPEN_MAX"))
        _take_scratch(request["scratch"])
        _reseed()
        confine_and_run(_CHANNEL_FD, warm=True)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def _fork(control: socket.socket, selector: selectors.BaseSelector) -> bool:
    """Serve one request; False at EOF (the parent is gone or stopped this zygote)."""
    data, fds, _, _ = socket.recv_fds(control, 1 << 16, 3)
    if not data:
        return False
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return True
    channel, stderr, report_fd = fds
    request = pickle.loads(data)
    pid = os.fork()
    if pid == 0:
        _become_child(request, channel, stderr)
    os.close(channel)
    os.close(stderr)
    report = socket.socket(fileno=report_fd)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(report, [PID.pack(pid)], [pidfd])
    except OSError:
        pass
    selector.register(pidfd, selectors.EVENT_READ, (pid, report))
    return True


def _report_exit(pidfd: int, pid: int, report: socket.socket) -> None:
    _, status, usage = os.wait4(pid, 0)
    try:
        report.send(REPORT.pack(status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss))
    except OSError:
        pass
    report.close()
    os.close(pidfd)


def serve(control: socket.socket) -> None:
    """Fork a child per request and report each child's exit, until EOF and no child is left."""
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ, None)
        listening = True
        while listening or len(selector.get_map()) > 0:
            for key, _ in selector.select():
                if key.data is None:
                    if not _fork(control, selector):
                        selector.unregister(control)
                        listening = False
                else:
                    selector.unregister(key.fd)
                    _report_exit(key.fd, *key.data)


def main() -> None:
    control = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    preload([m for m in sys.argv[1].split(",") if m], optimiser=True)
    if threads() != 1 or _open_fds() - {0, 1, 2, control.fileno()}:
        os.write(2, b"sandbox: preloading left a thread or an open file; runs start cold\n")
        os._exit(UNWARMABLE)
    serve(control)


if __name__ == "__main__":
    main()
