"""Bad input through `read_cases`: every defect gives a reason naming the file, nothing of the
defective series reaches the cases (every one of its files is listed as rejected), while a sound
series beside it is still accepted."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from datasite_setup.ingest import read_cases

SECRET = b"test-secret-of-at-least-16-bytes"
STEP = 2.5
N_SLICES = 5
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def write_stack(folder: Path, n: int = N_SLICES, prefix: str = "slice") -> list[Path]:
    """n copies of pydicom's MR_small.dcm (64x64, axial) as one series, STEP mm apart."""
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    start = np.array([float(v) for v in source.ImagePositionPatient])
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [f"{v:.4f}" for v in start + [0.0, 0.0, k * STEP]]
        paths.append(folder / f"{prefix}{k:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def write_mask(path: Path, values: np.ndarray | None = None, shift_mm: float = 0.0) -> np.ndarray:
    """A NIfTI mask on the grid `write_stack` makes (optionally shifted, or with other values)."""
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    if values is None:
        values = np.zeros((N_SLICES, 64, 64), np.uint8)
        values[1:4, 20:40, 10:30] = 1
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.3125, 0.3125, STEP))
    image.SetOrigin(tuple(float(v) + shift_mm for v in source.ImagePositionPatient))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return values


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """dicom/good + masks/good.nii.gz (always accepted) and dicom/bad + masks/bad.nii.gz."""
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    write_stack(dicom / "good")
    write_mask(masks / "good.nii.gz")
    write_stack(dicom / "bad")
    write_mask(masks / "bad.nii.gz")
    return {"dicom": dicom, "masks": masks, "bad": dicom / "bad", "good": dicom / "good"}


def truncated_pixel_data(t: dict[str, Path]) -> None:
    path = t["bad"] / "slice002.dcm"
    path.write_bytes(path.read_bytes()[:-1000])


def truncated_header(t: dict[str, Path]) -> None:
    path = t["bad"] / "slice002.dcm"
    path.write_bytes(path.read_bytes()[:700])


def missing_slice(t: dict[str, Path]) -> None:
    (t["bad"] / "slice002.dcm").unlink()


def duplicated_slice(t: dict[str, Path]) -> None:
    (t["bad"] / "slice002_copy.dcm").write_bytes((t["bad"] / "slice002.dcm").read_bytes())


def edit(name: str, change: Callable[[Dataset], None]) -> Callable[[dict[str, Path]], None]:
    def apply(t: dict[str, Path]) -> None:
        ds = pydicom.dcmread(t["bad"] / name)
        change(ds)
        ds.save_as(t["bad"] / name)
    return apply


def set_attr(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def malformed(keyword: str, placeholder: str, garbage: bytes) -> Callable[[dict[str, Path]], None]:
    """Write `keyword` as `placeholder`, then overwrite its bytes with `garbage` (pydicom refuses to write it)."""
    def apply(t: dict[str, Path]) -> None:
        path = t["bad"] / "slice002.dcm"
        edit("slice002.dcm", set_attr(keyword, placeholder))(t)
        raw = path.read_bytes()
        assert raw.count(placeholder.encode()) == 1 and len(garbage) == len(placeholder)
        path.write_bytes(raw.replace(placeholder.encode(), garbage))
    return apply


def shifted_z(ds: Dataset) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.7]


def tilted(ds: Dataset) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x + 1.0, y, z]


def misfit_mask(t: dict[str, Path]) -> None:
    write_mask(t["masks"] / "bad.nii.gz", shift_mm=5.0)


def wrong_size_mask(t: dict[str, Path]) -> None:
    write_mask(t["masks"] / "bad.nii.gz", values=np.ones((N_SLICES - 1, 64, 64), np.uint8))


def label_map_mask(t: dict[str, Path]) -> None:
    values = np.zeros((N_SLICES, 64, 64), np.uint8)
    values[1, :5, :5], values[2, :5, :5] = 1, 2
    write_mask(t["masks"] / "bad.nii.gz", values=values)


def no_mask(t: dict[str, Path]) -> None:
    (t["masks"] / "bad.nii.gz").unlink()


def two_masks(t: dict[str, Path]) -> None:
    write_mask(t["masks"] / "bad.nrrd")


