"""De-identification: no original identifier survives into the case records, and pseudonyms are
stable under one site secret and different under another."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from datasite_setup.deidentify import acquisition_metadata, case_id, pseudonymize_uid
from datasite_setup.ingest import read_cases

SECRET = b"site-a-secret-of-at-least-16-bytes"
OTHER_SECRET = b"site-b-secret-of-at-least-16-bytes"
PHI = {
    "PatientName": "DOE^JOHN^QUINCY",
    "PatientID": "PID-778899",
    "OtherPatientIDs": "OPID-4411",
    "PatientBirthDate": "19310312",
    "PatientAddress": "12 Elm Street, Springfield",
    "InstitutionName": "Saint Example Hospital",
    "InstitutionAddress": "1 Hospital Road",
    "AccessionNumber": "ACC55512",
    "StudyID": "ST7788",
    "StudyDate": "20230115",
    "SeriesDate": "20230115",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "OperatorsName": "SMITH^ANNA",
    "SeriesDescription": "T1 AX Doe John PID-778899 2023-01-15",
    "PatientAge": "092Y",
    "PatientSex": "M",
    "ContrastBolusAgent": "Gadovist",
}
PHI_STRINGS = ["DOE", "JOHN", "QUINCY", "PID-778899", "OPID-4411", "19310312", "Elm Street", "Saint Example",
               "Hospital Road", "ACC55512", "ST7788", "20230115", "2023-01-15", "HOUSE", "GREGORY", "SMITH", "ANNA"]


def ibsi_root() -> Path:
    base = Path(os.environ.get("MEDFED_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    root = base / "ibsi_sts_mr"
    if not (root / "dicom").is_dir():
        pytest.skip(f"real IBSI MR data not found at {root}; set MEDFED_TEST_DATA to the folder holding ibsi_sts_mr/")
    return root


def write_phi_case(root: Path) -> list[str]:
    """A 3-slice MR series full of identifiers, with a mask in root/masks; returns its original UIDs."""
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword, value in PHI.items():
        setattr(source, keyword, value)
    source.StudyInstanceUID, source.SeriesInstanceUID, source.FrameOfReferenceUID = (generate_uid() for _ in range(3))
    uids = [source.StudyInstanceUID, source.SeriesInstanceUID, source.FrameOfReferenceUID]
    folder = root / "dicom" / "case1"
    folder.mkdir(parents=True)
    for k in range(3):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        uids.append(ds.SOPInstanceUID)
        x, y, z = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.0 * k]
        ds.save_as(folder / f"{k}.dcm")
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[1, 20:30, 20:30] = 1
    image = sitk.GetImageFromArray(mask)
    image.SetSpacing((0.3125, 0.3125, 2.0))
    image.SetOrigin(tuple(float(v) for v in source.ImagePositionPatient))
    (root / "masks").mkdir()
    sitk.WriteImage(image, str(root / "masks" / "case1.nii.gz"))
    return uids


def assert_plain(value: object) -> None:
    """Only what PySyft serialises without custom types: str, int, float, bool, lists and dicts of them."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
    else:
        assert type(value) in (str, int, float, bool), f"{value!r} is a {type(value).__name__}"


@pytest.fixture
def phi_case(tmp_path):
    uids = write_phi_case(tmp_path)
    return tmp_path, uids


def test_no_original_identifier_in_the_records(phi_case):
    root, uids = phi_case
    result = read_cases(root / "dicom", root / "masks", SECRET, progress=False)
    [record] = result.cases
    text = repr(result.cases)
    for secret_value in PHI_STRINGS + uids:
        assert not re.search(re.escape(secret_value), text, re.IGNORECASE), f"{secret_value!r} leaked"
    metadata = record["metadata"]
    assert_plain({k: v for k, v in record.items() if k not in ("image", "mask")})
    assert metadata["SeriesDescription"] == "T1 AX [removed] [removed] [removed] [removed]"
    assert metadata["PatientAge"] == ">=90Y" and metadata["PatientSex"] == "M"
    assert metadata["ContrastBolusAgentPresent"] is True
    assert "Gadovist" not in text
    assert re.fullmatch(r"case-[0-9a-f]{10}", record["case_id"])
    assert all(metadata[k].startswith("2.25.") for k in ("study_uid", "series_uid", "frame_of_reference_uid"))


def test_pseudonyms_stable_per_secret_and_different_across_secrets(phi_case):
    root, _ = phi_case
    first = read_cases(root / "dicom", root / "masks", SECRET, progress=False).cases[0]
    again = read_cases(root / "dicom", root / "masks", SECRET, progress=False).cases[0]
    other = read_cases(root / "dicom", root / "masks", OTHER_SECRET, progress=False).cases[0]
    keys = ("study_uid", "series_uid", "frame_of_reference_uid")
    assert first["case_id"] == again["case_id"]
    assert [first["metadata"][k] for k in keys] == [again["metadata"][k] for k in keys]
    assert first["case_id"] != other["case_id"]
    assert all(first["metadata"][k] != other["metadata"][k] for k in keys)


def test_uid_pseudonym_is_a_valid_stable_uid():
    uid = "1.3.6.1.4.1.14519.5.2.1.5168.1900.251522783846522173126679797698"
    pseudonym = pseudonymize_uid(uid, SECRET)
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", pseudonym) and len(pseudonym) <= 64
    assert pseudonymize_uid(uid, SECRET) == pseudonym
    assert pseudonymize_uid(uid + "1", SECRET) != pseudonym
    assert pseudonymize_uid(uid, OTHER_SECRET) != pseudonym


def test_case_id_needs_a_real_secret():
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        case_id(pydicom.Dataset(), b"")


def test_metadata_keeps_acquisition_parameters_only():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    metadata = acquisition_metadata(ds)
    assert_plain(metadata)
    assert metadata["Modality"] == "CT" and metadata["KVP"] == 120.0 and metadata["ConvolutionKernel"] == "STANDARD"
    assert metadata["PixelSpacing"] == [0.661468, 0.661468]
    for keyword in ("PatientName", "PatientID", "StudyDate", "InstitutionName", "AccessionNumber",
                    "StudyInstanceUID", "SeriesInstanceUID"):
        assert keyword not in metadata
    assert "JFK" not in repr(metadata) and "CompressedSamples" not in repr(metadata)


def test_real_cases_carry_no_original_identifiers():
    root = ibsi_root()
    result = read_cases(root / "dicom", None, SECRET, progress=False)
    assert len(result.cases) == 6 and len({c["case_id"] for c in result.cases}) == 6
    text = repr(result.cases)
    identifiers = set()
    for folder in sorted((root / "dicom").iterdir()):
        ds = pydicom.dcmread(next((folder / "image").iterdir()), stop_before_pixels=True)
        identifiers |= {str(ds.PatientID), str(ds.PatientName), str(ds.AccessionNumber), str(ds.StudyInstanceUID),
                        str(ds.SeriesInstanceUID), str(ds.FrameOfReferenceUID), str(ds.SOPInstanceUID)}
    for value in identifiers:
        assert value not in text, f"{value!r} leaked"
    vendors = {c["metadata"]["Manufacturer"].split(" /")[0] for c in result.cases}
    assert vendors == {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    for record in result.cases:
        assert_plain({k: v for k, v in record.items() if k not in ("image", "mask")})
