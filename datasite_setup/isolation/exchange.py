"""The parent's side of one run's I/O: payload out, frames and stderr tail in, thread requests
answered, until the child is gone or a limit is hit.

One thread, one selector, so a run never leaves a reader thread behind. The selector is poll(2),
not epoll: the thread cap asks the kernel to wake this side on the CPU of the child thread waiting
for its approval (`thread_cap`), and epoll drops that hint on the way (a new thread took ~107 us
instead of ~80 us on the 2-core dev VM, ~53 us in process). The listener that
arrives with the ready frame (the first bytes on the channel, sent before the code ran) is the
only file descriptor accepted from the child; any other is closed unread.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass

from datasite_setup.isolation.spawn import Child
from datasite_setup.isolation.thread_cap import ThreadCap

STDERR_TAIL = 64 * 1024
EXIT_GRACE_SECONDS = 1.0
_CHUNK = 1 << 20


@dataclass
class Exchanged:
    """What the child sent (at most `max_out` bytes of frames, the tail of its stderr) and why
    the exchange stopped early, if it did."""

    out: bytearray
    err: bytearray
    timed_out: bool = False
    overflowed: bool = False
    threads_refused: bool = False


def exchange(child: Child, payload: bytes, deadline: float, max_out: int, max_threads: int) -> Exchanged:
    """Send the payload (then shut the channel for writing), collect what the child sends, answer
    its thread requests, until it exits (plus a grace period for the channel to drain), the
    deadline passes, it sends more than `max_out` bytes or asks for a thread beyond `max_threads`."""
    got = Exchanged(bytearray(), bytearray())
    channel, cap = child.channel, None
    pending = memoryview(payload)
    exited_at: float | None = None
    channel.setblocking(False)
    with selectors.PollSelector() as selector:
        selector.register(channel, selectors.EVENT_READ | selectors.EVENT_WRITE, "channel")
        selector.register(child.stderr, selectors.EVENT_READ, "err")
        selector.register(child.pidfd, selectors.EVENT_READ, "exit")
        try:
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    got.timed_out = True
                    return got
                if exited_at is not None and now - exited_at > EXIT_GRACE_SECONDS:
                    break
                for key, events in selector.select(min(deadline - now, EXIT_GRACE_SECONDS)):
                    if key.data == "exit":
                        selector.unregister(child.pidfd)
                        exited_at = time.monotonic()
                    elif key.data == "threads":
                        assert cap is not None
                        if not cap.answer():
                            selector.unregister(cap.listener)
                        if cap.refused:
                            got.threads_refused = True
                            return got
                    elif key.data == "err":
                        chunk = os.read(key.fd, _CHUNK)
                        if not chunk:
                            selector.unregister(key.fd)
                        got.err += chunk
                        del got.err[:-STDERR_TAIL]
                    else:
                        if events & selectors.EVENT_WRITE:
                            pending = _send(channel, pending)
                            if not pending:
                                _shut_for_writing(channel)
                                selector.modify(channel, selectors.EVENT_READ, "channel")
                        if events & selectors.EVENT_READ:
                            data, fds = _receive(channel)
                            for fd in fds:
                                if cap is None and not got.out:
                                    cap = ThreadCap(child.pid, fd, max_threads)
                                    selector.register(fd, selectors.EVENT_READ, "threads")
                                else:
                                    os.close(fd)
                            if data is None:
                                continue
                            if not data:
                                selector.unregister(channel)
                            got.out += data
                            if len(got.out) > max_out:
                                got.overflowed = True
                                return got
        finally:
            if cap is not None:
                cap.close()
    return got


def _send(channel: socket.socket, pending: memoryview) -> memoryview:
    try:
        return pending[channel.send(pending[:_CHUNK]) :]
    except BlockingIOError:
        return pending
    except OSError:  # the child is gone: nothing more to send
        return pending[:0]


def _shut_for_writing(channel: socket.socket) -> None:
    try:
        channel.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _receive(channel: socket.socket) -> tuple[bytes | None, list[int]]:
    """(data, passed fds); data None when there was nothing to read after all, b"" at the end."""
    try:
        data, fds, _, _ = socket.recv_fds(channel, _CHUNK, 1, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return None, []
    except OSError:
        return b"", []
    return data, fds
