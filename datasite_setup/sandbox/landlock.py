"""Landlock: the kernel's unprivileged file-system and network confinement (Linux >= 5.13).

Applied while the child is still single-threaded: Landlock binds the calling thread and every
thread and process it starts later, never threads that already exist. Each newer ABI adds what
the kernel offers: truncate (3), TCP bind/connect (4, "landlock-net"), device ioctl (5), no
signals to or abstract sockets of processes outside the sandbox (6, "landlock-scope").
"""

from __future__ import annotations

import ctypes
import os
import stat

from datasite_setup.sandbox.libc import libc, set_no_new_privs

_READ_FILE, _READ_DIR, _WRITE_FILE, _EXECUTE = 1 << 2, 1 << 3, 1 << 1, 1 << 0
_MAKE_CHAR, _MAKE_SOCK, _MAKE_BLOCK, _REFER, _TRUNCATE, _IOCTL_DEV = 1 << 6, 1 << 9, 1 << 11, 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_RULE_PATH_BENEATH = 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict(read_only: list[str], read_write: list[str], devices: list[str]) -> list[str]:
    """Restrict this thread (and all it starts later) to the grants; returns the layers in force.

    Paths that do not exist are skipped. An empty list means Landlock is not available.
    """
    lib = libc()
    abi = lib.syscall(_SYS_CREATE_RULESET, None, 0, 1)
    if abi < 1:
        return []
    fs = (1 << 13) - 1
    fs |= _REFER if abi >= 2 else 0
    fs |= _TRUNCATE if abi >= 3 else 0
    fs |= _IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(fs=fs, net=0b11 if abi >= 4 else 0, scoped=0b11 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = lib.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return []
    reading = _READ_FILE | _READ_DIR
    writing = fs & ~(_EXECUTE | _MAKE_CHAR | _MAKE_BLOCK | _MAKE_SOCK | _IOCTL_DEV)
    grants = [(p, reading) for p in read_only] + [(p, writing) for p in read_write]
    grants += [(p, reading | _WRITE_FILE) for p in devices]
    try:
        for path, access in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                rule = _PathBeneath(allowed=access if is_dir else access & _FILE_RIGHTS, parent_fd=fd)
                if lib.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if not set_no_new_privs() or lib.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            return []
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])
