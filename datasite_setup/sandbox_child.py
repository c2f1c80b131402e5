"""The sandboxed child that runs one approved function on private data (`python -m datasite_setup.sandbox_child`).

syft 0.9.5 `exec`s approved code inside the server, where it could read any file, open sockets
and reach the server's secrets. Here it runs in a child the parent started with a scrubbed
environment and resource limits, and the child confines itself before the untrusted code runs:

1. Landlock (kernel, unprivileged), applied while the process is still single-threaded so every
   later thread inherits it: reads only under the Python installation, the site-packages, the
   project's own packages and the system library dirs; writes only in the scratch dir; the site's
   data dir is carved out even where it lies under a readable root; no TCP bind/connect; no
   signals to or abstract sockets of processes outside the sandbox.
2. seccomp (x86_64), installed on every thread: no sockets, no exec, no fork (threads are
   allowed), no ptrace, no mount/namespace/module/keyring syscalls, no chmod/chown, no raising
   resource limits. Together with Landlock this is what holds against native code (torch,
   SimpleITK and numpy read files and write memory without Python ever seeing it).
3. A `sys.addaudithook` tripwire for the Python-level events the brief names. Audit hooks are
   not a sandbox (PEP 578 says so: code that can write memory can disable them); it exists so
   that an attempt made through Python is *reported*, and a run with any refused event fails
   even if the code caught the PermissionError.

If a layer the parent requires could not be put in place (an old kernel), the child exits with
status 70 before running anything.

Protocol. stdin: a pickle (the parent is trusted) of `{"source", "function", "kwargs", "scratch",
"preload", "threads", "forbidden_paths", "max_result_bytes", "required_layers"}`, where `kwargs` is itself a pickle so it can
be loaded after Landlock is in force (unpickling arrays imports numpy, which starts threads).
stdout: one frame, an 8-byte big-endian length and a `result_codec` blob of `{"ok", "result",
"error_type", "refused_event", "stdout", "confinement"}`. The real stdout fd is moved aside at
start and fd 1 points at /dev/null, so neither prints nor native writes can corrupt the frame.
Errors are reported by builtin exception type only: messages and tracebacks can carry private
values, and a user-defined exception's *name* could too.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import os
import pickle
import platform
import posix
import stat
import struct
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable

STDOUT_LIMIT = 10_000
FRAME_LENGTH = struct.Struct(">Q")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SYSTEM_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib")
SYSTEM_READABLE = (
    "/dev/zero", "/dev/urandom", "/dev/random", "/proc/cpuinfo", "/sys/devices/system/cpu", "/usr/share/zoneinfo",
)
DEVICES_RW = ("/dev/null",)
LAYERS = frozenset({"landlock-fs", "landlock-net", "landlock-scope", "seccomp", "audit-hook"})

# Builtin exception classes as they were before any untrusted code ran; a reported type name is
# always one of these, so the name itself cannot carry data.
BUILTIN_EXCEPTIONS = {
    name: cls for name, cls in vars(builtins).items() if isinstance(cls, type) and issubclass(cls, BaseException)
}
REPORTED_ERRORS = frozenset(BUILTIN_EXCEPTIONS) | {"CodecError"}

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
_PATH_EVENTS = {
    "os.listdir": "r", "os.scandir": "r", "os.walk": "r", "os.fwalk": "r", "os.getxattr": "r-",
    "os.listxattr": "r", "os.remove": "wd", "os.rmdir": "wd", "os.mkdir": "w-d", "os.rename": "wwdd",
    "os.link": "wwdd", "os.truncate": "w", "os.chmod": "w-d", "os.chown": "w--d", "os.utime": "w--d",
    "os.setxattr": "w", "os.removexattr": "w", "os.chdir": "w",
    "shutil.copyfile": "rw", "shutil.copymode": "rw", "shutil.copystat": "rw", "shutil.copytree": "rw",
    "shutil.move": "ww", "shutil.rmtree": "wd", "shutil.chown": "w", "shutil.make_archive": "w-r",
    "shutil.unpack_archive": "rw", "tempfile.mkstemp": "w", "tempfile.mkdtemp": "w", "sqlite3.connect": "w",
}
# Events whose integer (file descriptor) path is fine: the fd came from an open that was checked.
_FD_OK = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "os.truncate"})
# Family members reported by name; any other member is reported as "<family>*", because untrusted
# code can raise audit events of its own (`sys.audit("socket.<anything>")`) and a reported name
# must not be a channel out.
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
REFUSABLE_EVENTS = (
    _REFUSED_OUTRIGHT
    | _FAMILY_MEMBERS
    | frozenset(_PATH_EVENTS)
    | {"open", "os.symlink"}
    | {f + "*" for f in _REFUSED_FAMILIES}
)


class AuditRefusal(PermissionError):
    """Raised into the untrusted code when the audit hook refuses an event."""


# --------------------------------------------------------------------------- Landlock

_LL_READ_FILE, _LL_READ_DIR, _LL_WRITE_FILE, _LL_EXECUTE = 1 << 2, 1 << 3, 1 << 1, 1 << 0
_LL_MAKE_CHAR, _LL_MAKE_SOCK, _LL_MAKE_BLOCK, _LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = (
    1 << 6, 1 << 9, 1 << 11, 1 << 13, 1 << 14, 1 << 15
)
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def carve(roots: list[str], forbidden: list[str]) -> list[str]:
    """The roots with every forbidden path cut out, by replacing a root that holds one with its other entries.

    Landlock only grants, it cannot deny below a grant; the site's data dir may well sit next to
    the project's packages, so the grant has to go around it.
    """
    out: list[str] = []
    for root in roots:
        if any(root == f or root.startswith(f.rstrip("/") + "/") for f in forbidden):
            continue
        inside = [f for f in forbidden if f.startswith(root.rstrip("/") + "/")]
        if not inside:
            out.append(root)
            continue
        try:
            children = sorted(os.path.join(root, name) for name in os.listdir(root))
        except OSError:
            continue
        out.extend(carve(children, inside))
    return out


def _landlock(read_only: list[str], read_write: list[str], devices: list[str]) -> list[str]:
    """Restrict this thread (and every thread and process it later starts); returns the layers in force."""
    libc = _libc()
    abi = libc.syscall(_SYS_LANDLOCK_CREATE, None, 0, 1)
    if abi < 1:
        return []
    fs = (1 << 13) - 1
    fs |= _LL_REFER if abi >= 2 else 0
    fs |= _LL_TRUNCATE if abi >= 3 else 0
    fs |= _LL_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(fs=fs, net=0b11 if abi >= 4 else 0, scoped=0b11 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return []
    reading = _LL_READ_FILE | _LL_READ_DIR
    writing = fs & ~(_LL_EXECUTE | _LL_MAKE_CHAR | _LL_MAKE_BLOCK | _LL_MAKE_SOCK | _LL_IOCTL_DEV)
    grants = [(p, reading) for p in read_only] + [(p, writing) for p in read_write]
    grants += [(p, reading | _LL_WRITE_FILE) for p in devices]
    try:
        for path, access in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                rule = _PathBeneath(allowed=access if is_dir else access & _LL_FILE_RIGHTS, parent_fd=fd)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return []
        if libc.syscall(_SYS_LANDLOCK_RESTRICT, ruleset, 0) != 0:
            return []
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])


# --------------------------------------------------------------------------- seccomp

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
_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _seccomp_program(pid: int) -> bytes:
    """A classic-BPF filter: EPERM for the denied syscalls, ENOSYS for clone3 (glibc then uses clone,
    whose flags a filter can read), clone only with CLONE_THREAD, prlimit64 only to read, tgkill
    only to this process's own threads (raise, abort and pthread_kill use it)."""
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
    code += [(_LD_ABS, 0, 0, 16), (_JSET, "allow", "deny", _CLONE_THREAD)]
    labels["tgkill"] = len(code)
    code += [(_LD_ABS, 0, 0, 16), (_JEQ, "allow", "deny", pid)]  # pid_t: the kernel reads the low word only
    labels["prlimit"] = len(code)
    code += [(_LD_ABS, 0, 0, 32), (_JEQ, 0, "deny", 0), (_LD_ABS, 0, 0, 36), (_JEQ, "allow", "deny", 0)]
    labels.update(allow=len(code), deny=len(code) + 1, enosys=len(code) + 2)
    code += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM), (_RET, 0, 0, _ENOSYS)]
    out = bytearray()
    for i, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("=HBBI", op, jt, jf, k)
    return bytes(out)