BAD_INPUTS = [
    pytest.param(truncated_pixel_data, "slice002.dcm",
                 "slice002.dcm: truncated or unreadable Pixel Data (7FE0,0010)", id="truncated-pixel-data"),
    pytest.param(truncated_header, "slice002.dcm", "slice002.dcm: missing required tag", id="truncated-header"),
    pytest.param(missing_slice, "slice003.dcm",
                 "missing slice(s): a gap of 5.000 mm between slice001.dcm and slice003.dcm where the median "
                 "slice spacing is 2.500 mm (about 1 slice(s) missing)", id="missing-slice"),
    pytest.param(duplicated_slice, "slice002", "duplicated slice position: slice002.dcm and slice002_copy.dcm",
                 id="duplicated-slice"),
    pytest.param(edit("slice003.dcm", set_attr("PixelSpacing", [0.5, 0.5])), "slice003.dcm",
                 "mixed PixelSpacing (0028,0030) within the series: slice000.dcm has [0.3125, 0.3125] but "
                 "slice003.dcm has [0.5, 0.5]", id="mixed-pixel-spacing"),
    pytest.param(edit("slice003.dcm", set_attr("Rows", 32)), "slice003.dcm",
                 "mixed Rows (0028,0010) within the series", id="mixed-rows"),
    pytest.param(edit("slice003.dcm", shifted_z), "slice003.dcm", "inconsistent slice spacing",
                 id="inconsistent-slice-spacing"),
    pytest.param(edit("slice003.dcm", tilted), "slice003.dcm", "gantry tilt or sheared stack", id="tilted-stack"),
    pytest.param(edit("slice002.dcm", lambda ds: delattr(ds, "ImagePositionPatient")), "slice002.dcm",
                 "slice002.dcm: missing required tag(s) ImagePositionPatient (0020,0032)", id="missing-tag"),
    pytest.param(edit("slice002.dcm", set_attr("SamplesPerPixel", 3)), "slice002.dcm", "colour image",
                 id="colour-slice"),
    pytest.param(edit("slice002.dcm", set_attr("PhotometricInterpretation", "PALETTE COLOR")), "slice002.dcm",
                 "slice002.dcm: colour image (PhotometricInterpretation (0028,0004) = PALETTE COLOR)",
                 id="palette-colour-slice"),
    pytest.param(malformed("NumberOfFrames", "98765432", b"abcdefgh"), "slice002.dcm",
                 "slice002.dcm: malformed header value (ValueError", id="malformed-number-of-frames"),
    pytest.param(malformed("RescaleSlope", "9.876543", b"abcdefgh"), "slice002.dcm",
                 "slice002.dcm: malformed RescaleSlope (0028,1053) or RescaleIntercept (0028,1052)",
                 id="malformed-rescale-slope"),
    pytest.param(misfit_mask, "bad.nii.gz",
                 "the mask's grid does not match the image series' (origin differs): mask size 64x64x5, spacing "
                 "0.3125x0.3125x2.5000 mm, origin (-78.906", id="mask-shifted"),
    pytest.param(wrong_size_mask, "bad.nii.gz", "(size differs): mask size 64x64x4", id="mask-wrong-size"),
    pytest.param(label_map_mask, "bad.nii.gz", "a label map with values 0, 1, 2 is not supported",
                 id="mask-label-map"),
    pytest.param(no_mask, "bad", "no mask found for series (folder {bad}): put an RTSTRUCT referencing series UID",
                 id="no-mask"),
    pytest.param(two_masks, "masks", "several mask files are named 'bad' (bad.nii.gz, bad.nrrd); keep one",
                 id="two-masks-one-name"),
]


@pytest.mark.parametrize("damage, named, reason", BAD_INPUTS)
def test_bad_input_is_rejected_with_its_reason_and_nothing_kept(tree, damage, named, reason):
    damage(tree)
    result = read_cases(tree["dicom"], tree["masks"], SECRET, progress=False)

    assert [a["folder"] for a in result.accepted] == [str(tree["good"])]
    assert len(result.cases) == 1 and result.cases[0]["image"].shape == (N_SLICES, 64, 64)
    reasons = [r["reason"] for r in result.rejected]
    expected = reason.format(bad=tree["bad"])
    hits = [r for r in result.rejected if expected in r["reason"]]
    assert hits, f"no rejection says {expected!r}; got {reasons}"
    assert any(named in r["path"] or named in r["reason"] for r in hits)
    report = json.loads(json.dumps(result.to_report()))
    listed = [f for outcome in ("accepted", "rejected", "ignored") for entry in report[outcome] for f in entry["files"]]
    assert sorted(listed) == sorted(str(p) for p in tree["dicom"].rglob("*") if p.is_file())
    rejected = {f for entry in report["rejected"] for f in entry["files"]}
    assert {str(p) for p in tree["bad"].iterdir()} <= rejected


