"""Every input file is accounted for exactly once in the ingestion report, and an unreadable file
rejects only a series it can be shown to belong to."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_files

from datasite_setup.ingest import read_cases
from tests.conftest import ibsi_dir
from tests.test_ingest_bad_input import N_SLICES, SECRET, write_mask, write_stack

OUTCOMES = ("accepted", "rejected", "ignored")


def entries_by_file(report: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Each file the report lists, with every (outcome, entry) that lists it."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for outcome in OUTCOMES:
        for entry in report[outcome]:
            for path in entry["files"]:
                found.setdefault(path, []).append((outcome, entry))
    return found


def files_under(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()}


def assert_each_file_once(report: dict[str, Any], folder: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    found = entries_by_file(report)
    assert set(found) == files_under(folder)
    assert {path: [o for o, _ in seen] for path, seen in found.items() if len(seen) != 1} == {}
    counts = {outcome: sum(1 for seen in found.values() if seen[0][0] == outcome) for outcome in OUTCOMES}
    assert report["summary"] == {"files": len(found), **counts, "cases": len(report["accepted"])}
    return {path: seen[0] for path, seen in found.items()}


def copy_pydicom_test_files(dest: Path) -> list[Path]:
    """pydicom's own test files (and pydicom-data's, when installed), keeping pydicom's sub-folders."""
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    copied = []
    for source in map(Path, get_testdata_files()):
        relative = source.relative_to(bundled) if source.is_relative_to(bundled) else Path("external") / source.name
        if not source.is_file() or any(part.startswith(".") for part in relative.parts):
            continue  # pydicom lists its folders too; hidden files are not read (see scan_folder)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_every_pydicom_test_file_is_accounted_for_exactly_once(tmp_path: Path) -> None:
    """All of pydicom's test files in one tree, a complete series among its loose files: each file
    is in exactly one entry, every rejection and omission says why, and the series is accepted."""
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    stack = write_stack(dicom, prefix="stack")
    write_mask(masks / f"{series_uid(stack[0])}.nii.gz")
    copied = copy_pydicom_test_files(dicom)
    assert len(copied) >= 150

    result = read_cases(dicom, masks, SECRET, progress=False)
    report = json.loads(json.dumps(result.to_report()))
    fate = assert_each_file_once(report, dicom)

    [accepted] = report["accepted"]
    assert accepted["files"] == [str(p) for p in stack] and accepted["case_id"] == result.cases[0]["case_id"]
    assert report["summary"]["accepted"] == N_SLICES and report["summary"]["cases"] == 1
    for outcome, entry in (fate[path] for path in fate if fate[path][0] != "accepted"):
        assert entry["reason"].strip()
        if outcome == "ignored":
            assert entry["files"] == [entry["path"]]
        else:
            named = [Path(f).name for f in entry["files"]] + [entry["path"]]
            assert any(name in entry["reason"] for name in named), entry

    def reason_of(relative: str) -> str:
        return fate[str(dicom / relative)][1]["reason"]

    assert reason_of("README.txt").startswith("README.txt: not a DICOM file")
    assert reason_of("zipMR.gz").startswith("zipMR.gz: not a DICOM file")
    # No preamble, no 'DICM' marker, no file meta: read as pydicom reads them with force=True.
    assert reason_of("ExplVR_BigEndNoMeta.dcm") == "RT Ion Plan Storage: not an image, RTSTRUCT or SEG; ignored"
    assert reason_of("ExplVR_LitEndNoMeta.dcm") == "RT Ion Plan Storage: not an image, RTSTRUCT or SEG; ignored"
    assert "no mask found for series" in reason_of("dicomdirtests/98892001/CT5N/2062")  # a sound 5-slice CT
    if (dicom / "external" / "OT-PAL-8-face.dcm").exists():  # pydicom-data: a valid file without preamble
        assert reason_of("external/OT-PAL-8-face.dcm").startswith(
            "OT-PAL-8-face.dcm: missing required tag(s) ImagePositionPatient (0020,0032)")


