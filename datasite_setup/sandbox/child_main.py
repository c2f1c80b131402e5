"""The child's entry point: `python -m datasite_setup.sandbox.child_main [--warm MODULES]`.

stdin is the child's end of a Unix socket pair, the channel; it is moved aside at start and
fds 0 and 1 point at /dev/null, so neither prints nor native writes reach it by accident. The
parent sends a pickle (the parent is trusted) of `{"source", "function", "kwargs", "scratch",
"preload", "threads", "forbidden_paths", "granted_paths", "max_result_bytes", "required_layers"}` and shuts its
side for writing; `kwargs` is itself a pickle so it can be loaded after Landlock is in force
(unpickling arrays imports numpy, which starts threads). The child answers with the ready frame
(with the seccomp listener attached) and, after the code ran, the result frame (`frames`).

Exit status 0: the harness finished. 70: a layer the parent requires could not be put in place
(an old kernel), nothing ran. 71: a warm spare's imports left a thread or an open file; the
parent starts runs cold. 121 and up: the audit hook refused an event (`audit_hook.exit_status`).
"""

from __future__ import annotations

import os
import pickle
import socket
import sys

from datasite_setup.sandbox import landlock, seccomp
from datasite_setup.sandbox.audit_hook import make_audit_hook
from datasite_setup.sandbox.frames import READY_MAX_BYTES, frame, write_all
from datasite_setup.sandbox.grants import DEVICES_RW, SYSTEM_LIBRARY_DIRS, carve, readable_roots
from datasite_setup.sandbox.harness import run
from datasite_setup.sandbox.preload import preload


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _unexpected_fds(expected: set[int]) -> list[int]:
    return sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if fd not in expected and _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _warm_up(modules: list[str], expected_fds: set[int]) -> None:
    """A warm child imports before it knows its run: that is only as safe as a cold start if the
    imports left nothing behind that Landlock cannot reach - no second thread (Landlock binds only
    the calling thread and those it starts later) and no open file. Otherwise exit 71 and the
    parent falls back to a cold start."""
    preload(modules, optimiser=True)
    if _threads() != 1 or _unexpected_fds(expected_fds):
        os.write(2, b"sandbox: preloading left a thread or an open file; this child cannot run code warm\n")
        os._exit(71)


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


def main() -> None:
    """Order matters: Landlock before anything can start a thread (unpickling kwargs imports numpy,
    whose BLAS starts threads), seccomp and the audit hook only after the preloads they would slow,
    the ready frame once every layer is in force, and the audit hook last: it refuses the socket
    call that hands the listener over, and from then on nothing but the code and the harness runs.

    `--warm MODULES` (a spare the parent starts ahead of its run, with one-thread BLAS/OpenMP
    settings): preload first, check the process is still single-threaded with no open file, then
    wait for the payload and confine as a cold child does; torch gets the run's thread count back
    once Landlock is in force, so its new threads inherit it."""
    warm = sys.argv[1:2] == ["--warm"]
    channel = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    if warm:
        _warm_up([m for m in sys.argv[2].split(",") if m], {0, 1, 2, channel})
    data = _read_payload(channel)
    if not data:  # a spare the parent discarded
        os._exit(0)
    payload = pickle.loads(data)
    scratch = os.path.realpath(payload["scratch"])
    forbidden = [os.path.realpath(p) for p in payload["forbidden_paths"]]
    granted = [os.path.realpath(p) for p in payload["granted_paths"]]
    os.chdir(scratch)
    read_roots = readable_roots(forbidden)
    if warm and _threads() != 1:
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
    filtered, listener = seccomp.install()
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


if __name__ == "__main__":
    main()
