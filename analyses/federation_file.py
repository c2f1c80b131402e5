"""The federation file: which datasites a data scientist works with and where her passwords live.

A federation file never holds a password. Each `[[datasites]]` entry names the site, its URL, the
data scientist's e-mail there, and either `password_env` (an environment variable) or
`password_file` (a file readable only by its owner, relative to the federation file):

    [[datasites]]
    name = "hospital-a"
    url = "http://127.0.0.1:8081"
    email = "ds@uni.example"
    password_env = "DS_PASSWORD"
    dataset = "hospital-a-cases"     # optional; default "<name>-cases"
    asset = "cases"                  # optional
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FederationFileError(ValueError):
    """The federation file is missing, malformed or points at a password that cannot be read."""


@dataclass(frozen=True)
class DatasiteEntry:
    name: str
    url: str
    email: str
    password_env: str | None = None
    password_file: Path | None = None
    dataset: str = ""
    asset: str = "cases"

    @property
    def dataset_name(self) -> str:
        return self.dataset or f"{self.name}-cases"

    def password(self) -> str:
        """The data scientist's password for this site, from the environment or a 0600 file."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise FederationFileError(
                    f"datasite '{self.name}': environment variable {self.password_env} is not set; "
                    "export it or use password_file"
                )
            return value
        assert self.password_file is not None
        if not self.password_file.is_file():
            raise FederationFileError(f"datasite '{self.name}': password_file {self.password_file} does not exist")
        mode = stat.S_IMODE(self.password_file.stat().st_mode)
        if mode & 0o077:
            raise FederationFileError(
                f"datasite '{self.name}': password_file {self.password_file} is readable by others "
                f"(mode {mode:o}); run chmod 600 on it"
            )
        return self.password_file.read_text().strip()

    def login(self) -> Any:
        from datasite_setup.connection import login

        return login(self.url, self.email, self.password())


@dataclass(frozen=True)
class Federation:
    path: Path
    datasites: tuple[DatasiteEntry, ...]

    def site(self, name: str) -> DatasiteEntry:
        for entry in self.datasites:
            if entry.name == name:
                return entry
        raise KeyError(f"no datasite named '{name}' in {self.path}")


_KEYS = {"name", "url", "email", "password_env", "password_file", "dataset", "asset"}


def load_federation(path: str | Path) -> Federation:
    """Read and check a federation file; errors name the file, the entry and the field."""
    path = Path(path)
    if not path.is_file():
        raise FederationFileError(f"{path}: federation file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FederationFileError(f"{path}: not valid TOML ({exc})") from None
    entries = raw.get("datasites")
    if not isinstance(entries, list) or not entries:
        raise FederationFileError(f"{path}: needs at least one [[datasites]] table")
    sites: list[DatasiteEntry] = []
    for index, entry in enumerate(entries, start=1):
        where = f"{path}: [[datasites]] #{index}"
        if not isinstance(entry, dict):
            raise FederationFileError(f"{where} is not a table")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise FederationFileError(f"{where}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
        for key in ("name", "url", "email"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise FederationFileError(f"{where}: '{key}' is required and must be a non-empty string")
        if "password" in entry:
            raise FederationFileError(f"{where}: never put a password in the file; use password_env or password_file")
        has_env, has_file = "password_env" in entry, "password_file" in entry
        if has_env == has_file:
            raise FederationFileError(f"{where} ('{entry['name']}'): give exactly one of password_env or password_file")
        if not entry["url"].startswith(("http://", "https://")) or ":" not in entry["url"].split("//", 1)[1]:
            raise FederationFileError(f"{where} ('{entry['name']}'): url must look like http://host:port")
        sites.append(
            DatasiteEntry(
                name=entry["name"],
                url=entry["url"].rstrip("/"),
                email=entry["email"],
                password_env=entry.get("password_env"),
                password_file=(path.parent / entry["password_file"]).resolve() if has_file else None,
                dataset=str(entry.get("dataset", "")),
                asset=str(entry.get("asset", "cases")),
            )
        )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise FederationFileError(f"{path}: datasite names must be unique, got {names}")
    return Federation(path=path, datasites=tuple(sites))
