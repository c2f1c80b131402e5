"""Run approved code in a confined child process instead of inside the datasite server.

syft 0.9.5 `exec`s approved code in the server process, where it can read the site's files and
secrets, open sockets and touch the server's objects. `run_isolated` starts a fresh interpreter
(`datasite_setup.sandbox_child`, which confines itself: Landlock, seccomp, an audit-hook
tripwire) with a scrubbed environment, its own scratch dir and CPU/memory limits, and reads
back exactly one frame in the `result_codec` format — never a pickle, since the child is
hostile. Everything the child says is validated: a forged frame can claim only what the code
could have returned anyway, and the names it reports (exception types, refused events) must
come from fixed sets, so they cannot smuggle data out.

Linux only (Landlock, seccomp, pidfd). Safe to call from several threads at once: each run has
its own process, pipes and scratch dir and there is no shared mutable state. The resource
limits are set by `preexec_fn` (as the brief asks), which runs Python between fork and exec, a
known hazard in threaded programs; it is kept to `setrlimit` calls on pre-built arguments (no
imports, no locks), which is as small as that window gets.

Child start overhead on the 2-core dev VM (median of 5 runs of a trivial function): 0.10 s with
`preload=("numpy",)`, 1.07 s with numpy+torch (almost all of it `import torch`), 1.33 s with the
full DEFAULT_PRELOAD; passing a 30 MB dict of arrays adds 0.12-0.18 s.

Warm spares. Most of that start is imports, and a site runs the same kind of child over and over,
so after a run (and at server start, `prewarm`) spare children for its (preload, limits) are
started, up to SPARES_PER_KIND, that import their preloads and then wait for a payload; the next
run takes the oldest. With two, runs that follow each other at once (training, evaluation, the
next round's training) each find one that has finished or nearly finished importing; a run that
took the last spare starts one at once. Imports are CPU work all the same: on a small machine a
spare importing beside a run slows it (a fork server would avoid re-importing altogether). A spare
imports with one-thread BLAS/OpenMP so that it is still single-threaded when it confines itself
(the child checks; a spare that fails the check exits and the run starts cold, as does any run
that finds no spare). Cost: ~450 MB resident per idle spare with torch and radiomics.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasite_setup import sandbox_child
from datasite_setup.result_codec import DEFAULT_MAX_BYTES, CodecError, decode

# pydicom is here because importing it pulls in urllib3, which opens a socket at import time to
# probe for IPv6: after the audit hook that is refused, and every task that touches a domain (the
# brain MR domain imports pydicom) would fail with "refused:socket.__new__".
DEFAULT_PRELOAD = ("numpy", "torch", "radiomics", "pydicom", "analyses.site_tasks")
# Without these the code does not run at all. landlock-net (kernel 6.7+) and landlock-scope (6.12+)
# are used when present; seccomp already refuses sockets and signals to other processes.
REQUIRED_LAYERS = frozenset({"landlock-fs", "seccomp", "audit-hook"})
PASSED_ENV = ("LANG", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# A spare imports numpy/torch before Landlock, which binds only the thread that applies it: these
# keep every import single-threaded; torch gets the run's thread count once the child is confined.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
SPARES_PER_KIND = 2  # training then evaluation back to back: each finds one that has finished importing
MAX_SPARES = 4
STDERR_TAIL = 64 * 1024
EXIT_GRACE_SECONDS = 1.0
_ALLOCATION_FAILURE = (b"MemoryError", b"bad_alloc", b"Cannot allocate memory", b"can't allocate memory", b"out of memory")


@dataclass(frozen=True)
class Limits:
    """One run's budget: CPU seconds (RLIMIT_CPU), wall-clock seconds, address space (RLIMIT_AS).

    RLIMIT_AS counts virtual memory, which shared libraries and thread stacks inflate beyond what
    is touched: on the 2-core dev VM numpy alone maps ~0.1 GB, numpy+torch ~0.6 GB, and every
    extra OpenMP/BLAS thread adds more (set OMP_NUM_THREADS on many-core hosts).
    """

    cpu_seconds: int = 600
    wall_seconds: float = 900
    memory_mb: int = 4096

    def __post_init__(self) -> None:
        if self.cpu_seconds < 1 or self.wall_seconds <= 0 or self.memory_mb < 64:
            raise ValueError(f"limits must be positive (memory at least 64 MB): {self}")


@dataclass(frozen=True)
class IsolatedOutcome:
    """What came back. `failure` is None on success, else one of "timeout", "memory", "cpu",
    "refused:<audit event>", "error:<builtin exception type>", "crashed".

    `stdout` is what the code printed (first 10 000 characters): untrusted text that no output
    contract has checked. `stderr_tail` is the child's raw fd 2 (interpreter crashes, native
    library messages) for the site's own logs only: code can write anything there, so it must
    never be forwarded to the data scientist. `confinement` names the layers that were in force;
    `warm` says the run used a spare child whose imports were done before the run.
    """

    ok: bool
    result: Any
    failure: str | None
    stdout: str
    seconds: float
    confinement: tuple[str, ...] = ()
    stderr_tail: str = ""
    warm: bool = False


class _ProtocolError(Exception):
    """The child's output is not one well-formed frame."""


