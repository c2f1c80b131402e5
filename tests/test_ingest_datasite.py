"""`datasite-setup ingest` end to end: real DICOM in, private asset + mock on a live datasite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LiveSite, ibsi_dir


def dataset_names(site: LiveSite) -> list[str]:
    return sorted(d.name for d in site.admin_client().datasets.get_all())


@pytest.fixture(scope="module")
def ingested_ibsi(shared_site: LiveSite, tmp_path_factory: pytest.TempPathFactory) -> tuple[LiveSite, dict]:
    """The six real MR studies, ingested once through the CLI with a JSON report."""
    report_path = tmp_path_factory.mktemp("ingest") / "report.json"
    proc = shared_site.setup("ingest", str(ibsi_dir() / "dicom"), "--dataset", "ibsi-sts", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    return shared_site, json.loads(report_path.read_text())


def test_real_mr_studies_become_a_private_dataset_with_a_mock(ingested_ibsi: tuple[LiveSite, dict]) -> None:
    site, report = ingested_ibsi
    assert report["dataset"] == "ibsi-sts"
    assert len(report["accepted"]) == 6 and report["rejected"] == []

    private = next(d for d in site.admin_client().datasets.get_all() if d.name == "ibsi-sts").assets[0].data
    ds = site.ds_client()
    asset = next(d for d in ds.datasets.get_all() if d.name == "ibsi-sts").assets[0]
    mock = asset.mock
    assert asset.data is None or "SyftError" in type(asset.data).__name__

    assert len(private) == len(mock) == 6
    vendors = {c["metadata"]["Manufacturer"].split(" / ")[0] for c in private}  # e.g. "SIEMENS / MIM Software"
    assert vendors == {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    for real, fake in zip(private, mock):
        assert real["image"].shape == fake["image"].shape == real["mask"].shape
        assert real["spacing"] == fake["spacing"]
        assert set(real["metadata"]) == set(fake["metadata"])
        assert real["mask"].sum() > 0
        assert not np.array_equal(real["image"], fake["image"])
        assert not real["case_id"].startswith("STS")
    text = repr([c["metadata"] for c in private])
    assert "STS_0" not in text and "IBSI" not in text


def _write_bad_folder(folder: Path) -> Path:
    for sub in ("text", "cut"):
        (folder / sub).mkdir(parents=True)
    (folder / "text" / "notes.dcm").write_text("this is not a DICOM file")
    real = sorted((ibsi_dir() / "dicom" / "STS_002" / "image").glob("*.dcm"))
    (folder / "cut" / "truncated.dcm").write_bytes(real[0].read_bytes()[:2000])
    return folder


def test_bad_input_is_reported_per_file_and_leaves_the_datasite_unchanged(
    ingested_ibsi: tuple[LiveSite, dict], tmp_path: Path
) -> None:
    site, _ = ingested_ibsi
    before = dataset_names(site)
    bad = _write_bad_folder(tmp_path / "bad")
    report_path = tmp_path / "bad.json"
    proc = site.setup("ingest", str(bad), "--dataset", "bad-only", "--report", str(report_path), check=False)
    assert proc.returncode == 3
    report = json.loads(report_path.read_text())
    assert report["accepted"] == [] and report["dataset"] is None
    reasons = " ".join(item["path"] + ": " + item["reason"] for item in report["rejected"])
    assert "notes.dcm" in reasons and "truncated.dcm" in reasons
    assert "rejected" in proc.stdout
    assert dataset_names(site) == before


def test_good_series_are_kept_when_others_are_rejected(ingested_ibsi: tuple[LiveSite, dict], tmp_path: Path) -> None:
    site, _ = ingested_ibsi
    mixed = tmp_path / "mixed"
    shutil.copytree(ibsi_dir() / "dicom" / "STS_003", mixed / "STS_003")
    broken = mixed / "STS_004"
    shutil.copytree(ibsi_dir() / "dicom" / "STS_004", broken)
    images = sorted((broken / "image").glob("*.dcm"))
    images[len(images) // 2].unlink()
    proc = site.setup("ingest", str(mixed), "--dataset", "mixed", "--json", check=False)
    assert proc.returncode == 3
    report = json.loads(proc.stdout)
    assert len(report["accepted"]) == 1 and report["dataset"] == "mixed"
    assert any("STS_004" in item["path"] and "missing" in item["reason"].lower() for item in report["rejected"])
    private = next(d for d in site.admin_client().datasets.get_all() if d.name == "mixed").assets[0].data
    assert len(private) == 1


def test_ingesting_into_an_existing_dataset_name_changes_nothing(ingested_ibsi: tuple[LiveSite, dict]) -> None:
    site, _ = ingested_ibsi
    before = dataset_names(site)
    proc = site.setup("ingest", str(ibsi_dir() / "dicom" / "STS_001"), "--dataset", "ibsi-sts", check=False)
    assert proc.returncode == 1
    assert "already exists" in proc.stderr
    assert dataset_names(site) == before
