"""`datasite-setup ingest` end to end: real DICOM in, private asset + mock on a live datasite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from datasite_setup.case_store import STORE_DIR, CaseSource, CaseStore, cases_of_manifest
from domains import get_domain
from domains.case_manifest import read_manifest
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
    document = read_manifest(private)
    assert "cases" not in document  # the entries stay in the site's database
    manifest = [{"case_id": e.case_id, **e.to_dict()} for e in cases_of_manifest(site.config.data_dir / STORE_DIR, private)[0].entries]
    ds = site.ds_client()
    asset = next(d for d in ds.datasets.get_all() if d.name == "ibsi-sts").assets[0]
    mock = read_manifest(asset.mock)["cases"]
    assert document["version"] == report["manifest_version"] and document["collection"] == "ibsi-sts"
    assert asset.data is None or "SyftError" in type(asset.data).__name__
    assert report["manifest_version"] >= 1

    assert len(manifest) == len(mock) == 6
    assert all("image" not in entry and "image" not in fake for entry, fake in zip(manifest, mock))  # no pixel in the asset
    private = CaseSource(site.config.data_dir / "case_store", manifest)
    rendered = get_domain("brain_mr_segmentation").mock_cases(mock)
    vendors = {c["metadata"]["Manufacturer"].split(" / ")[0] for c in private}  # e.g. "SIEMENS / MIM Software"
    assert vendors == {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    for real, entry, fake, synthetic in zip(private, manifest, mock, rendered):
        assert real["image"].shape == synthetic["image"].shape == real["mask"].shape == tuple(fake["shape"])
        assert real["spacing"] == fake["spacing"] == list(entry["spacing"])
        assert set(real["metadata"]) == set(fake["metadata"])
        assert entry["split"] in ("train", "validation", "test") and fake["split"] == entry["split"]
        assert real["mask"].sum() > 0
        assert not np.array_equal(real["image"], synthetic["image"])
        assert not real["case_id"].startswith("STS")
        assert fake["case_id"].startswith("mock-") and fake["patient"].startswith("mock-")
    text = repr([c["metadata"] for c in private]) + repr(mock)
    assert "STS_0" not in text and "IBSI" not in text
    assert not any(entry["content_hash"] in repr(mock) for entry in manifest)


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
    assert len(cases_of_manifest(site.config.data_dir / STORE_DIR, private)[0]) == 1


def test_reingesting_series_already_stored_changes_nothing(ingested_ibsi: tuple[LiveSite, dict]) -> None:
    site, first = ingested_ibsi
    before = dataset_names(site)
    proc = site.setup("ingest", str(ibsi_dir() / "dicom" / "STS_001"), "--dataset", "ibsi-sts", "--json")
    report = json.loads(proc.stdout)
    assert report["added"] == 0 and len(report["accepted"]) == 1
    assert report["dataset"] == "ibsi-sts" and report["manifest_version"] == first["manifest_version"]
    assert dataset_names(site) == before


def test_a_later_ingestion_adds_cases_in_a_new_manifest_version(ingested_ibsi: tuple[LiveSite, dict], tmp_path: Path) -> None:
    """The site grows: the dataset keeps its name, serves a new manifest version, old splits stay."""
    from analyses.site_requests import call_site_task, request_site_task
    from datasite_setup import review

    site, _ = ingested_ibsi
    early = tmp_path / "early"
    for study in ("STS_001", "STS_002"):
        shutil.copytree(ibsi_dir() / "dicom" / study, early / study)
    v1 = json.loads(site.setup("ingest", str(early), "--dataset", "growing", "--json").stdout)
    ds = site.ds_client()
    approved_on_v1 = next(d for d in ds.datasets.get_all() if d.name == "growing").assets[0]
    request_site_task(ds, approved_on_v1, "intensity_landmarks", "growing-v1", max_runs=1)
    admin = site.admin_client()
    review.approve(site.config, admin, next(r.id for r in review.list_requests(site.config, admin, status="pending")
                                            if r.function == "intensity_landmarks_growing_v1"))

    v2 = json.loads(site.setup("ingest", str(ibsi_dir() / "dicom"), "--dataset", "growing", "--json").stdout)
    assert (v1["added"], v2["added"]) == (2, 4)
    assert v2["manifest_version"] > v1["manifest_version"]
    assert dataset_names(site).count("growing") == 1
    private = next(d for d in site.admin_client().datasets.get_all() if d.name == "growing").assets[0].data
    manifest = [e.to_dict() for e in cases_of_manifest(site.config.data_dir / STORE_DIR, private)[0].entries]
    assert len(manifest) == 6
    store = CaseStore(site.config.data_dir)
    old = {e.case_id: e.split for e in store.manifest(v1["manifest_version"], collection="growing")}
    assert len(old) == 2 and all(e["split"] == old[e["case_id"]] for e in manifest if e["case_id"] in old)
    assert sorted(e["added_in"] for e in manifest) == [v1["manifest_version"]] * 2 + [v2["manifest_version"]] * 4
    assert len(read_manifest(next(d for d in site.ds_client().datasets.get_all() if d.name == "growing").assets[0].mock)["cases"]) == 6

    # The request approved on the first version still runs, on the cases it was approved with.
    landmarks = call_site_task(ds, approved_on_v1, "intensity_landmarks", "growing-v1", {})
    assert landmarks["n"] == 2
    ran = [json.loads(line) for line in (site.config.data_dir / "audit.log").read_text().splitlines()]
    assert [e for e in ran if e.get("action") == "ran"][-1]["manifest_version"] == v1["manifest_version"]


def test_a_manifest_passed_as_her_own_input_reads_no_case(ingested_ibsi: tuple[LiveSite, dict]) -> None:
    """Attack: the dataset's description names its collection and manifest version, so a data
    scientist can write the private asset's reference (or a document listing its case ids) herself
    and pass it as her own `cases` input. syft runs code on inputs she owns, without any approval,
    once an admin allows her "mock execution" (to try code on her own data), and the site would
    then read the cases the manifest names. The site reads cases only from its own assets: each run
    is refused, uniformly, with the reason in the audit log, and nothing runs."""
    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    from analyses.site_requests import function_name, thin_function
    from domains.case_manifest import manifest_document, manifest_reference
    from tests.conftest import DS_EMAIL, audit_entry

    site, report = ingested_ibsi
    ds = site.ds_client()
    code = sy.syft_function(input_policy=sy.MixedInputPolicy(cases=str, params=dict, client=ds),
                            output_policy=OutputPolicyExecuteCount(limit=2))(thin_function("cohort_summary", "own_manifest"))
    ds.code.request_code_execution(code)  # never approved
    name = function_name("cohort_summary", "own_manifest")
    entries = [e.to_dict() for e in CaseStore(site.config.data_dir).manifest(report["manifest_version"], collection="ibsi-sts")]

    def runs() -> int:
        log = site.config.data_dir / "audit.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return sum(json.loads(line).get("action") == "ran" for line in lines)

    user = next(u for u in site.admin_client().users.get_all() if u.email == DS_EMAIL)
    user.allow_mock_execution(True)
    try:
        ran_before = runs()
        for forged in (manifest_reference("ibsi-sts", report["manifest_version"]),
                       manifest_document(entries, "ibsi-sts", report["manifest_version"])):
            with pytest.raises(Exception) as refused:
                result = getattr(site.ds_client().code, name)(cases=forged, params={"group_by": "Manufacturer"})
                if isinstance(result, sy.SyftError):
                    raise RuntimeError(result.message)
                result.get()
            message = str(refused.value)
            assert "did not complete at the site" in message and "lesion" not in message
            assert "not a dataset of this site" in audit_entry(site, message)["why"]
        assert runs() == ran_before
    finally:
        user.allow_mock_execution(False)