@functools.cache
def _project_import_path() -> str | None:
    """PYTHONPATH the child needs to import this project, or None when the install already provides it."""
    probe = subprocess.run(
        [sys.executable, "-B", "-c", "import datasite_setup.sandbox_child"],
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    return None if probe.returncode == 0 else str(sandbox_child.PROJECT_ROOT)


def _child_env(scratch: str) -> dict[str, str]:
    """Nothing of the server's environment (its secrets live there) beyond what the child needs."""
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch}
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    pythonpath = _project_import_path()
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def _apply_limits(rlimits: tuple[tuple[int, int, int], ...]) -> None:
    """preexec_fn: runs in the forked child before exec, so it only makes setrlimit calls."""
    for which, soft, hard in rlimits:
        resource.setrlimit(which, (soft, hard))


def _rlimits(limits: Limits) -> tuple[tuple[int, int, int], ...]:
    memory = limits.memory_mb * 1024 * 1024
    return (
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CORE, 0, 0),
    )


def _run_threads() -> int:
    """torch's thread count in a warm child: what a cold child would have picked from the same env."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))


@dataclass
class _Child:
    proc: subprocess.Popen
    scratch: tempfile.TemporaryDirectory
    warm: bool

    def discard(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self.scratch.cleanup()


def _spawn(preload: tuple[str, ...], limits: Limits, warm: bool) -> _Child:
    scratch = tempfile.TemporaryDirectory(prefix="medfed-sandbox-", ignore_cleanup_errors=True)
    argv = [sys.executable, "-B", "-m", "datasite_setup.sandbox_child"]
    env = _child_env(scratch.name)
    if warm:
        argv += ["--warm", ",".join(preload)]
        env.update(SINGLE_THREADED)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=scratch.name,
        env=env,
        preexec_fn=functools.partial(_apply_limits, _rlimits(limits)),
        start_new_session=True,
        close_fds=True,
    )
    return _Child(proc, scratch, warm)


class _Spares:
    """Warm children waiting for a run, up to `count` per (preload, limits), oldest taken first, at
    most MAX_SPARES in all; a kind whose spare failed its warm-up check is not tried again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[tuple[tuple[str, ...], Limits], list[_Child]] = {}
        self._unwarmable: set[tuple[tuple[str, ...], Limits]] = set()

    def take(self, preload: tuple[str, ...], limits: Limits) -> _Child | None:
        key = (preload, limits)
        with self._lock:
            queue = self._children.get(key, [])
            child = queue.pop(0) if queue else None
        if child is not None and child.proc.poll() is not None:
            with self._lock:
                self._unwarmable.add(key)
            child.discard()
            return None
        return child

    def refill(self, preload: tuple[str, ...], limits: Limits, count: int) -> None:
        key = (preload, limits)
        while True:
            with self._lock:
                if key in self._unwarmable or len(self._children.get(key, [])) >= count:
                    return
            child = _spawn(preload, limits, warm=True)
            evicted = []
            with self._lock:
                queue = self._children.setdefault(key, [])
                if len(queue) >= count:
                    evicted.append(child)
                else:
                    queue.append(child)
                    self._children[key] = self._children.pop(key)  # most recently used kind last
                    while sum(map(len, self._children.values())) > MAX_SPARES:
                        oldest = next(iter(self._children))
                        evicted.append(self._children[oldest].pop(0))
                        if not self._children[oldest]:
                            del self._children[oldest]
            for old in evicted:
                old.discard()
            if child in evicted:
                return

    def discard_all(self) -> None:
        with self._lock:
            children = [c for queue in self._children.values() for c in queue]
            self._children = {}
        for child in children:
            child.discard()


