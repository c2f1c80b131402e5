"""seccomp: the system calls the child may never make (x86_64 only), and the thread cap.

No sockets, no exec, no fork, no ptrace or reading other processes' memory, no signals outside
the process, no mount/namespace/module/keyring calls, no chmod/chown, no raising resource
limits. Native code is held by this as much as Python is.

Threads: a new thread (clone with CLONE_THREAD) is counted outside the child. Where the parent
put the child in a pids cgroup (`datasite_setup.isolation.thread_cgroup`) the kernel counts and the
filter lets the clone through. Otherwise the parent decides, through a seccomp user-notification
listener: the kernel holds the calling thread until the parent has counted the child's threads and
answered (`datasite_setup.isolation.thread_cap`). RLIMIT_NPROC cannot do either: it counts every
process of the user, and root ignores it. The listener must leave the child before the untrusted
code runs (`child_main` hands it over and closes it), or that code could approve its own threads.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import Any

from datasite_setup.sandbox.libc import libc, set_no_new_privs

_X86_64_DENIED = (
    41, 42, 43, 49, 50, 53, 288,  # socket connect accept bind listen socketpair accept4
    57, 58, 59, 322,  # fork vfork execve execveat
    62, 200, 129, 297, 424, 434, 438,  # kill tkill rt_(tg)sigqueueinfo pidfd_send_signal pidfd_open pidfd_getfd
    101, 310, 311, 440,  # ptrace process_vm_readv process_vm_writev process_madvise
    90, 91, 92, 93, 94, 260, 268, 452,  # chmod fchmod chown fchown lchown fchownat fchmodat fchmodat2
    188, 189, 190, 197, 198, 199,  # setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
    133, 259, 160,  # mknod mknodat setrlimit
    165, 166, 155, 161, 272, 308, 428, 429, 430, 431, 432, 433, 442,  # mount family, chroot, namespaces
    303, 304, 321, 298, 323, 135,  # name_to_handle_at open_by_handle_at bpf perf_event_open userfaultfd personality
    246, 320, 175, 313, 176, 169, 167, 168, 172, 173,  # kexec, modules, reboot, swap, iopl/ioperm
    248, 249, 250, 425, 426, 427,  # add_key request_key keyctl io_uring_*
    103, 163, 164, 227, 305, 159, 170, 171, 179,  # syslog acct clocks hostname quotactl
)
_SYS_CLONE, _SYS_CLONE3, _SYS_PRLIMIT64, _SYS_TGKILL, _SYS_SECCOMP = 56, 435, 302, 234, 317
_AUDIT_ARCH_X86_64 = 0xC000003E
_CLONE_THREAD = 0x00010000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _NOTIFY, _EPERM, _ENOSYS = 0x7FFF0000, 0x7FC00000, 0x00050000 | 1, 0x00050000 | 38
_SET_MODE_FILTER = 1
# TSYNC: every thread of the process; NEW_LISTENER: return the notification fd; TSYNC_ESRCH
# (Linux >= 5.7, required with both): a thread that could not be synchronised fails the call
# with ESRCH instead of returning its id, which would pass for a listener fd.
_TSYNC, _NEW_LISTENER, _TSYNC_ESRCH = 1, 8, 16


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def program(pid: int, approve_threads: bool) -> bytes:
    """A classic-BPF filter: EPERM for the denied syscalls, ENOSYS for clone3 (glibc then uses clone,
    whose flags a filter can read), clone only with CLONE_THREAD (and, with `approve_threads`, only
    as the parent answers), prlimit64 only to read, tgkill only to this process's own threads
    (raise, abort and pthread_kill use it)."""
    code: list[tuple[int, Any, Any, int]] = [
        (_LD_ABS, 0, 0, 4),
        (_JEQ, 0, "deny", _AUDIT_ARCH_X86_64),
        (_LD_ABS, 0, 0, 0),
        (_JGE, "deny", 0, 0x40000000),  # x32 ABI numbers
        (_JEQ, "clone", 0, _SYS_CLONE),
        (_JEQ, "enosys", 0, _SYS_CLONE3),
        (_JEQ, "prlimit", 0, _SYS_PRLIMIT64),
        (_JEQ, "tgkill", 0, _SYS_TGKILL),
        *[(_JEQ, "deny", 0, nr) for nr in _X86_64_DENIED],
        (_RET, 0, 0, _ALLOW),
    ]
    labels = {"clone": len(code)}
    code += [(_LD_ABS, 0, 0, 16), (_JSET, "notify" if approve_threads else "allow", "deny", _CLONE_THREAD)]
    labels["tgkill"] = len(code)
    code += [(_LD_ABS, 0, 0, 16), (_JEQ, "allow", "deny", pid)]  # pid_t: the kernel reads the low word only
    labels["prlimit"] = len(code)
    code += [(_LD_ABS, 0, 0, 32), (_JEQ, 0, "deny", 0), (_LD_ABS, 0, 0, 36), (_JEQ, "allow", "deny", 0)]
    labels.update(allow=len(code), deny=len(code) + 1, enosys=len(code) + 2, notify=len(code) + 3)
    code += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM), (_RET, 0, 0, _ENOSYS), (_RET, 0, 0, _NOTIFY)]
    out = bytearray()
    for i, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("=HBBI", op, jt, jf, k)
    return bytes(out)


def install(approve_threads: bool) -> tuple[list[str], int | None]:
    """Install the filter on every thread of the process; returns the layers in force and, with
    `approve_threads`, the listener fd through which new threads are decided (else None, as when
    the filter is not in force)."""
    if platform.machine() != "x86_64":
        return [], None
    code = program(os.getpid(), approve_threads)
    prog = _SockFprog(len=len(code) // 8, filter=code)
    if not set_no_new_privs():
        return [], None
    flags = _TSYNC | _TSYNC_ESRCH | (_NEW_LISTENER if approve_threads else 0)
    result = libc().syscall(_SYS_SECCOMP, _SET_MODE_FILTER, flags, ctypes.byref(prog))
    if result < 0:
        return [], None
    return ["seccomp"], result if approve_threads else None
