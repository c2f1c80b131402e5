"""Log in to a running datasite over HTTP as its admin (what `datasite-admin` and `up` use)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from datasite_setup.credentials import admin_password
from datasite_setup.site_config import SiteConfig


def quiet_syft() -> contextlib.AbstractContextManager:
    """Keep syft's own prints (banners, 'Approving request ...') out of our output and --json."""
    return contextlib.redirect_stdout(io.StringIO())


def login(url: str, email: str, password: str) -> Any:
    """A syft client for `url`."""
    import syft as sy

    host, _, port = url.rpartition(":")
    with quiet_syft():
        return sy.login(url=host, port=int(port), email=email, password=password)


def admin_client(config: SiteConfig) -> Any:
    return login(config.url, config.admin_email, admin_password(config))
