"""The child's entry point: `python -m datasite_setup.sandbox.child_main` (a cold start), or
`confine_and_run` in a child the fork server (`zygote`) forked with its imports already done.

stdin is the child's end of a Unix socket pair, the channel; it is moved aside at start and
fds 0 and 1 point at /dev/null, so neither prints nor native writes reach it by accident. The
parent sends a pickle (the parent is trusted) of `{"source", "function", "kwargs", "scratch",
"preload", "threads", "approve_threads", "forbidden_paths", "granted_paths", "max_result_bytes",
"required_layers"}` and shuts its side for writing; `kwargs` is itself a pickle so it can be
loaded after Landlock is in force (unpickling arrays imports numpy, which starts threads). The
child answers with the ready frame (with the seccomp listener attached when the parent approves
its threads, `approve_threads`; otherwise the parent has put it in a pids cgroup) and, after the
code ran, the result frame (`frames`).

Exit status 0: the harness finished. 70: a layer the parent requires could not be put in place
(an old kernel), nothing ran. 71: the zygote's imports left a thread or an open
file; the parent starts runs cold (`zygote`). 121 and up: the audit hook refused an event (`audit_hook.exit_status`).
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from typing import NoReturn

from datasite_setup.sandbox import landlock, seccomp
from datasite_setup.sandbox.audit_hook import make_audit_hook
from datasite_setup.sandbox.frames import READY_MAX_BYTES, frame, write_all
from datasite_setup.sandbox.grants import DEVICES_RW, SYSTEM_LIBRARY_DIRS, carve, readable_roots
from datasite_setup.sandbox.harness import run
from datasite_setup.sandbox.preload import preload


def threads() -> int:
    """The live threads of this process: a child confines itself only while this is 1."""
    return len(os.listdir("/proc/self/task"))


def _read_payload(channel: int) -> bytes:
    chunks = []
    while chunk := os.read(channel, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _send_ready(channel: int, layers: list[str], listener: int | None) -> None:
    """The ready frame, with the listener fd attached (SCM_RIGHTS): from then on the parent holds
    it, and the child's own copy can be closed before the code runs."""
    data = frame({"confinement": layers}, READY_MAX_BYTES)
    sock = socket.socket(fileno=channel)
    try:
        sent = socket.send_fds(sock, [data], [] if listener is None else [listener])
    finally:
        sock.detach()
    write_all(channel, data[sent:])


def confine_and_run(channel: int, warm: bool) -> NoReturn:
    """Order matters: Landlock before anything can start a thread (unpickling kwargs imports numpy,
    whose BLAS starts threads), seccomp and the audit hook only after the preloads they would slow,
    the ready frame once every layer is in force, and the audit hook last: it refuses the socket
    call that hands the listener over, and from then on nothing but the code and the harness runs.

    `warm` (a child forked from the zygote, whose imports ran with one-thread BLAS/OpenMP): the
    preloads are in already, and torch gets the run's thread count back once Landlock is in
    force, so its new threads inherit it."""
    data = _read_payload(channel)
    if not data:  # the parent gave up on this child before its run
        os._exit(0)
    payload = pickle.loads(data)
    scratch = os.path.realpath(payload["scratch"])
    forbidden = [os.path.realpath(p) for p in payload["forbidden_paths"]]
    granted = [os.path.realpath(p) for p in payload["granted_paths"]]
    os.chdir(scratch)
    read_roots = readable_roots(forbidden)
    if warm and threads() != 1:
        os.write(2, b"sandbox: a thread started before Landlock; not running the code\n")
        os._exit(70)
    layers = landlock.restrict(carve(read_roots + list(SYSTEM_LIBRARY_DIRS), forbidden) + granted, [scratch], list(DEVICES_RW))
    kwargs = pickle.loads(payload["kwargs"])
    if warm:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(payload["threads"])
    else:
        preload(payload["preload"])
    filtered, listener = seccomp.install(payload["approve_threads"])
    layers += filtered + ["audit-hook"]
    missing = sorted(set(payload["required_layers"]) - set(layers))
    if missing:
        os.write(2, f"sandbox: {', '.join(missing)} unavailable on this system; not running the code\n".encode())
        os._exit(70)
    _send_ready(channel, layers, listener)
    if listener is not None:
        os.close(listener)
    sys.addaudithook(make_audit_hook(scratch, read_roots, forbidden, granted))
    write_all(channel, run(payload, kwargs))
    os._exit(0)


def main() -> None:
    """A cold start: move the channel off stdin, point fds 0 and 1 at /dev/null, then confine."""
    channel = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    confine_and_run(channel, warm=False)


if __name__ == "__main__":
    main()
