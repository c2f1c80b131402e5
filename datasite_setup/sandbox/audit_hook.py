"""The audit-hook tripwire: Python-level events the untrusted code may not cause.

Audit hooks are not a sandbox (PEP 578 says so: code that can write memory can disable them);
Landlock and seccomp are what hold. The hook exists so that an attempt made through Python is
*reported* and fails the run.

A refusal ends the child at once (`os._exit`), with an exit status that names the event
(`exit_status`): nothing runs after it, so no code can catch the refusal and then report success
on the result channel, and the parent reads the status from the kernel, not from anything the
child wrote. Reported names come from REFUSABLE_EVENTS only: code can raise audit events of its
own (`sys.audit("socket.<anything>")`), and a reported name must not be a channel out.

The hook cannot be talked out of a refusal from Python. Every name it and its helpers use is a
positional default argument bound when this module loads: untrusted code can rebind module
attributes and builtins without raising any audit event, and could replace a closure's cell
contents, but a function's `__defaults__` is an immutable tuple, and replacing it or
`__code__` raises `object.__setattr__`, which the hook refuses for its own functions. The values
bound are immutable too (builtins, str, tuples, frozensets, read-only mappings), so a hook frame
that code reaches (from a traceback, or another thread's frames) can be read but not changed.
The hook function itself is referenced from nowhere Python code can reach.
"""

from __future__ import annotations

import os
import posix
import sys
from pathlib import PosixPath, PurePosixPath
from types import MappingProxyType
from typing import Any, Callable

from datasite_setup.sandbox.grants import DEVICES_RW

_REFUSED_OUTRIGHT = frozenset(
    {
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "pty.spawn", "os.kill", "os.killpg", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension",
        "sqlite3.load_extension", "os.startfile",
    }
)
_REFUSED_FAMILIES = (
    "socket.", "ctypes.", "syslog.", "ftplib.", "smtplib.", "nntplib.", "poplib.", "imaplib.", "telnetlib.",
    "http.client.", "urllib.", "webbrowser.", "ensurepip.", "winreg.", "msvcrt.", "_winapi.",
)
# How each file-system event's arguments are checked: "r" readable, "w" writable (inside scratch),
# "d" the dir_fd the n-th path is relative to (resolved through /proc/self/fd), "-" ignored.
_PATH_EVENTS = MappingProxyType(
    {
        "os.listdir": "r", "os.scandir": "r", "os.walk": "r", "os.fwalk": "r", "os.getxattr": "r-",
        "os.listxattr": "r", "os.remove": "wd", "os.rmdir": "wd", "os.mkdir": "w-d", "os.rename": "wwdd",
        "os.link": "wwdd", "os.truncate": "w", "os.chmod": "w-d", "os.chown": "w--d", "os.utime": "w--d",
        "os.setxattr": "w", "os.removexattr": "w", "os.chdir": "w",
        "shutil.copyfile": "rw", "shutil.copymode": "rw", "shutil.copystat": "rw", "shutil.copytree": "rw",
        "shutil.move": "ww", "shutil.rmtree": "wd", "shutil.chown": "w", "shutil.make_archive": "w-r",
        "shutil.unpack_archive": "rw", "tempfile.mkstemp": "w", "tempfile.mkdtemp": "w", "sqlite3.connect": "w",
    }
)
# Events whose integer (file descriptor) path is fine: the fd came from an open that was checked.
_FD_OK = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "os.truncate"})
# Family members reported by name; any other member is reported as "<family>*".
_FAMILY_MEMBERS = frozenset(
    {
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.gethostname", "socket.getnameinfo", "socket.getservbyname",
        "socket.getservbyport", "socket.sendmsg", "socket.sendto", "socket.sethostname",
        "ctypes.addressof", "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer",
        "ctypes.create_string_buffer", "ctypes.create_unicode_buffer", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.dlsym/handle", "ctypes.get_errno", "ctypes.set_errno", "ctypes.string_at", "ctypes.wstring_at",
        "ctypes.PyObj_FromPtr", "urllib.Request", "http.client.connect", "webbrowser.open",
    }
)
# Events whose arguments decide: open, the path events, os.symlink, and attribute changes (refused
# when they target the hook's own functions).
_EXAMINED = frozenset(_PATH_EVENTS) | {"open", "os.symlink", "object.__setattr__"}
REFUSABLE_EVENTS = _REFUSED_OUTRIGHT | _FAMILY_MEMBERS | _EXAMINED | {f + "*" for f in _REFUSED_FAMILIES}

