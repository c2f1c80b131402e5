"""A datasite whose store is PostgreSQL (`[site] db_url`) keeps everything across a restart.

A throwaway PostgreSQL cluster is made with `initdb` in a temporary folder (trust authentication,
its unix socket in that folder, a free loopback port) and started with `pg_ctl`; the datasite is
started with the real CLI against it. PostgreSQL refuses to run as root, so under root the server
runs as the system's `postgres` account. The test skips with the reason when the binaries (or,
under root, that account) are absent.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, LiveSite, free_port
from tests.test_datasite_server import asset_of, requests_json, run, submit_request, upload_small_dataset

PG_BINARIES = ("initdb", "pg_ctl", "postgres")
PG_USER = "medfed"
PG_PASSWORD = "not-checked-under-trust-auth"  # syft 0.9.5's PostgresDBConfig requires a password
PG_DATABASE = "hospital_pg"

pytestmark = pytest.mark.e2e


def mean_in_postgres(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def _server_account() -> str | None:
    """The account PostgreSQL runs as: ourselves, or `postgres` under root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' account to run PostgreSQL as (it refuses root)")


def _pg(*args: str, user: str | None, timeout: float = 120) -> None:
    proc = subprocess.run([shutil.which(args[0]) or args[0], *args[1:]], capture_output=True, text=True,
                          timeout=timeout, user=user, cwd="/")
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, object]]:
    """A running throwaway cluster with an empty database; stopped and deleted afterwards."""
    missing = [name for name in PG_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"PostgreSQL server binaries not on PATH ({', '.join(missing)}); install PostgreSQL to run this")
    account = _server_account()
    # Not pytest's tmp_path: it is private to our user, and the server may run as another one.
    root = Path(tempfile.mkdtemp(prefix="medfed-pg-"))
    if account is not None:
        shutil.chown(root, user=account)
    data, port = root / "data", free_port()
    try:
        _pg("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync", user=account)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        _pg("pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-o", options, "-w", "-t", "60", "start",
            user=account)
        try:
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", autocommit=True) as db:
                db.execute(f"CREATE DATABASE {PG_DATABASE}")
            yield {"port": port, "url": f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}/{PG_DATABASE}"}
        finally:
            _pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", user=account)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _site_config(folder: Path, db_url: str) -> Path:
    """conftest.write_site_config's site plus `db_url`, which has to sit in the [site] table."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hospital-pg.toml"
    path.write_text(f"""
[site]
name = "hospital-pg"
host = "127.0.0.1"
port = {free_port()}
data_dir = "hospital-pg-data"
db_url = "{db_url}"
allow_custom_code = true

[admin]
email = "admin@hospital-pg.example"

[[data_scientists]]
email = "{DS_EMAIL}"
name = "A. Researcher"
password_env = "{DS_PASSWORD_ENV}"

[privacy]
min_cohort = 2
""")
    return path


def _table_rows(port: int) -> dict[str, int]:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname=PG_DATABASE) as db:
        tables = [row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {table: db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables}


def test_postgres_store_keeps_dataset_user_and_approval_across_restart(postgres, tmp_path) -> None:
    site = LiveSite(_site_config(tmp_path, str(postgres["url"])))
    data_dir = site.config.data_dir
    site.setup("up")
    try:
        upload_small_dataset(site, "persistent-pg")
        ds = site.ds_client()
        asset = asset_of(ds, "persistent-pg")
        submit_request(ds, asset, mean_in_postgres, limit=2)
        row = next(r for r in requests_json(site) if r["function"] == "mean_in_postgres")
        site.admin("approve", row["id"])
        first = run(ds, "mean_in_postgres", asset).get()

        site.setup("down")
        assert not json.loads(site.setup("status", "--json", check=False).stdout)["running"]
        site.setup("up")

        admin = site.admin_client()
        assert [d.name for d in admin.datasets.get_all()] == ["persistent-pg"]
        assert DS_EMAIL in {u.email for u in admin.users.get_all()}
        row = next(r for r in requests_json(site) if r["function"] == "mean_in_postgres")
        assert (row["status"], row["runs_used"], row["runs_allowed"]) == ("approved", 1, 2)
        ds = site.ds_client()
        assert run(ds, "mean_in_postgres", asset_of(ds, "persistent-pg")).get() == first
    finally:
        site.setup("down", check=False)

    rows = _table_rows(int(postgres["port"]))
    assert rows.get("Dataset", 0) == 1 and rows.get("User", 0) >= 2 and rows.get("Request", 0) == 1, rows
    sqlite_files = [p for p in data_dir.rglob("*") if p.suffix in (".sqlite", ".db") or p.name.endswith("_json.db")]
    assert sqlite_files == [] and list((data_dir / "db").iterdir()) == []
    assert PG_PASSWORD not in (data_dir / "server.log").read_text(), "the database password was written to the log"