_SPARES = _Spares()
atexit.register(_SPARES.discard_all)


def prewarm(limits: Limits, preload: tuple[str, ...] = DEFAULT_PRELOAD, spares: int = SPARES_PER_KIND) -> None:
    """Start spare children now (a server calls this at start) so the first runs are warm too."""
    _SPARES.refill(preload, limits, spares)


def discard_spares() -> None:
    """Stop every spare child (tests; a server's spares also die with it)."""
    _SPARES.discard_all()


def _exchange(
    proc: subprocess.Popen, payload: bytes, deadline: float, max_frame: int
) -> tuple[bytearray, bytearray, bool, bool]:
    """Feed stdin, drain stdout (bounded) and stderr (tail), until the child is gone or the deadline.

    One thread, one selector, so a run never leaves a reader thread behind. Returns
    (stdout, stderr tail, timed out, stdout overflowed).
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    pending = memoryview(payload)
    pidfd = os.pidfd_open(proc.pid)
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin, selectors.EVENT_WRITE, "in")
        selector.register(proc.stdout, selectors.EVENT_READ, "out")
        selector.register(proc.stderr, selectors.EVENT_READ, "err")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        try:
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return out, err, True, False
                if exited_at is not None and now - exited_at > EXIT_GRACE_SECONDS:
                    break
                for key, _ in selector.select(min(deadline - now, EXIT_GRACE_SECONDS)):
                    if key.data == "exit":
                        selector.unregister(pidfd)
                        exited_at = time.monotonic()
                    elif key.data == "in":
                        try:
                            pending = pending[os.write(key.fd, pending[: 1 << 20]) :]
                        except BlockingIOError:
                            continue
                        except OSError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(proc.stdin)
                            proc.stdin.close()
                    else:
                        chunk = os.read(key.fd, 1 << 20)
                        if not chunk:
                            selector.unregister(key.fileobj)
                        elif key.data == "out":
                            out += chunk
                            if len(out) > max_frame:
                                return out, err, False, True
                        else:
                            err += chunk
                            del err[:-STDERR_TAIL]
        finally:
            os.close(pidfd)
    return out, err, False, False


def _read_frame(out: bytearray, max_bytes: int) -> dict[str, Any]:
    """The child's frame, checked field by field: nothing in it is trusted."""
    length = sandbox_child.FRAME_LENGTH
    if len(out) < length.size:
        raise _ProtocolError("no frame")
    (size,) = length.unpack(out[: length.size])
    if size != len(out) - length.size:
        raise _ProtocolError("frame length does not match the output")
    try:
        frame = decode(memoryview(out)[length.size :], max_bytes=max_bytes)
    except CodecError as exc:
        raise _ProtocolError(str(exc)) from None
    expected = {"ok", "result", "error_type", "refused_event", "stdout", "confinement"}
    if not isinstance(frame, dict) or set(frame) != expected:
        raise _ProtocolError("frame has the wrong fields")
    ok, error, refused = frame["ok"], frame["error_type"], frame["refused_event"]
    if not (
        isinstance(ok, bool)
        and (error is None or error in sandbox_child.REPORTED_ERRORS)
        and (refused is None or refused in sandbox_child.REFUSABLE_EVENTS)
        and (not ok or (error is None and refused is None))
        and (ok or frame["result"] is None)
        and isinstance(frame["stdout"], str)
        and len(frame["stdout"]) <= sandbox_child.STDOUT_LIMIT + 100
        and isinstance(frame["confinement"], list)
        and set(frame["confinement"]) <= sandbox_child.LAYERS
    ):
        raise _ProtocolError("frame fields out of range")
    return frame