# A refused event is the child's exit status: the i-th free status, counted down from 255, for
# the i-th event in sorted order. Not free: 0 (the harness finished), 70 and 71 (`child_main`), Python's own 1, 2 and 120,
# and what the loader and shells use (126, 127: e.g. glibc's "cannot allocate memory for
# thread-local data" under the memory limit; 128 + a signal number).
_RESERVED_STATUSES = frozenset({0, 1, 2, 70, 71, 120, 126, 127, *range(128, 193)})
_FREE_STATUSES = tuple(code for code in range(255, 2, -1) if code not in _RESERVED_STATUSES)  # high first: code's own small exits stay "crashed"
_ORDERED = tuple(sorted(REFUSABLE_EVENTS))
if len(_ORDERED) > len(_FREE_STATUSES):
    raise RuntimeError("too many refusable audit events for one exit status each")
_STATUS = MappingProxyType(dict(zip(_ORDERED, _FREE_STATUSES)))
_EVENT_OF_STATUS = MappingProxyType({code: name for name, code in _STATUS.items()})


def exit_status(event: str) -> int:
    """The exit status the child ends with when the hook refuses `event` (a REFUSABLE_EVENTS name)."""
    return _STATUS[event]


def refused_event(exit_code: int) -> str | None:
    """The refused event an exit code names, or None when it names none."""
    return _EVENT_OF_STATUS.get(exit_code)


def _text(
    path: Any, _type=type, _str=str, _bytes=bytes, _issubclass=issubclass, _copy=str.__str__,
    _decode=bytes.decode, _encoding=sys.getfilesystemencoding(), _entry=os.DirEntry,
    _pure=PurePosixPath, _posix=PosixPath,
) -> str | None:
    """A path argument as text (the C copy: a str subclass's own methods never run); None for a
    type the hook does not read, which it refuses."""
    kind = _type(path)
    if kind is _entry:
        path = path.path
        kind = _type(path)
    if _issubclass(kind, _str):
        return _copy(path)
    if _issubclass(kind, _bytes):
        return _decode(path, _encoding, "surrogateescape")
    if kind is _pure or kind is _posix:
        return _copy(_str(path))
    return None


def _resolve(
    path: str, base: str | None, _lstat=posix.lstat, _readlink=posix.readlink, _getcwd=posix.getcwd, _error=OSError,
) -> str:
    """The absolute path with every symlink followed, from C primitives only (os.path can be rebound)."""
    if not path.startswith("/"):
        path = (base or _getcwd()) + "/" + path
    pending = path.split("/")[::-1]
    parts: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "" or part == ".":
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        candidate = "/" + "/".join(parts + [part])
        try:
            mode = _lstat(candidate).st_mode
        except _error:
            parts.append(part)
            continue
        if mode & 0o170000 == 0o120000:
            hops += 1
            if hops > 40:
                raise _error("too many symlinks")
            target = _readlink(candidate)
            if target.startswith("/"):
                parts = []
            pending.extend(target.split("/")[::-1])
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    for root in roots:
        if path == root or path.startswith(root + "/"):
            return True
    return False


def _directory(dir_fd: Any, _type=type, _int=int, _readlink=posix.readlink, _error=OSError) -> tuple[bool, str | None]:
    """(known, the directory a dir_fd-relative path starts from; None: the cwd)."""
    if dir_fd is None:
        return True, None
    if _type(dir_fd) is not _int:
        return False, None
    if dir_fd == -1 or dir_fd == -100:  # absent, or AT_FDCWD: relative to the cwd
        return True, None
    if dir_fd < 0:
        return False, None
    try:
        where = _readlink(f"/proc/self/fd/{dir_fd}")
    except _error:
        return False, None
    return where.startswith("/"), where


def _where_allowed(where: str, how: str, policy: tuple[tuple[str, ...], ...], _under=_under) -> bool:
    """Whether the resolved absolute path `where` may be read ("r") or written ("w")."""
    scratch, readable, writable_files, forbidden, granted = policy
    if how == "r" and _under(where, granted):
        return True
    if _under(where, forbidden):
        return False
    if how == "w":
        return _under(where, scratch) or where in writable_files
    return _under(where, readable) or where in writable_files


def _path_allowed(
    path: Any, how: str, base: str | None, policy: tuple[tuple[str, ...], ...],
    _text=_text, _resolve=_resolve, _where_allowed=_where_allowed, _type=type, _int=int,
) -> bool:
    """Whether `path` may be read ("r") or written ("w"); an fd stands for a checked open."""
    if path is None:
        path = "."
    if _type(path) is _int:
        return True
    text = _text(path)
    if text is None:
        return False
    return _where_allowed(_resolve(text, base), how, policy)


