"""A site's case store over its life: an ingestion killed half-way, resumed, then the site growing.

The store side runs here without a datasite (`upload.store_cases`, what `datasite-setup ingest`
runs before it publishes); the same flow through a live datasite at 1,000 cases is the e2e test
at the end.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from datasite_setup.case_store import STORE_DIR, CaseSource, cases_of_manifest
from datasite_setup.ingest import Ingestion
from datasite_setup.site_config import load_site_config
from datasite_setup.site_tasks import run_installed_task
from datasite_setup.upload import store_cases
from domains.brain_mr_segmentation.phantom import write_phantom_site
from domains.brain_mr_segmentation.scanner_profiles import PROFILES
from tests.conftest import free_port, start_site, write_site_config

PROFILE = PROFILES["hospital-a"].with_size(matrix=16, n_slices=3)

# Runs `store_cases` with each NIfTI write slowed down, so that the parent can kill it mid-case.
_SLOW_INGESTION = """
import sys, time
from pathlib import Path
import datasite_setup.case_store as case_store
from datasite_setup.credentials import pseudonym_key
from datasite_setup.ingest import Ingestion
from datasite_setup.site_config import load_site_config
from datasite_setup.upload import store_cases

write = case_store._write_nifti
def slow_write(*args):
    time.sleep(0.03)
    write(*args)
