"""Log in to a running datasite over HTTP as its admin (what `datasite-admin` and `up` use)."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Iterator
from typing import Any

from datasite_setup.credentials import admin_password
from datasite_setup.site_config import SiteConfig


class _PerThreadStdout(io.TextIOBase):
    """sys.stdout that drops writes from threads inside `quiet_syft` and passes the rest on.

    `contextlib.redirect_stdout` swaps the process-wide sys.stdout, so two threads quieting syft
    at once (the orchestrator calls sites concurrently) can restore each other's buffers and
    leave stdout swallowed for good; this keeps one stream and a per-thread switch instead."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.quiet = threading.local()

    def write(self, text: str) -> int:
        if getattr(self.quiet, "depth", 0):
            return len(text)
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target.isatty()


_install_lock = threading.Lock()


@contextlib.contextmanager
def quiet_syft() -> Iterator[None]:
    """Keep syft's own prints (banners, 'Approving request ...') out of our output and --json."""
    with _install_lock:
        if not isinstance(sys.stdout, _PerThreadStdout):
            sys.stdout = _PerThreadStdout(sys.stdout)
        stream = sys.stdout
    stream.quiet.depth = getattr(stream.quiet, "depth", 0) + 1
    try:
        yield
    finally:
        stream.quiet.depth -= 1


def login(url: str, email: str, password: str) -> Any:
    """A syft client for `url`."""
    import syft as sy

    host, _, port = url.rpartition(":")
    with quiet_syft():
        return sy.login(url=host, port=int(port), email=email, password=password)


def admin_client(config: SiteConfig) -> Any:
    return login(config.url, config.admin_email, admin_password(config))
