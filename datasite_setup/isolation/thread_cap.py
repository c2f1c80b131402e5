"""The thread cap where no pids cgroup holds it (`thread_cgroup`): the parent approves each thread
the child starts, up to `Limits.max_threads`.

The child's seccomp filter turns every thread-creating clone into a user notification
(`sandbox.seccomp`): the kernel holds the calling thread until this side answers through the
listener fd the child handed over before its code ran. A kernel-held count works for root too,
where RLIMIT_NPROC does not, and covers native threads (OpenMP, BLAS, std::thread) as well as
Python's. A refused thread fails with EAGAIN in the child and the run fails with "threads",
whatever the child reports afterwards.

Counting: the live threads are the entries of /proc/PID/task, plus clones approved but perhaps not
finished yet. A thread makes one system call at a time, so a clone approved for thread T has
finished once T asks again or is gone; until then (and at most `IN_FLIGHT_S`) it counts. A thread
that started and ended between two checks is never seen in /proc, and so never counts for longer.

Latency: each approval is a round trip between the child and the parent. With the listener's
synchronous wake-up (Linux >= 6.6) the kernel runs the parent, then the child again, on the CPU of
the asking thread instead of waking an idle one; older kernels refuse the flag and answer as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import time

# struct seccomp_notif: id, pid, flags, then struct seccomp_data (nr, arch, ip, args[6]).
_NOTIF = struct.Struct("=QII iIQ6Q")
# struct seccomp_notif_resp: id, val, error, flags.
_RESPONSE = struct.Struct("=QqiI")
_IOCTL_RECV, _IOCTL_SEND = 0xC0502100, 0xC0182101  # SECCOMP_IOCTL_NOTIF_RECV / _SEND (_IOWR('!', n, size))
_IOCTL_SET_FLAGS, _SYNC_WAKE_UP = 0x40082104, 1  # SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
_FLAG_CONTINUE = 1
IN_FLIGHT_S = 0.5


class ThreadCap:
    """Answers one child's thread notifications; `refused` once it has refused one."""

    def __init__(self, pid: int, listener: int, max_threads: int) -> None:
        self.pid = pid
        self.listener = listener
        self.max_threads = max_threads
        self.refused = False
        self._in_flight: dict[int, float] = {}  # asking thread -> when its clone was approved
        try:
            fcntl.ioctl(listener, _IOCTL_SET_FLAGS, _SYNC_WAKE_UP)
        except OSError:  # before Linux 6.6
            pass

    def answer(self) -> bool:
        """Answer the pending notification (call when the listener is readable); False once the
        child can send none any more."""
        request = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self.listener, _IOCTL_RECV, request, True)
        except OSError:  # the asking thread was interrupted or killed, or the whole child is gone
            return not self._hung_up()
        notification_id, asking = _NOTIF.unpack(request)[:2]
        try:
            live = {int(tid) for tid in os.listdir(f"/proc/{self.pid}/task")}
        except OSError:
            live = None
        now = time.monotonic()
        self._in_flight = {
            tid: when for tid, when in self._in_flight.items()
            if tid != asking and now - when <= IN_FLIGHT_S and (live is None or tid in live)
        }
        if live is not None and len(live) + len(self._in_flight) < self.max_threads:
            self._in_flight[asking] = now
            response = _RESPONSE.pack(notification_id, 0, 0, _FLAG_CONTINUE)
        else:
            self.refused = True
            response = _RESPONSE.pack(notification_id, 0, -errno.EAGAIN, 0)
        try:
            fcntl.ioctl(self.listener, _IOCTL_SEND, response)
        except OSError:  # the thread that asked was killed meanwhile
            pass
        return True

    def _hung_up(self) -> bool:
        """The listener reports POLLHUP once no thread of the child is left to notify."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def close(self) -> None:
        os.close(self.listener)