def _seccomp() -> list[str]:
    """Install the filter on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC)."""
    if platform.machine() != "x86_64":
        return []
    program = _seccomp_program(os.getpid())
    prog = _SockFprog(len=len(program) // 8, filter=program)
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return []
    return ["seccomp"] if libc.syscall(_SYS_SECCOMP, 1, 1, ctypes.byref(prog)) == 0 else []


# --------------------------------------------------------------------------- audit hook


def _make_audit_hook(
    scratch: str, read_roots: list[str], forbidden: list[str], refusals: list[str]
) -> Callable[[str, tuple[Any, ...]], None]:
    """The hook, with every builtin and function it uses bound now.

    Untrusted code can rebind module attributes and builtins without raising any audit event;
    a hook that looked up `os.path.realpath` or even `isinstance` at call time could be talked
    out of a refusal. Paths are resolved here from C primitives (lstat, readlink, getcwd).
    """
    _str, _bytes, _int, _type, _len, _any, _isinstance = str, bytes, int, type, len, any, isinstance
    _str_copy, _bytes_decode = str.__str__, bytes.decode
    _lstat, _stat, _readlink, _getcwd, _dirname = posix.lstat, posix.stat, posix.readlink, posix.getcwd, os.path.dirname
    _path_types = (PurePosixPath, type(Path(".")), os.DirEntry)
    _fsencoding = sys.getfilesystemencoding()
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _record = refusals.append
    _outright, _families, _members = _REFUSED_OUTRIGHT, _REFUSED_FAMILIES, _FAMILY_MEMBERS
    _path_events, _fd_ok = _PATH_EVENTS, _FD_OK
    _scratch = (scratch,)
    _readable = tuple(read_roots) + (scratch,)
    _writable_files = DEVICES_RW
    _forbidden = tuple(forbidden)
    _refusal = AuditRefusal
    _no_dir_fd = (None, -1, -100)  # absent, or AT_FDCWD: relative to the cwd, which resolve() uses

    def refuse(name: str) -> None:
        _record(name)
        raise _refusal(f"the sandbox refused {name}")

    def text(path: Any, event: str) -> str:
        kind = _type(path)
        if _isinstance(path, _str):
            return _str_copy(path)  # the C copy: a str subclass's own methods never run here
        if _isinstance(path, _bytes):
            return _bytes_decode(path, _fsencoding, "surrogateescape")
        if kind in _path_types:
            return _str(path.path) if kind is os.DirEntry else _str(path)
        refuse(event)
        return ""

    def directory(dir_fd: Any, event: str) -> str | None:
        """The directory a dir_fd-relative path starts from (None: the cwd)."""
        if dir_fd in _no_dir_fd:
            return None
        if _type(dir_fd) is _int and dir_fd >= 0:
            try:
                where = _readlink(f"/proc/self/fd/{dir_fd}")
            except OSError:
                where = ""
            if where.startswith("/"):
                return where
        refuse(event)
        return None

    def resolve(path: str, event: str, base: str | None = None) -> str:
        if not path.startswith("/"):
            path = (base or _getcwd()) + "/" + path
        pending = path.split("/")[::-1]
        parts: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [part])
            try:
                mode = _lstat(candidate).st_mode
            except OSError:
                parts.append(part)
                continue
            if mode & 0o170000 == 0o120000:
                hops += 1
                if hops > 40:
                    refuse(event)
                target = _readlink(candidate)
                if target.startswith("/"):
                    parts = []
                pending.extend(target.split("/")[::-1])
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path: str, roots: tuple[str, ...]) -> bool:
        return _any(path == root or path.startswith(root + "/") for root in roots)

    def check(path: Any, how: str, event: str, base: str | None = None) -> None:
        if path is None:
            path = "."
        if _type(path) is _int:
            if event in _fd_ok or event == "open":
                return
            refuse(event)
        where = resolve(text(path, event), event, base)
        if under(where, _forbidden):
            refuse(event)
        if how == "w" and not (under(where, _scratch) or where in _writable_files):
            refuse(event)
        if how == "r" and not (under(where, _readable) or where in _writable_files):
            refuse(event)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (args + (None, None, None))[:3]
            if _type(path) is _int:
                return
            writing = (_type(mode) is _str and _any(c in mode for c in "wax+")) or (
                _type(flags) is _int and flags & _write_flags
            )
            check(path, "w" if writing else "r", event)
            if not writing and not under(resolve(text(path, event), event), _scratch):
                try:
                    is_dir = _stat(text(path, event)).st_mode & 0o170000 == 0o040000
                except OSError:
                    is_dir = False
                if is_dir:  # a directory fd would let a later relative open escape every check
                    refuse(event)
            return
        if event in _path_events:
            spec = _path_events[event]
            paths = [(how, arg) for how, arg in zip(spec, args) if how in "rw"]
            dir_fds = [arg for how, arg in zip(spec, args) if how == "d"]
            for i, (how, arg) in enumerate(paths):
                if event == "sqlite3.connect" and arg in (":memory:", "", b":memory:"):
                    continue
                check(arg, how, event, directory(dir_fds[i], event) if i < _len(dir_fds) else None)
            return
        if event == "os.symlink":
            target, link, base = args[0], args[1], directory(args[2], event)
            check(link, "w", event, base)
            target_text = text(target, event)
            if not target_text.startswith("/"):
                target_text = _dirname(resolve(text(link, event), event, base)) + "/" + target_text
            check(target_text, "w", event)
            return
        if event in _outright:
            refuse(event)
        for family in _families:
            if event.startswith(family):
                refuse(event if event in _members else family + "*")

    return hook