def _failure_from_frame(frame: dict[str, Any]) -> str | None:
    if frame["ok"]:
        return None
    if frame["refused_event"] is not None:
        return f"refused:{frame['refused_event']}"
    if frame["error_type"] == "MemoryError":
        return "memory"
    return f"error:{frame['error_type']}"


def _failure_from_exit(status: int, usage: resource.struct_rusage, limits: Limits, stderr: bytes) -> str:
    """Why a child that sent no frame died: SIGXCPU (or SIGKILL at the hard limit) is the CPU budget;
    an allocation failure (RLIMIT_AS makes mmap fail, native code may then abort) is memory."""
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu >= limits.cpu_seconds):
        return "cpu"
    if any(marker in stderr for marker in _ALLOCATION_FAILURE):
        return "memory"
    if usage.ru_maxrss * 1024 >= 0.9 * limits.memory_mb * 1024 * 1024:
        return "memory"
    return "crashed"


def run_isolated(
    source: str,
    function: str,
    kwargs: dict[str, Any],
    limits: Limits,
    forbidden_paths: list[Path] | tuple[Path, ...] = (),
    preload: tuple[str, ...] = DEFAULT_PRELOAD,
    *,
    max_result_bytes: int = DEFAULT_MAX_BYTES,
    required_layers: frozenset[str] = REQUIRED_LAYERS,
    warm: bool = True,
    spares: int = SPARES_PER_KIND,
) -> IsolatedOutcome:
    """Run `function(**kwargs)` from `source` in a confined child and return its checked outcome.

    `kwargs` are pickled to the child (trusted direction) and should be plain data: any class in
    them must be importable from the installation. `forbidden_paths` (the site's data dir) stay
    unreadable even where they sit below a readable root. The result is only decoded here; apply
    an `output_contracts` contract before handing it to anyone. If a `required_layers` layer is
    unavailable the code is not run and the failure is "crashed", with the reason in `stderr_tail`.
    `warm` takes the oldest spare child if there is one and tops the spares of this kind up to
    `spares` after the run (to one at once if it took the last).
    """
    started = time.monotonic()
    deadline = started + limits.wall_seconds
    child = _SPARES.take(preload, limits) if warm else None
    if child is None:
        child = _spawn(preload, limits, warm=False)
    if warm:  # keep one spare importing for a run that follows at once; top up after this run
        _SPARES.refill(preload, limits, min(spares, 1))
    proc = child.proc
    payload = pickle.dumps(
        {
            "source": source,
            "function": function,
            "kwargs": pickle.dumps(kwargs, protocol=pickle.HIGHEST_PROTOCOL),
            "scratch": child.scratch.name,
            "preload": list(preload),
            "threads": _run_threads(),
            "forbidden_paths": [str(Path(p).resolve()) for p in forbidden_paths],
            "max_result_bytes": max_result_bytes,
            "required_layers": sorted(required_layers),
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    try:
        out, err, timed_out, overflowed = _exchange(proc, payload, deadline, max_result_bytes + 8)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group still exists: its leader is not reaped yet
        except ProcessLookupError:
            pass
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        child.scratch.cleanup()
        if warm:
            _SPARES.refill(preload, limits, spares)
    seconds = time.monotonic() - started
    stderr_tail = bytes(err).decode("utf-8", "replace")

    def failed(reason: str, confinement: tuple[str, ...] = ()) -> IsolatedOutcome:
        return IsolatedOutcome(False, None, reason, "", seconds, confinement, stderr_tail, child.warm)

    if timed_out:
        return failed("timeout")
    if overflowed:
        return failed("crashed")
    try:
        frame = _read_frame(out, max_result_bytes)
    except _ProtocolError:
        return failed(_failure_from_exit(status, usage, limits, bytes(err)))
    return IsolatedOutcome(
        ok=frame["ok"],
        result=frame["result"] if frame["ok"] else None,
        failure=_failure_from_frame(frame),
        stdout=frame["stdout"],
        seconds=seconds,
        confinement=tuple(frame["confinement"]),
        stderr_tail=stderr_tail,
        warm=child.warm,
    )