def _open_allowed(
    args: tuple[Any, ...], policy: tuple[tuple[str, ...], ...],
    _where_allowed=_where_allowed, _text=_text, _resolve=_resolve, _under=_under, _stat=posix.stat,
    _type=type, _str=str, _int=int, _error=OSError,
    _write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
) -> bool:
    """An open is checked once: its path resolved once (a site task opens every case file, so
    the symlink walk is most of what a lazy read costs in the sandbox), then allowed or not."""
    path, mode, flags = (args + (None, None, None))[:3]
    if _type(path) is _int:
        return True
    writing = (_type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
        _type(flags) is _int and flags & _write_flags != 0
    )
    text = _text("." if path is None else path)
    if text is None:
        return False
    where = _resolve(text, None)
    if not _where_allowed(where, "w" if writing else "r", policy):
        return False
    if writing or _under(where, policy[0]):
        return True
    try:  # a directory fd outside scratch would let a later relative open escape every check
        return _stat(text).st_mode & 0o170000 != 0o040000
    except _error:
        return True


def _symlink_allowed(
    args: tuple[Any, ...], policy: tuple[tuple[str, ...], ...],
    _path_allowed=_path_allowed, _directory=_directory, _text=_text, _resolve=_resolve,
) -> bool:
    target, link = args[0], args[1]
    known, base = _directory(args[2])
    if not known or not _path_allowed(link, "w", base, policy):
        return False
    target_text, link_text = _text(target), _text(link)
    if target_text is None or link_text is None:
        return False
    if not target_text.startswith("/"):
        target_text = _resolve(link_text, base).rpartition("/")[0] + "/" + target_text
    return _path_allowed(target_text, "w", None, policy)


def _path_event_allowed(
    spec: str, args: tuple[Any, ...], event: str, policy: tuple[tuple[str, ...], ...],
    _path_allowed=_path_allowed, _directory=_directory, _fd_ok=_FD_OK, _type=type, _int=int, _str=str,
    _bytes=bytes, _zip=zip, _len=len, _memory=(":memory:", "", b":memory:"),
) -> bool:
    paths, dir_fds = [], []
    for how, arg in _zip(spec, args):
        if how == "d":
            dir_fds.append(arg)
        elif how != "-":
            paths.append((how, arg))
    dir_fds += [None] * (_len(paths) - _len(dir_fds))
    for (how, arg), dir_fd in _zip(paths, dir_fds):
        if event == "sqlite3.connect" and (_type(arg) is _str or _type(arg) is _bytes) and arg in _memory:
            continue
        if _type(arg) is _int and event not in _fd_ok:
            return False
        known, base = _directory(dir_fd)
        if not known or not _path_allowed(arg, how, base, policy):
            return False
    return True


def _examine(
    event: str, args: tuple[Any, ...], policy: tuple[tuple[str, ...], ...], own: tuple[Callable[..., Any], ...],
    _open_allowed=_open_allowed, _symlink_allowed=_symlink_allowed, _path_event_allowed=_path_event_allowed,
    _path_events=_PATH_EVENTS,
) -> bool:
    """Whether an event whose arguments decide is allowed."""
    if event == "open":
        return _open_allowed(args, policy)
    if event == "os.symlink":
        return _symlink_allowed(args, policy)
    if event == "object.__setattr__":
        target = args[0]
        for function in own:
            if target is function:
                return False
        return True
    return _path_event_allowed(_path_events[event], args, event, policy)


_OWN = (_text, _resolve, _under, _directory, _where_allowed, _path_allowed, _open_allowed, _symlink_allowed, _path_event_allowed, _examine)


def make_audit_hook(
    scratch: str, read_roots: list[str], forbidden: list[str], granted: list[str] = (),
) -> Callable[[str, tuple[Any, ...]], None]:
    """The hook for one run: reads under `read_roots` and scratch, writes only in scratch, nothing under
    `forbidden` except reads of the `granted` paths inside it (the site's case store)."""
    policy = ((scratch,), tuple(read_roots) + (scratch,), tuple(DEVICES_RW), tuple(forbidden), tuple(granted))

    def hook(
        event: str, args: tuple[Any, ...], _policy=policy, _own=_OWN, _examine=_examine, _examined=_EXAMINED,
        _outright=_REFUSED_OUTRIGHT, _families=_REFUSED_FAMILIES, _members=_FAMILY_MEMBERS, _status=_STATUS,
        _exit=posix._exit, _failure=BaseException,
    ) -> None:
        if event in _examined:
            try:
                allowed = _examine(event, args, _policy, _own)
            except _failure:  # noqa: BLE001 - what cannot be checked is refused
                allowed = False
            if not allowed:
                _exit(_status[event])
        elif event in _outright:
            _exit(_status[event])
        else:
            for family in _families:
                if event.startswith(family):
                    _exit(_status[event if event in _members else family + "*"])

    return hook
