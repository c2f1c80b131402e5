"""Paired MR series: `--primary-series-description T1` makes T1 the case's image and the T2 series
of the same frame of reference its further image, from phantom DICOM through the real ingestion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from datasite_setup.cli import build_parser
from datasite_setup.ingest import PrimarySeries, primary_series, read_cases
from domains.mr_translation import phantom_records, write_phantom_site
from tests.test_ingest_accounting import assert_each_file_once

SECRET = b"test-secret-of-at-least-16-bytes"
SIZE = {"matrix": 32, "n_slices": 6}


def export(folder: Path, n_cases: int = 2) -> Path:
    write_phantom_site("hospital-b", folder, n_cases, seed=11, **SIZE)
    return folder


def report_of(folder: Path, **options: object) -> tuple[list[dict], dict]:
    result = read_cases(folder, None, SECRET, progress=False, **options)
    return result.cases, json.loads(json.dumps(result.to_report()))


def copy_as_new_series(source: Path, dest: Path, series_number: int, description: str | None = None) -> str:
    """The series in `source` written again to `dest` as another series of the same frame of reference."""
    series_uid = generate_uid()
    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = series_number
        if description is not None:
            ds.SeriesDescription = description
        ds.save_as(dest / path.name, enforce_file_format=True)
    return series_uid


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_t1_is_the_image_and_t2_joins_it_on_the_same_grid(tmp_path: Path) -> None:
    root = export(tmp_path / "export")
    cases, report = report_of(root, primary_series_description="t1 ")  # case and spaces ignored
    assert report["rejected"] == [] and report["ignored"] == [] and len(cases) == 2
    fate = assert_each_file_once(report, root)
    assert {outcome for outcome, _ in fate.values()} == {"accepted"}
    truth = phantom_records("hospital-b", 2, seed=11, **SIZE)
    for case, accepted in zip(cases, report["accepted"]):
        assert set(case["images"]) == {"T2"} and case["metadata"]["SeriesDescription"] == "T1"
        assert case["images"]["T2"].shape == case["image"].shape == case["mask"].shape
        [expected] = [r for r in truth if np.allclose(r["image"], case["image"], atol=2.0)]  # storage rounds (slope 1.6)
        np.testing.assert_allclose(case["images"]["T2"], expected["images"]["T2"], atol=2.0)
        assert np.array_equal(case["mask"], expected["mask"])
        assert accepted["images"]["T2"]["series_description"] == "T2"
        folders = {Path(f).parent.name for f in accepted["files"]}
        assert folders == {"T1", "T2", "mask"}


def test_a_bare_primary_series_passes_through_like_the_command_line(tmp_path: Path) -> None:
    root = export(tmp_path / "export", n_cases=1)
    args = build_parser().parse_args(["ingest", "site.toml", str(root), "--primary-modality", "MR",
                                      "--primary-series-description", "T1"])
    chosen = primary_series(args.primary_modality, args.primary_series_description)
    assert chosen == PrimarySeries("MR", "T1")
    cases, report = report_of(root, primary_modality=chosen)
    assert len(cases) == 1 and set(cases[0]["images"]) == {"T2"} and report["rejected"] == []
    assert primary_series(None, None) is None
    with pytest.raises(ValueError, match="--primary-series-description is empty"):
        primary_series("MR", "  ")
    assert report_of(root, primary_modality=PrimarySeries("CT", "T1"))[0] == []  # no CT series described T1


def test_two_t1_series_in_one_frame_are_rejected_naming_each_other(tmp_path: Path) -> None:
    root = export(tmp_path / "export")
    case_dir = sorted(root.iterdir())[0]
    original = series_uid(case_dir / "T1")
    copy = copy_as_new_series(case_dir / "T1", case_dir / "T1-again", series_number=7)
    cases, report = report_of(root, primary_series_description="T1")
    assert len(cases) == 1  # the other case is untouched
    fate = assert_each_file_once(report, root)
    ambiguous = [entry for entry in report["rejected"] if "a case has one primary image" in entry["reason"]]
    assert len(ambiguous) == 2 and len(report["rejected"]) == 2
    for entry in ambiguous:
        assert original in entry["reason"] and copy in entry["reason"] and "described 'T1'" in entry["reason"]
        assert "T1-again" in entry["reason"] and str(case_dir / "T1") in entry["reason"]
    t2 = fate[str(next((case_dir / "T2").iterdir()))]
    assert t2[0] == "ignored" and "was to join the case" in t2[1]["reason"]
    rtstruct = fate[str(case_dir / "mask" / "RS.dcm")]
    assert rtstruct[0] == "ignored"


def test_a_t2_without_a_t1_in_its_frame_is_ignored_with_the_reason(tmp_path: Path) -> None:
    root = export(tmp_path / "export")
    case_dir = sorted(root.iterdir())[0]
    shutil.rmtree(case_dir / "T1")
    cases, report = report_of(root, primary_series_description="T1")
    assert len(cases) == 1 and report["rejected"] == []
    fate = assert_each_file_once(report, root)
    outcome, entry = fate[str(next((case_dir / "T2").iterdir()))]
    assert outcome == "ignored" and "SeriesDescription 'T2'" in entry["reason"]
    assert "no series described 'T1' shares its frame of reference" in entry["reason"]


def test_further_images_are_named_by_description_in_series_order(tmp_path: Path) -> None:
    root = export(tmp_path / "export", n_cases=1)
    case_dir = next(root.iterdir())
    copy_as_new_series(case_dir / "T2", case_dir / "flair", series_number=2, description="AX T2 FLAIR")
    copy_as_new_series(case_dir / "T2", case_dir / "T2-repeat", series_number=9)
    [case], report = report_of(root, primary_series_description="T1")
    assert list(case["images"]) == ["AX_T2_FLAIR", "T2", "T2-2"]  # SeriesNumber 2, 4 (the phantom's), 9
    assert report["accepted"][0]["images"]["T2-2"]["folder"].endswith("T2-repeat")
    assert_each_file_once(report, root)
    from domains.mr_translation import DOMAIN

    with pytest.raises(ValueError, match=f"case {case['case_id']}: translation needs exactly one further image"):
        DOMAIN.training_samples([case])


def test_without_the_option_the_t2_series_is_a_case_that_lacks_a_mask(tmp_path: Path) -> None:
    root = export(tmp_path / "export", n_cases=1)
    cases, report = report_of(root)
    assert len(cases) == 1 and "images" not in cases[0]
    [rejected] = report["rejected"]
    assert rejected["path"].endswith("T2") and "no mask found" in rejected["reason"]


def test_paired_cases_round_trip_through_the_case_store_and_its_mock(tmp_path: Path) -> None:
    """What `datasite-setup ingest --primary-series-description T1 --domain mr_translation` stores
    and publishes, short of the syft upload: T2 stored beside T1, and mocks the domain trains on."""
    from datasite_setup.case_store import CaseSource
    from datasite_setup.credentials import pseudonym_key
    from datasite_setup.ingest import Ingestion
    from datasite_setup.site_config import load_site_config
    from datasite_setup.upload import store_cases
    from domains.case_manifest import mock_manifest
    from domains.mr_translation import DOMAIN
    from tests.conftest import free_port, write_site_config

    root = export(tmp_path / "export")
    config = load_site_config(write_site_config(tmp_path / "site", "hospital-b", free_port()))
    ingestion = Ingestion(root, None, pseudonym_key(config), progress=False, primary_modality=PrimarySeries(None, "T1"))
    stored = store_cases(config, ingestion, "paired")
    entries = stored.store.manifest(stored.version, collection="paired")
    assert stored.added == 2 and all(entry.images == ("T2",) for entry in entries)
    records = list(CaseSource(stored.store.root, entries))
    assert all(set(record["images"]) == {"T2"} for record in records)
    x, y = DOMAIN.training_samples(records)
    assert x.shape == y.shape and len(x) > 0
    mocks = DOMAIN.mock_cases(mock_manifest([entry.to_dict() for entry in entries]))
    assert [set(mock["images"]) for mock in mocks] == [{"T2"}, {"T2"}]
