"""Series reading: real multi-vendor MR against the data set's NIfTI, pydicom's own (compressed)
files, and synthetic stacks whose geometry is checked against SimpleITK's DICOM reader."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from datasite_setup.dicom_series import scan_folder

CASES = ("STS_001", "STS_002", "STS_003", "STS_004", "STS_005", "STS_016")


def ibsi_root() -> Path:
    base = Path(os.environ.get("MEDFED_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    root = base / "ibsi_sts_mr"
    if not (root / "dicom").is_dir() or not (root / "nifti").is_dir():
        pytest.skip(f"real IBSI MR data not found at {root}; set MEDFED_TEST_DATA to the folder holding ibsi_sts_mr/")
    return root


def write_stack(folder: Path, template: str = "MR_small.dcm", n: int = 3, step: float = 2.5,
                orientation: list[float] | None = None, names: list[str] | None = None) -> list[Path]:
    """n copies of a pydicom test file as one series, stepped along the slice normal."""
    source = pydicom.dcmread(get_testdata_file(template))
    orientation = orientation or [float(v) for v in source.ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    start = np.array([float(v) for v in source.ImagePositionPatient])
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in start + k * step * normal]
        ds.InstanceNumber = k + 1
        path = folder / (names[k] if names else f"slice{k:03d}.dcm")
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def real_scan():
    return scan_folder(ibsi_root() / "dicom", progress=False)


def test_real_series_all_accepted(real_scan):
    assert real_scan.rejected == [] and real_scan.ignored == []
    assert len(real_scan.series) == len(CASES)
    assert sorted(p.parent.parent.name for p in real_scan.rtstructs) == list(CASES)


@pytest.mark.parametrize("case", CASES)
def test_real_series_equals_reference_nifti(real_scan, case):
    series = next(s for s in real_scan.series if s.folder.parent.name == case)
    reference = sitk.ReadImage(str(ibsi_root() / "nifti" / case / "MR_T1_image.nii.gz"))
    assert series.volume.dtype == np.float32
    assert series.volume.shape == tuple(reference.GetSize()[::-1])
    assert np.allclose(series.spacing, reference.GetSpacing()[::-1], atol=1e-3)
    assert np.allclose(series.origin, reference.GetOrigin(), atol=1e-3)
    assert np.allclose(series.direction, reference.GetDirection(), atol=1e-3)
    assert np.array_equal(series.volume, sitk.GetArrayFromImage(reference))
    assert series.header.Modality == "MR" and "PixelData" not in series.header
    assert len(series.files) == series.volume.shape[0]


@pytest.mark.parametrize("template", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                      "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"])
def test_compressed_and_big_endian_decode_like_the_uncompressed_file(tmp_path, template):
    write_stack(tmp_path / "s", template=template)
    result = scan_folder(tmp_path, progress=False)
    assert result.rejected == []
    [series] = result.series
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    assert series.volume.shape == (3, 64, 64)
    for plane in series.volume:
        assert np.array_equal(plane, expected)


def test_rescale_slope_intercept_applied(tmp_path):
    write_stack(tmp_path / "ct", template="CT_small.dcm")
    [series] = scan_folder(tmp_path, progress=False).series
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert series.volume.dtype == np.float32
    assert np.array_equal(series.volume[1], expected.astype(np.float32))
    assert series.volume.min() < 0


def test_single_file_is_rejected_as_single_slice_series(tmp_path):
    """Decision: a lone slice is not a volume; CT_small.dcm alone is rejected with that reason."""
    target = tmp_path / "one" / "CT_small.dcm"
    target.parent.mkdir()
    target.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    result = scan_folder(tmp_path, progress=False)
    assert result.series == []
    [rejection] = result.rejected
    assert rejection.path == str(target) and rejection.files == (str(target),)
    assert "single-slice series" in rejection.reason and "CT_small.dcm" in rejection.reason


@pytest.mark.parametrize("name, expected", [
    ("SC_rgb_jpeg_dcmtk.dcm", "missing required tag(s) ImagePositionPatient"),
    ("JPEG2000.dcm", "missing required tag(s) ImagePositionPatient"),
])
def test_files_without_geometry_are_rejected(tmp_path, name, expected):
    target = tmp_path / name
    target.write_bytes(Path(get_testdata_file(name)).read_bytes())
    [rejection] = scan_folder(tmp_path, progress=False).rejected
    assert expected in rejection.reason and name in rejection.reason


def test_undecodable_pixel_data_rejects_the_series(tmp_path):
    """12-bit lossy JPEG: no installed decoder handles it; the reason names file and decoder error."""
    source = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    uid = generate_uid()
    for k in range(3):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0, 0, 2 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.save_as(tmp_path / f"nm{k}.dcm")
    result = scan_folder(tmp_path, progress=False)
    assert result.series == []
    [rejection] = result.rejected
    assert "nm0.dcm: truncated or unreadable Pixel Data (7FE0,0010)" in rejection.reason
    assert "the whole series (3 files" in rejection.reason
    assert rejection.files == tuple(str(tmp_path / f"nm{k}.dcm") for k in range(3))


def test_oblique_shuffled_series_matches_simpleitk(tmp_path):
    angle = np.deg2rad(30)
    orientation = [np.cos(angle), np.sin(angle), 0.0, 0.0, 0.0, -1.0]
    paths = write_stack(tmp_path / "obl", n=5, step=3.0, orientation=orientation,
                        names=["e.dcm", "b.dcm", "d.dcm", "a.dcm", "c.dcm"])
    [series] = scan_folder(tmp_path, progress=False).series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "obl")))
    reference = reader.Execute()
    assert series.volume.shape == tuple(reference.GetSize()[::-1])
    assert np.allclose(series.spacing, reference.GetSpacing()[::-1], atol=1e-3)
    assert np.allclose(series.origin, reference.GetOrigin(), atol=1e-3)
    assert np.allclose(series.direction, reference.GetDirection(), atol=1e-3)
    assert np.array_equal(series.volume, sitk.GetArrayFromImage(reference).astype(np.float32))
    assert series.files == paths


def test_non_image_objects_are_ignored_not_rejected(tmp_path):
    write_stack(tmp_path / "s")
    sr = pydicom.Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.save_as(tmp_path / "s" / "report.dcm", implicit_vr=True, little_endian=True, enforce_file_format=True)
    result = scan_folder(tmp_path, progress=False)
    assert len(result.series) == 1 and result.rejected == []
    [ignored] = result.ignored
    assert ignored.path.endswith("report.dcm") and "Basic Text SR Storage" in ignored.reason
    assert ignored.files == (ignored.path,)


def test_series_split_by_series_uid_in_one_folder(tmp_path):
    write_stack(tmp_path / "mixed", n=3, names=["a1.dcm", "a2.dcm", "a3.dcm"])
    write_stack(tmp_path / "mixed", template="CT_small.dcm", n=4, names=["b1.dcm", "b2.dcm", "b3.dcm", "b4.dcm"])
    result = scan_folder(tmp_path, progress=False)
    assert sorted(s.volume.shape for s in result.series) == [(3, 64, 64), (4, 128, 128)]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scan_folder(tmp_path / "nope")