# --------------------------------------------------------------------------- running


class _CappedText(io.TextIOBase):
    """Stands in for sys.stdout: keeps the first STDOUT_LIMIT characters, so prints neither reach the
    protocol fd nor grow without bound."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = self.limit - self.kept
        piece = str(s)[: max(room, 0)]
        self.parts.append(piece)
        self.kept += len(piece)
        self.dropped = self.dropped or len(piece) < len(s)
        return len(s)

    def text(self) -> str:
        return "".join(self.parts) + ("\n[output truncated]" if self.dropped else "")


def error_type(exc: BaseException) -> str:
    """The nearest builtin exception type of `exc`; allocation failures from native code count as MemoryError."""
    for cls in type(exc).__mro__:
        if BUILTIN_EXCEPTIONS.get(getattr(cls, "__name__", "")) is cls:
            name = cls.__name__
            break
    else:
        name = "BaseException"
    if name == "RuntimeError":
        try:
            message = str(exc)
        except Exception:
            message = ""
        if "can't allocate memory" in message or "bad_alloc" in message or "DefaultCPUAllocator" in message:
            return "MemoryError"
    return name


def preload(modules: list[str], optimiser: bool = False) -> None:
    """Import what approved code usually needs and exercise torch once, before the audit hook and
    seccomp, so that lazily loaded files and libraries are already in.

    An optimiser step only with `optimiser` (warm spares, which do it before their run):
    constructing one imports torch._dynamo (~1 s), a cost a cold child should pay only if its code
    trains; it still loads fine later, as reads under site-packages stay allowed.
    """
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        conv = torch.nn.Conv2d(1, 2, 3)
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        torch.nn.functional.relu(conv(x)).mean().backward()
        if optimiser:
            torch.optim.Adam(conv.parameters()).step()


def _call(payload: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    namespace: dict[str, Any] = {"__name__": "__approved_code__", "__builtins__": builtins}
    exec(compile(payload["source"], "<approved code>", "exec"), namespace)
    return namespace[payload["function"]](**kwargs)


def _restore(pristine: dict[str, Any], stdout: Any, stderr: Any) -> None:
    """Undo what the code may have rebound: builtins, and sys.stdout/stderr (so a failure in the
    child's own reporting still shows in the parent's stderr tail)."""
    sys.stdout, sys.stderr = stdout, stderr
    namespace = vars(builtins)
    namespace.clear()
    namespace.update(pristine)


def run(payload: dict[str, Any], kwargs: dict[str, Any], refusals: list[str], layers: list[str]) -> bytes:
    """Run the function and encode the frame; never lets an exception's text out."""
    from datasite_setup.result_codec import CodecError, encode

    captured = _CappedText(STDOUT_LIMIT)
    real_stdout, real_stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = captured, _CappedText(0)

    def frame(**fields: Any) -> dict[str, Any]:
        base = {"ok": False, "result": None, "error_type": None, "refused_event": None}
        return {**base, **fields, "stdout": captured.text(), "confinement": layers}

    pristine = dict(vars(builtins))
    blob = None
    error = None
    try:
        value = _call(payload, kwargs)
    except BaseException as exc:  # noqa: BLE001 - untrusted code may raise anything, SystemExit included
        _restore(pristine, real_stdout, real_stderr)
        error = error_type(exc)
    else:
        _restore(pristine, real_stdout, real_stderr)
        try:
            blob = encode(frame(ok=True, result=value), max_bytes=payload["max_result_bytes"])
        except CodecError:
            error = "CodecError"
        except BaseException as exc:  # noqa: BLE001 - the value's own methods run during encoding
            error = error_type(exc)
        del value
    if refusals:
        return encode(frame(error_type=error, refused_event=refusals[0]))
    return blob if blob is not None else encode(frame(error_type=error))


