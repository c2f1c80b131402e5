"""Secrets a datasite keeps in its data dir: passwords, its server identity, its pseudonym key.

Each secret is a file readable by the owner only (0600) in `data_dir/secrets/` (0700), written
atomically so a crash never leaves half a key. Nothing here is derived from the site's name:
syft's `dev_mode` derives the server key from the name, which anyone can recompute.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from datasite_setup.site_config import SiteConfig


class CredentialError(RuntimeError):
    """A secret that is missing, unreadable or too widely readable."""


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_private(path: Path) -> str:
    """Read a secret file, refusing one that others can read (someone copied it carelessly)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CredentialError(f"{path}: permissions {oct(mode)} let others read a secret; run: chmod 600 {path}")
    return path.read_text().strip()


def _get_or_create(path: Path, make: callable) -> str:
    if path.exists():
        return read_private(path)
    value = make()
    _write_private(path, value)
    return value


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def secure_aggregation_seed(config: SiteConfig) -> bytes:
    """The secret behind this site's secure-aggregation identity and session keys, created once."""
    return bytes.fromhex(_get_or_create(config.secrets_dir / "secure_aggregation_seed", lambda: secrets.token_hex(32)))


def admin_password(config: SiteConfig) -> str:
    """The admin's password: from the configured environment variable, else generated once."""
    from_env = os.environ.get(config.admin_password_env)
    if from_env:
        return from_env
    return _get_or_create(config.secrets_dir / "admin_password", _new_password)


def data_scientist_password(config: SiteConfig, email: str) -> str:
    """A data scientist's initial password: from her `password_env`, else generated once."""
    entry = next((ds for ds in config.data_scientists if ds.email == email), None)
    if entry is None:
        raise CredentialError(f"{config.path}: no [[data_scientists]] entry with email {email!r}")
    if entry.password_env and os.environ.get(entry.password_env):
        return os.environ[entry.password_env]
    safe = email.replace("@", "_at_").replace("/", "_")
    return _get_or_create(config.secrets_dir / f"ds_password_{safe}", _new_password)


@dataclass(frozen=True)
class ServerIdentity:
    """The server's UID and signing key; fixed so clients and stored objects survive restarts."""

    server_uid: str
    signing_key: str


def server_identity(config: SiteConfig) -> ServerIdentity:
    """Load the datasite's identity, creating a random one on first start."""
    path = config.secrets_dir / "server_identity.json"
    if path.exists():
        data = json.loads(read_private(path))
        return ServerIdentity(server_uid=data["server_uid"], signing_key=data["signing_key"])
    from syft.server.credentials import SyftSigningKey
    from syft.types.uid import UID

    identity = ServerIdentity(server_uid=UID().no_dash, signing_key=str(SyftSigningKey.generate()))
    _write_private(path, json.dumps({"server_uid": identity.server_uid, "signing_key": identity.signing_key}))
    return identity


def pseudonym_key(config: SiteConfig) -> bytes:
    """The site's secret for de-identification pseudonyms: stable per site, never leaves it."""
    return bytes.fromhex(_get_or_create(config.secrets_dir / "pseudonym_key", lambda: secrets.token_hex(32)))
