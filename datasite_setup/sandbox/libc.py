"""The C library, for the Linux calls Python has no wrapper for (Landlock, seccomp, prctl)."""

from __future__ import annotations

import ctypes
from typing import Any

_PR_SET_NO_NEW_PRIVS = 38


def libc() -> Any:
    """libc with `syscall` and `prctl` typed; errno is kept so failures can be explained."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.prctl.restype = ctypes.c_int
    return lib


def set_no_new_privs() -> bool:
    """PR_SET_NO_NEW_PRIVS, which an unprivileged Landlock or seccomp filter requires; True on success."""
    return libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
