"""A site config for a datasite on this machine's loopback: what the demo, the benchmarks and the
tests stand up. A hospital writes its own config (see `site_config` for every setting); this
writes the smallest complete one, with one data scientist account."""

from __future__ import annotations

import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing on the loopback listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def write_site_config(
    folder: Path,
    name: str,
    port: int,
    min_cohort: int = 2,
    allow_custom_code: bool = False,
    extra: str = "",
    *,
    ds_email: str = "ds@uni.example",
    password_env: str | None = None,
    header: str = "",
) -> Path:
    """Write `folder/<name>.toml` and return its path. Data lives in `<name>-data` beside it;
    the admin's password and the data scientist's (unless `password_env` names a variable holding
    it) are generated into the data dir. `extra` is appended after the [privacy] table, so it can
    add privacy settings or start further tables."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    password_line = f'password_env = "{password_env}"\n' if password_env else ""
    path.write_text(
        f"""{header}
[site]
name = "{name}"
host = "{LOOPBACK}"
port = {port}
data_dir = "{name}-data"
allow_custom_code = {str(allow_custom_code).lower()}

[admin]
email = "admin@{name}.example"

[[data_scientists]]
email = "{ds_email}"
name = "A. Researcher"
{password_line}
[privacy]
min_cohort = {min_cohort}
{extra}
"""
    )
    return path