def _write_frame(fd: int, blob: bytes) -> None:
    data = memoryview(FRAME_LENGTH.pack(len(blob)) + blob)
    while data:
        data = data[os.write(fd, data) :]


def _site_dirs() -> list[str]:
    import site

    return list(site.getsitepackages())


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


def main() -> None:
    """Order matters: Landlock before anything can start a thread (unpickling kwargs imports numpy,
    whose BLAS starts threads), seccomp and the audit hook only after the preloads they would slow.

    `--warm MODULES` (a spare the parent starts ahead of its run, with one-thread BLAS/OpenMP
    settings): preload first, check the process is still single-threaded with no open file, then
    wait for the payload and confine as a cold child does; torch gets the run's thread count back
    once Landlock is in force, so its new threads inherit it."""
    warm = sys.argv[1:2] == ["--warm"]
    proto = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    if warm:
        _warm_up([m for m in sys.argv[2].split(",") if m], {0, 1, 2, proto, devnull})
    data = sys.stdin.buffer.read()
    if not data:  # a spare the parent discarded
        os._exit(0)
    payload = pickle.loads(data)
    os.dup2(devnull, 0)
    scratch = os.path.realpath(payload["scratch"])
    forbidden = [os.path.realpath(p) for p in payload["forbidden_paths"]]
    os.chdir(scratch)
    # The project's packages, not its whole root: site configs and data dirs may sit there too.
    project = [str(p) for p in PROJECT_ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"]
    python_roots = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *_site_dirs()]}
    read_roots = carve(sorted(python_roots) + sorted(project) + list(SYSTEM_READABLE), forbidden)
    if warm and _threads() != 1:
        os.write(2, b"sandbox: a thread started before Landlock; not running the code\n")
        os._exit(70)
    layers = _landlock(carve(read_roots + list(SYSTEM_LIBRARY_DIRS), forbidden), [scratch], list(DEVICES_RW))
    kwargs = pickle.loads(payload["kwargs"])
    if warm:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(payload["threads"])
    else:
        preload(payload["preload"])
    layers += _seccomp()
    refusals: list[str] = []
    sys.addaudithook(_make_audit_hook(scratch, read_roots, forbidden, refusals))
    layers.append("audit-hook")
    missing = sorted(set(payload["required_layers"]) - set(layers))
    if missing:
        os.write(2, f"sandbox: {', '.join(missing)} unavailable on this system; not running the code\n".encode())
        os._exit(70)
    _write_frame(proto, run(payload, kwargs, refusals, layers))
    os._exit(0)


if __name__ == "__main__":
    main()