def test_complete_series_beside_unreadable_files_is_accepted_and_a_gap_is_rejected(tmp_path: Path) -> None:
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    complete = write_stack(dicom / "complete")
    (dicom / "complete" / "notes.dcm").write_text("exported by the PACS viewer")
    (dicom / "complete" / "noise.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (dicom / "complete" / "empty.dcm").write_bytes(b"")
    gap = write_stack(dicom / "gap")
    gap[2].write_bytes(np.random.default_rng(1).bytes(3000))  # a slice damaged beyond recognition
    for name in ("complete", "gap"):
        write_mask(masks / f"{name}.nii.gz")

    result = read_cases(dicom, masks, SECRET, progress=False)
    fate = assert_each_file_once(result.to_report(), dicom)

    [accepted] = result.accepted
    assert accepted["folder"] == str(dicom / "complete") and accepted["files"] == [str(p) for p in complete]
    for name in ("notes.dcm", "noise.bin", "empty.dcm"):
        outcome, entry = fate[str(dicom / "complete" / name)]
        assert outcome == "rejected" and entry["files"] == [entry["path"]]
        assert entry["reason"].startswith(f"{name}: not a DICOM file (no 'DICM' marker")
    outcome, entry = fate[str(gap[0])]
    assert outcome == "rejected" and entry["files"] == [str(p) for p in gap if p != gap[2]]
    assert entry["reason"].startswith(
        "missing slice(s): a gap of 5.000 mm between slice001.dcm and slice003.dcm where the median slice spacing "
        "is 2.500 mm (about 1 slice(s) missing); slice002.dcm beside it could not be read and may be the missing "
        "slice(s) (see their own entries); copy the complete series again from the PACS; the whole series (4 files")
    assert fate[str(gap[2])][1]["reason"].startswith("slice002.dcm: not a DICOM file")


def corrupt_after_series_uid(path: Path) -> None:
    """Insert, right after SeriesInstanceUID, a sequence whose item runs past the end of the file."""
    raw = path.read_bytes()
    at = raw.index(struct.pack("<HH", 0x0020, 0x000E) + b"UI")
    end = at + 8 + struct.unpack("<H", raw[at + 6:at + 8])[0]
    broken = (struct.pack("<HH", 0x0020, 0x000F) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
              + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH", 0x0008, 0x0016) + b"UI"
              + struct.pack("<H", 0xFFF0))
    path.write_bytes(raw[:end] + broken + raw[end:])


def test_unreadable_file_whose_header_names_a_series_rejects_only_that_series(tmp_path: Path) -> None:
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    sound = write_stack(dicom / "mixed", prefix="a")
    broken = write_stack(dicom / "mixed", prefix="b")
    corrupt_after_series_uid(broken[2])
    with pytest.raises(OSError, match="No tag to read"):  # pydicom cannot read it whole
        pydicom.dcmread(broken[2])
    for stack in (sound, broken):
        write_mask(masks / f"{series_uid(stack[0])}.nii.gz")

    result = read_cases(dicom, masks, SECRET, progress=False)
    fate = assert_each_file_once(result.to_report(), dicom)

    [accepted] = result.accepted
    assert accepted["files"] == [str(p) for p in sound]
    [rejection] = result.rejected
    assert rejection["path"] == str(broken[2]) and sorted(rejection["files"]) == [str(p) for p in broken]
    assert rejection["reason"].startswith("b002.dcm: unreadable DICOM file (")
    assert (f"its header names series {series_uid(broken[0])} (SeriesInstanceUID (0020,000E)), so the series lacks "
            "that slice; the whole series (5 files in") in rejection["reason"]
    assert fate[str(broken[0])][1] == rejection


@pytest.mark.parametrize("with_file_meta", [True, False], ids=["file-meta", "bare-dataset"])
def test_files_without_preamble_are_read(tmp_path: Path, with_file_meta: bool) -> None:
    """As older software writes them: no 128-byte preamble and no 'DICM' marker (and maybe no file meta)."""
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    reference = write_stack(tmp_path / "reference")
    write_mask(masks / "reference.nii.gz")
    (dicom / "reference").mkdir(parents=True)
    for path in reference:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        encoding = {}
        if not with_file_meta:
            del ds.file_meta
            encoding = {"implicit_vr": True, "little_endian": True}
        ds.save_as(dicom / "reference" / path.name, enforce_file_format=False, **encoding)
        assert (dicom / "reference" / path.name).read_bytes()[128:132] != b"DICM"
        with pytest.raises(pydicom.errors.InvalidDicomError):
            pydicom.dcmread(dicom / "reference" / path.name)

    expected = read_cases(tmp_path / "reference", masks, SECRET, progress=False)
    result = read_cases(dicom, masks, SECRET, progress=False)
    assert result.rejected == [] and result.ignored == []
    [case], [original] = result.cases, expected.cases
    assert np.array_equal(case["image"], original["image"]) and case["spacing"] == original["spacing"]
    assert result.accepted[0]["files"] == [str(dicom / "reference" / p.name) for p in reference]


def test_mask_objects_in_the_tree_are_accounted_for(tmp_path: Path) -> None:
    """A real structure set is listed with its case when used, and as ignored when --masks wins."""
    real = ibsi_dir()
    shutil.copytree(real / "dicom" / "STS_002", tmp_path / "STS_002")
    rtstruct = str(tmp_path / "STS_002" / "mask" / "RS.dcm")

    from_tree = read_cases(tmp_path, None, SECRET, progress=False).to_report()
    assert_each_file_once(from_tree, tmp_path)
    [accepted] = from_tree["accepted"]
    assert accepted["mask"] == rtstruct and accepted["files"][-1] == rtstruct and len(accepted["files"]) == 36

    masks = tmp_path.parent / f"{tmp_path.name}-masks"
    masks.mkdir()
    (masks / "STS_002.nii.gz").symlink_to(real / "nifti" / "STS_002" / "MR_T1_mask.nii.gz")
    from_masks = read_cases(tmp_path, masks, SECRET, progress=False).to_report()
    fate = assert_each_file_once(from_masks, tmp_path)
    assert from_masks["summary"] == {"files": 36, "accepted": 35, "rejected": 0, "ignored": 1, "cases": 1}
    outcome, entry = fate[rtstruct]
    uid = series_uid(Path(accepted["files"][0]))
    assert outcome == "ignored" and entry["reason"].startswith(
        f"RTSTRUCT not used: series {uid} took its mask from {masks / 'STS_002.nii.gz'}")
