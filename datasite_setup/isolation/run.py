"""`run_isolated`: one approved function, run in a confined child, its outcome checked.

What the outcome rests on (`sandbox.frames` says why): the limits this process measured itself
(wall clock, threads it approved or the kernel refused in the run's cgroup, bytes received), then
the child's exit status (a refused audit event is final, whatever the child wrote before it), then
the ready frame the harness sent before the code ran (the layers in force), and only last the
result frame, which a child that exited with status 0 may have written itself and which therefore
counts as nothing more than a return value.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

from datasite_setup.isolation.exchange import exchange
from datasite_setup.isolation.limits import Limits
from datasite_setup.isolation.outcome import IsolatedOutcome, failure_from_exit, failure_from_frame
from datasite_setup.isolation.fork_server import FORK_SERVERS
from datasite_setup.isolation.spawn import DEFAULT_PRELOAD, run_threads, spawn
from datasite_setup.isolation.thread_cgroup import confine_threads
from datasite_setup.sandbox.audit_hook import refused_event
from datasite_setup.sandbox.frames import FRAME_LENGTH, READY_MAX_BYTES, ProtocolError, read_ready, read_result

# Without these the code does not run at all. landlock-net (kernel 6.7+) and landlock-scope (6.12+)
# are used when present; seccomp already refuses sockets and signals to other processes.
REQUIRED_LAYERS = frozenset({"landlock-fs", "seccomp", "audit-hook"})


def run_isolated(
    source: str,
    function: str,
    kwargs: dict[str, Any],
    limits: Limits,
    forbidden_paths: list[Path] | tuple[Path, ...] = (),
    preload: tuple[str, ...] = DEFAULT_PRELOAD,
    *,
    granted_paths: list[Path] | tuple[Path, ...] = (),
    required_layers: frozenset[str] = REQUIRED_LAYERS,
    warm: bool = True,
) -> IsolatedOutcome:
    """Run `function(**kwargs)` from `source` in a confined child and return its checked outcome.

    `kwargs` are pickled to the child (trusted direction) and should be plain data: any class in
    them must be importable from the installation. `forbidden_paths` (the site's data dir) stay
    unreadable even where they sit below a readable root, except `granted_paths` inside them, which the
    child may read and nothing more (the site's case store inside its data dir). The result is only decoded here; apply
    an `output_contracts` contract before handing it to anyone. If a `required_layers` layer is
    unavailable the code is not run and the failure is "crashed", with the reason in `stderr_tail`.
    `warm` forks the child from the zygote for `preload` (`fork_server`), starting it if needed;
    the run starts cold where that zygote cannot serve.
    """
    started = time.monotonic()
    deadline = started + limits.wall_seconds
    child = FORK_SERVERS.fork(preload, limits, limits.wall_seconds) if warm else None
    if child is None:
        child = spawn(limits)
    cgroup = confine_threads(child.pid, limits.max_threads) if limits.thread_cgroup else None
    cgroup_refused = False
    try:
        payload = pickle.dumps(
            {
                "source": source,
                "function": function,
                "kwargs": pickle.dumps(kwargs, protocol=pickle.HIGHEST_PROTOCOL),
                "scratch": child.scratch.name,
                "preload": list(preload),
                "threads": run_threads(limits),
                "approve_threads": cgroup is None,
                "forbidden_paths": [str(Path(p).resolve()) for p in forbidden_paths],
                "granted_paths": [str(Path(p).resolve()) for p in granted_paths],
                "max_result_bytes": limits.max_result_bytes,
                "required_layers": sorted(required_layers),
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        max_out = FRAME_LENGTH.size + READY_MAX_BYTES + FRAME_LENGTH.size + limits.max_result_bytes
        got = exchange(child, payload, deadline, max_out, limits.max_threads)
    finally:
        child.kill()
        status, usage = child.reap()
        child.release()
        if cgroup is not None:
            cgroup_refused = cgroup.refused()
            cgroup.remove()
    seconds = time.monotonic() - started
    stderr_tail = bytes(got.err).decode("utf-8", "replace")
    exit_code = os.waitstatus_to_exitcode(status)
    try:
        confinement, rest = read_ready(got.out)
        confinement.append("thread-approvals" if cgroup is None else "pids-cgroup")
    except ProtocolError:
        confinement, rest = [], None

    measured = {"peak_rss_mb": round(usage.max_rss_kb / 1024, 1), "cpu_seconds": round(usage.cpu_seconds, 2)}

    def failed(reason: str) -> IsolatedOutcome:
        return IsolatedOutcome(False, None, reason, "", seconds, tuple(confinement), stderr_tail, child.warm, **measured)

    if got.timed_out:
        return failed("timeout")
    if got.threads_refused or cgroup_refused:
        return failed("threads")
    if got.overflowed:
        return failed("result-size")
    refused = refused_event(exit_code)
    if refused is not None:
        return failed(f"refused:{refused}")
    if rest is None or exit_code != 0:
        return failed(failure_from_exit(status, usage, limits, bytes(got.err)))
    try:
        frame = read_result(rest, limits.max_result_bytes)
    except ProtocolError:
        return failed(failure_from_exit(status, usage, limits, bytes(got.err)))
    return IsolatedOutcome(
        ok=frame["ok"],
        result=frame["result"] if frame["ok"] else None,
        failure=failure_from_frame(frame),
        stdout=frame["stdout"],
        seconds=seconds,
        confinement=tuple(confinement),
        stderr_tail=stderr_tail,
        warm=child.warm,
        **measured,
    )
