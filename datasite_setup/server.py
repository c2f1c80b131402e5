"""The project's own entry point for a PySyft 0.9.5 datasite server.

`syft.orchestra.launch` keeps its database and blobs under a temp dir keyed by a fresh server UID,
so a restarted datasite came back empty. Here the datasite is built from the site config instead:
a fixed identity from `data_dir/secrets`, a SQLite file in `data_dir/db` (or `db_url` for
PostgreSQL), blobs in `data_dir/blob`, the configured admin as root (syft's default root account
never exists), guest sign-up off, never `dev_mode` or `reset`. The FastAPI app is syft's own
routes under `/api/v2`, served by uvicorn in the foreground (`datasite-setup serve`).

Three changes to syft 0.9.5's behaviour are installed here: execution budgets are enforced
(`execution_limits`), every approved function runs through the site's isolated execution with
output contracts (`site_execution`), both before the server object exists; and once it exists, its
API-call handler is put behind the door (`server_door`): a data scientist's session reaches only
the allow-listed calls of the request workflow, deny by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from datasite_setup.credentials import admin_password, server_identity
from datasite_setup import server_door, site_execution
from datasite_setup.execution_limits import enforce_execution_budgets
from datasite_setup.site_config import SiteConfig

API_PREFIX = "/api/v2"
_DB_PASSWORD = re.compile(r"(postgresql(?:\+\w+)?://[^:/@\s]*:)[^@\s]*@")


def _quiet_environment() -> None:
    os.environ["ENABLE_SIGNUP"] = "False"
    os.environ["DEV_MODE"] = "False"
    os.environ.setdefault("SYFT_DISABLE_TELEMETRY", "1")


def build_datasite(config: SiteConfig) -> Any:
    """Construct the syft Datasite object for this site, creating its storage on first start."""
    _quiet_environment()
    from syft.server.credentials import SyftSigningKey
    from syft.server.datasite import Datasite
    from syft.store.blob_storage.on_disk import OnDiskBlobStorageClientConfig, OnDiskBlobStorageConfig
    from syft.store.db.sqlite import SQLiteDBConfig
    from syft.types.uid import UID

    enforce_execution_budgets(config.data_dir)
    site_execution.install(config)
    identity = server_identity(config)
    for sub in ("db", "blob"):
        (config.data_dir / sub).mkdir(parents=True, exist_ok=True)
    db_config = None if config.db_url else SQLiteDBConfig(path=config.data_dir / "db", filename="datasite.sqlite")
    blob_config = OnDiskBlobStorageConfig(
        client_config=OnDiskBlobStorageClientConfig(base_directory=config.data_dir / "blob"),
        min_blob_size=1,
    )
    with _db_password_kept_out_of_stdout():
        datasite = Datasite(
            name=config.name,
            id=UID.from_string(identity.server_uid),
            signing_key=SyftSigningKey.from_string(identity.signing_key),
            db_config=db_config,
            db_url=config.db_url,
            root_email=config.admin_email,
            root_username=config.admin_name,
            root_password=admin_password(config),
            blob_storage_config=blob_config,
            deployment_type="remote",
            dev_mode=False,
            reset=False,
            n_consumers=0,
            create_producer=False,
            in_memory_workers=True,
            association_request_auto_approval=False,
            background_tasks=False,
        )
    _disable_guest_signup(datasite)
    server_door.install(datasite, config.data_dir)
    return datasite


class _RedactingStream(io.TextIOBase):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_DB_PASSWORD.sub(r"\1***@", text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


@contextlib.contextmanager
def _db_password_kept_out_of_stdout() -> Iterator[None]:
    """syft 0.9.5 prints the PostgreSQL URL with its password while the Datasite is built
    (`print(f"Using {...} and {db_config.connection_string}")`, syft/server/server.py:832), and
    `up` sends stdout to data_dir/server.log; the password is masked in what is printed then."""
    with contextlib.redirect_stdout(_RedactingStream(sys.stdout)):
        yield


def _disable_guest_signup(datasite: Any) -> None:
    from syft.service.context import AuthedServiceContext
    from syft.service.settings.settings import ServerSettingsUpdate
    from syft.service.user.user_roles import ServiceRole

    context = AuthedServiceContext(server=datasite, credentials=datasite.verify_key, role=ServiceRole.ADMIN)
    datasite.services.settings._update(context=context, settings=ServerSettingsUpdate(signup_enabled=False)).unwrap()


def build_app(datasite: Any) -> Any:
    """syft's HTTP routes for this datasite; the worker stops cleanly when uvicorn shuts down."""
    from contextlib import asynccontextmanager

    from fastapi import APIRouter, FastAPI
    from syft.server.routes import make_routes

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        try:
            yield
        finally:
            datasite.stop()

    app = FastAPI(title=datasite.name, lifespan=lifespan)
    router = APIRouter()
    router.include_router(make_routes(worker=datasite))
    app.include_router(router, prefix=API_PREFIX)
    return app


def serve(config: SiteConfig, log_level: str = "warning") -> None:
    """Run the datasite in the foreground until SIGTERM/SIGINT (systemd, containers, `up`)."""
    import uvicorn

    logging.getLogger("syft").setLevel(logging.WARNING)
    datasite = build_datasite(config)
    uvicorn.run(build_app(datasite), host=config.host, port=config.port, log_level=log_level)
