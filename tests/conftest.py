"""Shared fixtures: real datasite servers, started with the real CLI on loopback ports.

Each datasite is its own process (`datasite-setup up`), reached over HTTP. They are session- or
module-scoped because one costs ~10 s and ~400 MB; tests that restart a site get their own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from datasite_setup import loopback_site
from datasite_setup.credentials import data_scientist_password
from datasite_setup.loopback_site import free_port
from datasite_setup.site_config import SiteConfig, load_site_config

if TYPE_CHECKING:
    from analyses.federation.orchestrator import RunReport, TrainingPlan
    from analyses.federation.site_link import SiteLink

REPO = Path(__file__).resolve().parents[1]
DS_EMAIL = "ds@uni.example"
DS_PASSWORD_ENV = "MEDFED_TEST_DS_PASSWORD"
os.environ.setdefault(DS_PASSWORD_ENV, "test-ds-password-7c1e")


# Small enough that the limit tests finish quickly, large enough for torch in the child.
SHARED_SITE_LIMITS = """
[execution]
wall_seconds = 20
cpu_seconds = 60
memory_mb = 3072
"""


def shared_data_dir() -> Path:
    """Real test data beside the project (`../shared/data`), or $MEDFED_TEST_DATA."""
    return Path(os.environ.get("MEDFED_TEST_DATA", REPO.parent / "shared" / "data"))


def ibsi_dir() -> Path:
    path = shared_data_dir() / "ibsi_sts_mr"
    if not (path / "dicom").is_dir():
        pytest.skip(f"real MR data not found at {path} (set MEDFED_TEST_DATA to the folder holding ibsi_sts_mr)")
    return path


def write_site_config(folder: Path, name: str, port: int, *args: Any, **kwargs: Any) -> Path:
    """`loopback_site.write_site_config` with the tests' data scientist, whose password is in the environment."""
    return loopback_site.write_site_config(folder, name, port, *args, ds_email=DS_EMAIL, password_env=DS_PASSWORD_ENV, **kwargs)


def run_cli(module: str, *args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the project's CLIs exactly as a person would, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class LiveSite:
    config_path: Path

    @property
    def config(self) -> SiteConfig:
        return load_site_config(self.config_path)

    def setup(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli("datasite_setup", args[0], str(self.config_path), *args[1:], check=check)

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli("datasite_setup.admin_cli", "--site", str(self.config_path), *args, check=check)

    def admin_client(self) -> Any:
        from datasite_setup.connection import admin_client

        return admin_client(self.config)

    def ds_client(self) -> Any:
        from datasite_setup.connection import login

        return login(self.config.url, DS_EMAIL, data_scientist_password(self.config, DS_EMAIL))


def audit_entry(site: LiveSite, refusal: BaseException | str) -> dict:
    """The admin's audit-log entry behind a refusal, found by the reference its message quotes."""
    reference = re.search(r"reference ([0-9a-f]+)", str(refusal)).group(1)
    log = [json.loads(line) for line in (site.config.data_dir / "audit.log").read_text().splitlines()]
    return next(e for e in log if e.get("reference") == reference)


def start_site(folder: Path, name: str, **kwargs: Any) -> LiveSite:
    site = LiveSite(write_site_config(folder, name, free_port(), **kwargs))
    site.setup("up")
    return site


@pytest.fixture(scope="session")
def site_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveSite]]:
    """Datasites shared by the whole session, started on first use and stopped at the end."""
    pool: dict[str, LiveSite] = {}
    yield pool
    for site in pool.values():
        site.setup("down", check=False)


@pytest.fixture(scope="session")
def shared_site(site_pool: dict[str, LiveSite], tmp_path_factory: pytest.TempPathFactory) -> LiveSite:
    """One running datasite for tests that only read or add their own objects (custom code allowed)."""
    if "shared" not in site_pool:
        site_pool["shared"] = start_site(
            tmp_path_factory.mktemp("shared-site"),
            "hospital-shared",
            allow_custom_code=True,
            extra=SHARED_SITE_LIMITS,
        )
    return site_pool["shared"]


@pytest.fixture
def federate_in_process(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[SiteLink]], None]:
    """Point `federate train` at in-process sites (e.g. `SimulatedSite`s) instead of datasites: the
    federation file names them, their requests count as approved and every plan runs through the
    real orchestrator against them. The command's own code, the outputs and the comparison run as
    they do against live sites (tests/test_federated_training.py), in seconds and without a server."""
    from analyses import federation_file
    from analyses.federation import experiment
    from analyses.federation.orchestrator import Orchestrator

    def federate(links: list[SiteLink]) -> None:
        federation = SimpleNamespace(datasites=[SimpleNamespace(name=link.name) for link in links])

        def train(federation: Any, plan: TrainingPlan, out_dir: Path, progress: bool = True) -> RunReport:
            return Orchestrator(plan, links, out_dir, progress=False).run()

        monkeypatch.setattr(federation_file, "load_federation", lambda path: federation)
        monkeypatch.setattr(experiment, "submit", lambda federation, plans: {})
        monkeypatch.setattr(experiment, "train", train)

    return federate
