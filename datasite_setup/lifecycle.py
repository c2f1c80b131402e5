"""Start, stop and inspect a datasite as a background process (`datasite-setup up|down|status`).

`up` spawns `python -m datasite_setup serve SITE.toml` in its own session, records its PID in the
data dir and returns once the HTTP API answers; calling it again while the site runs changes
nothing. The server's output goes to `data_dir/server.log`, which `up` quotes if start-up fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from datasite_setup.server import API_PREFIX
from datasite_setup.site_config import SiteConfig


class LifecycleError(RuntimeError):
    """The datasite could not be started or stopped; the message says why and what to check."""


@dataclass(frozen=True)
class SiteStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    answering: bool
    data_dir: str

    def to_dict(self) -> dict:
        return asdict(self)


def _pid_file(config: SiteConfig) -> Path:
    return config.data_dir / "server.pid"


def log_file(config: SiteConfig) -> Path:
    return config.data_dir / "server.log"


def _read_pid(config: SiteConfig) -> int | None:
    try:
        return int(_pid_file(config).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return True


def answers(config: SiteConfig, timeout: float = 2.0) -> bool:
    """True when the datasite's HTTP API serves its metadata."""
    try:
        return requests.get(f"{config.url}{API_PREFIX}/metadata", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def status(config: SiteConfig) -> SiteStatus:
    pid = _read_pid(config)
    running = _alive(pid)
    return SiteStatus(
        name=config.name,
        url=config.url,
        pid=pid if running else None,
        running=running,
        answering=running and answers(config),
        data_dir=str(config.data_dir),
    )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def up(config: SiteConfig, timeout: float = 180.0) -> SiteStatus:
    """Start the datasite unless it already runs; return once it answers over HTTP."""
    current = status(config)
    if current.running:
        if not current.answering:
            _wait_until_answering(config, current.pid, timeout)
        return status(config)
    if _port_taken(config.host, config.port):
        raise LifecycleError(
            f"{config.path}: port {config.port} on {config.host} is taken by another program; "
            "stop it or set another [site] port"
        )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_file(config), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datasite_setup", "serve", str(config.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=config.data_dir,
        )
    _pid_file(config).write_text(str(proc.pid))
    _wait_until_answering(config, proc.pid, timeout)
    return status(config)


def _wait_until_answering(config: SiteConfig, pid: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(config):
            return
        if not _alive(pid):
            _pid_file(config).unlink(missing_ok=True)
            raise LifecycleError(
                f"datasite {config.name} exited during start-up; last lines of {log_file(config)}:\n{_tail(log_file(config))}"
            )
        time.sleep(0.5)
    raise LifecycleError(f"datasite {config.name} did not answer on {config.url} within {timeout:.0f} s; see {log_file(config)}")


def down(config: SiteConfig, timeout: float = 30.0) -> bool:
    """Stop the datasite; True if one was running. Escalates to SIGKILL after `timeout`."""
    pid = _read_pid(config)
    if not _alive(pid):
        _pid_file(config).unlink(missing_ok=True)
        return False
    assert pid is not None
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    _pid_file(config).unlink(missing_ok=True)
    return True
