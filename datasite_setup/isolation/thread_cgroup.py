"""The thread cap held by the kernel: each run's child alone in a pids cgroup, `pids.max` its cap.

Approving each new thread in the parent (`thread_cap`) costs the thread a round trip between two
processes (~30 us on the 2-core dev VM, ~55 us when the parent is woken on the other core); ITK's
default threader starts a thread per filter call and core, so radiomics ran 3-5 % slower in a
child than in process (`benchmarks/thread_cap_cost.py`).
In a pids cgroup the kernel refuses a thread beyond the cap itself (clone fails with EAGAIN), at no
cost per thread, and counts each refusal in `pids.events`, which the parent reads after the run: a
refused thread fails the run whatever the child did next, as with the approvals.

Where the server may make cgroups: a cgroup v1 hierarchy with the pids controller, or cgroup v2
whose root enables pids for its children (both as root, or in a tree delegated to the server's
user). Runs get `medfed-runs/run-<pid>` there. Anywhere else, or if any step fails, the child's
threads are approved by the parent instead, which works for any user on any Linux >= 5.7.

The child cannot leave its cgroup or raise its cap: writing under /sys is outside its Landlock
write rules, and seccomp refuses mount, unshare and setns.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from pathlib import Path

RUNS_DIR = "medfed-runs"
_REMOVE_TRIES = 50


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, super options) of every mount this process sees."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as lines:
        for line in lines:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) >= 5 and len(tail) >= 3:
                found.append((fields[4].replace("\\040", " "), tail[0], tail[2].split(",")))
    return found


def _pids_hierarchy() -> tuple[Path, bool] | None:
    """(mount point, is cgroup v2) of a hierarchy whose children can get a pids controller."""
    mounts = _mounts()
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "pids" in options:
            return Path(point), False
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            try:
                enabled = (Path(point) / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if "pids" in enabled:
                return Path(point), True
    return None


@functools.cache
def runs_root() -> Path | None:
    """The directory the runs' cgroups are made in, made once; None where this process may not."""
    try:
        hierarchy = _pids_hierarchy()
        if hierarchy is None:
            return None
        point, unified = hierarchy
        root = point / RUNS_DIR
        root.mkdir(exist_ok=True)
        if unified and "pids" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+pids")
        return root if os.access(root, os.W_OK) else None
    except OSError:
        return None


class RunCgroup:
    """One child's cgroup: made before its code runs, read and removed after it was reaped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def refused(self) -> bool:
        """True if the kernel refused the child a thread (or could no longer say)."""
        try:
            events = dict(line.split() for line in (self.path / "pids.events").read_text().splitlines())
            return int(events.get("max", "1")) > 0
        except (OSError, ValueError):
            return True

    def remove(self) -> None:
        """Remove the (now empty) cgroup; a reaped child's threads may take a moment to leave it."""
        for _ in range(_REMOVE_TRIES):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if error.errno != errno.EBUSY:
                    return
                time.sleep(0.01)


def confine_threads(pid: int, max_threads: int) -> RunCgroup | None:
    """Move `pid` (a single-threaded child whose code has not started) into a cgroup of its own
    with `pids.max = max_threads`; None where that cannot be done (the cgroup is then removed
    unless the child is already in it, where its cap still holds beside the approvals)."""
    root = runs_root()
    if root is None:
        return None
    path = root / f"run-{pid}"
    cgroup = RunCgroup(path)
    try:
        if path.exists():  # left by a server that died with a child of this pid running
            path.rmdir()
        path.mkdir()
        (path / "pids.max").write_text(str(max_threads))
        (path / "cgroup.procs").write_text(str(pid))
        member = f"/{RUNS_DIR}/run-{pid}"
        if not any(line.endswith(member) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()):
            raise OSError(f"pid {pid} is not in {path}")
    except OSError:
        cgroup.remove()
        return None
    return cgroup