def test_non_dicom_file_beside_a_complete_series_rejects_only_itself(tree):
    """Decision: a file that names no series does not reject the series in its folder."""
    (tree["bad"] / "notes.dcm").write_text("exported by the PACS viewer")
    result = read_cases(tree["dicom"], tree["masks"], SECRET, progress=False)
    assert sorted(a["folder"] for a in result.accepted) == [str(tree["bad"]), str(tree["good"])]
    [rejection] = result.rejected
    assert rejection["path"] == str(tree["bad"] / "notes.dcm") and rejection["files"] == [rejection["path"]]
    assert rejection["reason"].startswith("notes.dcm: not a DICOM file (no 'DICM' marker after the 128-byte "
                                          "preamble, and no DICOM data set at its start either); move it out")


def test_no_mask_reason_names_the_possible_mask_files(tree):
    no_mask(tree)
    result = read_cases(tree["dicom"], tree["masks"], SECRET, progress=False)
    [rejection] = result.rejected
    assert rejection["path"] == str(tree["bad"])
    assert rejection["files"] == [str(p) for p in sorted(tree["bad"].iterdir())]
    assert "or bad.nii.gz or 4MR1.nii.gz in --masks" in rejection["reason"]


def write_seg(path: Path, series_folder: Path, n_segments: int = 1) -> np.ndarray:
    """A binary DICOM SEG on the series' slices 1 and 3 (the other frames omitted, as SEGs do)."""
    slices = sorted(series_folder.glob("slice*.dcm"))
    image = pydicom.dcmread(slices[0], stop_before_pixels=True)
    frames = np.zeros((2, 64, 64), np.uint8)
    frames[0, 10:20, 5:25] = 1
    frames[1, 30:40, 40:50] = 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SEG_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = image.FrameOfReferenceUID
    referenced = Dataset()
    referenced.SeriesInstanceUID = image.SeriesInstanceUID
    ds.ReferencedSeriesSequence = Sequence([referenced])
    ds.SegmentationType = "BINARY"
    segments = []
    for number in range(1, n_segments + 1):
        segment = Dataset()
        segment.SegmentNumber = number
        segment.SegmentLabel = f"lesion {number}"
        segments.append(segment)
    ds.SegmentSequence = Sequence(segments)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 64, 64, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    plane = Dataset()
    plane.ImageOrientationPatient = image.ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = image.PixelSpacing
    measures.SliceThickness = STEP
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in (1, 3):
        position = Dataset()
        position.ImagePositionPatient = pydicom.dcmread(slices[k], stop_before_pixels=True).ImagePositionPatient
        group = Dataset()
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = pack_bits(frames.ravel())
    ds.save_as(path, enforce_file_format=True)
    expected = np.zeros((N_SLICES, 64, 64), np.uint8)
    expected[1], expected[3] = frames
    return expected


def test_binary_seg_in_the_tree_is_read_onto_the_series(tmp_path):
    write_stack(tmp_path / "dicom" / "p1")
    expected = write_seg(tmp_path / "dicom" / "seg.dcm", tmp_path / "dicom" / "p1")
    result = read_cases(tmp_path / "dicom", None, SECRET, progress=False)
    assert result.rejected == [] and result.ignored == []
    [record] = result.cases
    assert np.array_equal(record["mask"], expected)
    [accepted] = result.accepted
    assert accepted["files"][-1] == str(tmp_path / "dicom" / "seg.dcm") and len(accepted["files"]) == N_SLICES + 1


def test_seg_with_several_segments_is_not_supported(tmp_path):
    write_stack(tmp_path / "dicom" / "p1")
    write_seg(tmp_path / "dicom" / "seg.dcm", tmp_path / "dicom" / "p1", n_segments=2)
    result = read_cases(tmp_path / "dicom", None, SECRET, progress=False)
    assert result.cases == []
    [rejection] = result.rejected
    assert "seg.dcm: DICOM SEG with 2 segments is not supported" in rejection["reason"]
    assert len(rejection["files"]) == N_SLICES + 1 and rejection["files"][-1] == str(tmp_path / "dicom" / "seg.dcm")


def test_short_secret_and_missing_masks_folder_are_refused(tree):
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        read_cases(tree["dicom"], tree["masks"], b"short")
    with pytest.raises(NotADirectoryError, match="--masks folder does not exist"):
        read_cases(tree["dicom"], tree["dicom"] / "nope", SECRET)