case_store._write_nifti = slow_write
config = load_site_config(sys.argv[1])
store_cases(config, Ingestion(Path(sys.argv[2]), None, pseudonym_key(config), progress=False), "growing")
"""


def _phantom_export(folder: Path, n_cases: int) -> Path:
    write_phantom_site(PROFILE, folder, n_cases=n_cases, seed=3)
    return folder


def _manifest_count(store_dir: Path) -> int:
    import sqlite3

    path = store_dir / "manifest.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM cases").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def test_killed_ingestion_resumes_without_duplicates_and_a_later_one_adds_a_version(tmp_path: Path) -> None:
    config = load_site_config(write_site_config(tmp_path / "site", "hospital-a", free_port()))
    first = _phantom_export(tmp_path / "export-40", 40)
    child = subprocess.Popen([sys.executable, "-c", _SLOW_INGESTION, str(config.path), str(first)],
                             cwd=Path(__file__).resolve().parents[1])
    store_dir = config.data_dir / STORE_DIR
    deadline = time.monotonic() + 120
    while _manifest_count(store_dir) < 12 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    stored_before = _manifest_count(store_dir)
    assert 12 <= stored_before < 40, "the ingestion was not stopped half-way"

    from datasite_setup.credentials import pseudonym_key

    stored = store_cases(config, Ingestion(first, None, pseudonym_key(config), progress=False), "growing")
    store, version = stored.store, stored.version
    assert stored.added == 40 - stored_before  # the resumed run adds only what was missing ...
    assert store.unpublished_version("growing") == version  # ... into the version the killed run started
    manifest = store.manifest(version, collection="growing")
    assert len(manifest) == len({e.case_id for e in manifest}) == 40
    folders = sorted(p.name for p in (store_dir / "cases").iterdir())
    assert folders == sorted(e.case_id for e in manifest)  # no half-written or orphaned case folder
    assert all(case["image"].shape == (3, 16, 16) for case in CaseSource(store.root, manifest))
    store.mark_published(version, "growing")

    again = store_cases(config, Ingestion(first, None, pseudonym_key(config), progress=False), "growing")
    assert again.added == 0
    again.store.drop_empty_version(again.version)
    assert again.store.collection_version("growing") == version

    grown = _phantom_export(tmp_path / "export-60", 60)  # the same seed: the first 40 cases again, 20 new
    grown_stored = store_cases(config, Ingestion(grown, None, pseudonym_key(config), progress=False), "growing")
    store, v2 = grown_stored.store, grown_stored.version
    assert grown_stored.added == 20 and v2 > version
    newest = {e.case_id: e for e in store.manifest(v2, collection="growing")}
    assert len(newest) == 60
    assert all(newest[e.case_id].split == e.split and newest[e.case_id].added_in == version for e in manifest)
    splits = [e.split for e in newest.values()]
    assert {"train", "validation", "test"} <= set(splits)


def test_a_case_source_crosses_to_the_sandbox_as_its_manifest_not_its_pixels(tmp_path: Path) -> None:
    config = load_site_config(write_site_config(tmp_path / "site", "hospital-a", free_port()))
    from datasite_setup.credentials import pseudonym_key

    export = _phantom_export(tmp_path / "export", 30)
    stored = store_cases(config, Ingestion(export, None, pseudonym_key(config), progress=False), "cases")
    source = CaseSource(stored.store.root, [e.to_dict() for e in stored.store.manifest(stored.version)])
    pixels = sum(case["image"].nbytes + case["mask"].nbytes for case in source)
    assert len(pickle.dumps(source)) < 1500 * len(source) and len(pickle.dumps(source)) < pixels
    in_memory = [dict(case, image=np.array(case["image"]), mask=np.array(case["mask"])) for case in source]
    params = {"group_by": "Manufacturer", "split": "all"}
    assert run_installed_task("cohort_summary", source, params, min_cohort=5) == \
        run_installed_task("cohort_summary", in_memory, params, min_cohort=5)


def test_a_split_file_fixes_the_listed_patients_and_a_stored_patient_keeps_its_split(tmp_path: Path) -> None:
    from datasite_setup.case_splits import read_split_file
    from datasite_setup.credentials import pseudonym_key

    config = load_site_config(write_site_config(tmp_path / "site", "hospital-a", free_port()))
    export = _phantom_export(tmp_path / "export", 12)
    ids = sorted(str(pydicom.dcmread(next((export / d / "image").iterdir()), stop_before_pixels=True).PatientID)
                 for d in sorted(p.name for p in export.iterdir()))
    listing = tmp_path / "splits.csv"
    wanted = {pid: ("test" if i < 4 else "validation" if i < 6 else "unlabelled" if i < 7 else "train") for i, pid in enumerate(ids)}
    listing.write_text("PatientID,split\n" + "".join(f"{pid},{split}\n" for pid, split in wanted.items()))
    key = pseudonym_key(config)
    stored = store_cases(config, Ingestion(export, None, key, progress=False), "listed",
                         listed_splits=read_split_file(listing))
    entries = stored.store.manifest(stored.version, collection="listed")
    by_split = {name: sum(e.split == name and e.labelled for e in entries) for name in ("train", "validation", "test")}
    assert by_split == {"train": 5, "validation": 2, "test": 4} and sum(not e.labelled for e in entries) == 1
    assert len(CaseSource(stored.store.root, entries).in_split("unlabelled")) == 1

    flipped = tmp_path / "flipped.csv"
    flipped.write_text("PatientID,split\n" + "".join(f"{pid},train\n" for pid in ids))
    again = store_cases(config, Ingestion(export, None, key, progress=False), "listed-again",
                        listed_splits=read_split_file(flipped))
    assert len(again.split_conflicts) == 7  # the 4 test, 2 validation and 1 unlabelled patients keep their split
    assert [e.split for e in again.store.manifest(again.version, collection="listed-again")] == [e.split for e in entries]

    bad = tmp_path / "bad.csv"
    bad.write_text("PatientID,split\nP1,holdout\n")
    with pytest.raises(ValueError, match="bad.csv, line 2: split 'holdout'"):
        read_split_file(bad)


@pytest.mark.e2e
def test_a_thousand_case_site_is_ingested_restarted_and_used_by_a_site_task(tmp_path: Path) -> None:
    """1,000 small phantom cases through `datasite-setup ingest`, a restart, then an approved task."""
    from analyses.site_requests import call_site_task, request_site_task
    from datasite_setup import review
    from tests.test_datasite_server import asset_of

    export = _phantom_export(tmp_path / "export", 1000)
    site = start_site(tmp_path / "site", "hospital-a")
    try:
        started = time.monotonic()
        proc = site.setup("ingest", str(export), "--dataset", "big", "--json")
        report = json.loads(proc.stdout)
        ingest_seconds = time.monotonic() - started
        assert report["added"] == 1000 and report["summary"]["cases"] == 1000 and report["rejected"] == []
        site.setup("down")
        site.setup("up")
        ds = site.ds_client()
        asset = asset_of(ds, "big")
        request_site_task(ds, asset, "cohort_summary", "big", max_runs=1)
        admin = site.admin_client()
        review.approve(site.config, admin, next(r.id for r in review.list_requests(site.config, admin, status="pending")))
        started = time.monotonic()
        summary = call_site_task(ds, asset, "cohort_summary", "big", {"group_by": "Manufacturer"})
        call_seconds = time.monotonic() - started
        private = next(d for d in admin.datasets.get_all() if d.name == "big").assets[0].data
        local = run_installed_task("cohort_summary", cases_of_manifest(site.config.data_dir / STORE_DIR, private)[0],
                                   {"group_by": "Manufacturer"}, min_cohort=5)
        assert {k: v["n"] for k, v in summary.items()} == {k: v["n"] for k, v in local.items()}
        assert 0 < sum(v["n"] for v in summary.values()) <= 1000
        print(f"1,000 cases: ingest {ingest_seconds:.1f} s, one cohort_summary call {call_seconds:.1f} s")
    finally:
        site.setup("down", check=False)
