"""RTSTRUCT rasterisation: real contours against the data set's reference masks, and synthetic
structure sets for holes, ROI choice, oblique grids and contours that do not fit the series."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from datasite_setup.dicom_series import DicomSeries, Geometry, scan_folder
from datasite_setup.ingest import read_cases
from datasite_setup.rtstruct import RTStructError, rasterize_roi, read_rtstruct, referenced_series_uids

CASES = ("STS_001", "STS_002", "STS_003", "STS_004", "STS_005", "STS_016")
SECRET = b"test-secret-of-at-least-16-bytes"


def ibsi_root() -> Path:
    base = Path(os.environ.get("MEDFED_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    root = base / "ibsi_sts_mr"
    if not (root / "dicom").is_dir() or not (root / "nifti").is_dir():
        pytest.skip(f"real IBSI MR data not found at {root}; set MEDFED_TEST_DATA to the folder holding ibsi_sts_mr/")
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def grid_series(shape=(5, 8, 10), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), frame_uid="1.2.3.4") -> DicomSeries:
    header = Dataset()
    header.FrameOfReferenceUID = frame_uid
    geometry = Geometry(shape, spacing, origin, tuple(float(v) for v in direction))
    return DicomSeries("1.2.3.5", np.zeros(shape, np.float32), geometry, [Path("/x/s.dcm")], header)


def voxel_polygon(series: DicomSeries, k: float, corners_ij: list[tuple[float, float]]) -> np.ndarray:
    """Patient coordinates of a polygon given in (x index, y index) on slice k."""
    affine = series.geometry.voxel_to_patient()
    return np.array([(affine @ [i, j, k, 1.0])[:3] for i, j in corners_ij])


def box(i0: float, i1: float, j0: float, j1: float) -> list[tuple[float, float]]:
    return [(i0, j0), (i1, j0), (i1, j1), (i0, j1)]


def structure_set(rois: dict[str, list[np.ndarray]], series_uid="1.2.3.5", frame_uid="1.2.3.4") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.Modality = "RTSTRUCT"
    series_item = Dataset()
    series_item.SeriesInstanceUID = series_uid
    study_item = Dataset()
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame_uid
    frame_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_item])
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = frame_uid
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence()
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.6f}" for v in np.asarray(points).ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    return ds


@pytest.fixture(scope="module")
def real_scan():
    return scan_folder(ibsi_root() / "dicom", progress=False)


@pytest.mark.parametrize("case", CASES)
def test_real_rtstruct_matches_reference_mask(real_scan, case):
    series = next(s for s in real_scan.series if s.folder.parent.name == case)
    path = ibsi_root() / "dicom" / case / "mask" / "RS.dcm"
    rtstruct = read_rtstruct(path)
    assert referenced_series_uids(rtstruct) == [series.series_uid]
    mask = rasterize_roi(rtstruct, series, "GTV_Mass_MR_T1", source=str(path))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(ibsi_root() / "nifti" / case / "MR_T1_mask.nii.gz")))
    assert mask.dtype == np.uint8 and mask.shape == reference.shape
    assert dice(mask, reference) >= 0.95
    assert int((mask != (reference > 0)).sum()) == 0  # voxel for voxel, as the data set's README promises


def test_nifti_masks_from_masks_dir_take_precedence_and_agree(tmp_path):
    root = ibsi_root()
    masks = tmp_path / "masks"
    masks.mkdir()
    for case in CASES:
        (masks / f"{case}.nii.gz").symlink_to(root / "nifti" / case / "MR_T1_mask.nii.gz")
    result = read_cases(root / "dicom", masks, SECRET, progress=False)
    assert result.rejected == [] and len(result.cases) == len(CASES)
    for accepted, record in zip(result.accepted, result.cases):
        case = Path(accepted["folder"]).parent.name
        assert accepted["mask"] == str(masks / f"{case}.nii.gz")
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(masks / f"{case}.nii.gz")))
        assert np.array_equal(record["mask"], reference)


def test_roi_choice_in_a_real_tree(tmp_path):
    root = ibsi_root()
    (tmp_path / "STS_002").mkdir()
    (tmp_path / "STS_002" / "image").symlink_to(root / "dicom" / "STS_002" / "image")
    rtstruct = pydicom.dcmread(root / "dicom" / "STS_002" / "mask" / "RS.dcm")
    extra = Dataset()
    extra.ROINumber = 2
    extra.ROIName = "Oedema"
    rtstruct.StructureSetROISequence.append(extra)
    (tmp_path / "STS_002" / "mask").mkdir()
    rtstruct.save_as(tmp_path / "STS_002" / "mask" / "RS.dcm")

    without = read_cases(tmp_path, None, SECRET, progress=False)
    assert without.cases == []
    [rejection] = without.rejected
    assert "2 ROIs ('GTV_Mass_MR_T1', 'Oedema'); choose one with --roi NAME" in rejection["reason"]
    assert "RS.dcm" in rejection["reason"]

    chosen = read_cases(tmp_path, None, SECRET, roi="gtv_mass_mr_t1", progress=False)
    assert chosen.rejected == [] and len(chosen.cases) == 1

    wrong = read_cases(tmp_path, None, SECRET, roi="Liver", progress=False)
    assert "no ROI named 'Liver'; its ROIs are: 'GTV_Mass_MR_T1', 'Oedema'" in wrong.rejected[0]["reason"]


def test_nested_contours_make_a_hole():
    series = grid_series()
    outer = voxel_polygon(series, 2, box(0.5, 7.5, 0.5, 6.5))
    inner = voxel_polygon(series, 2, box(2.5, 5.5, 2.5, 4.5))
    mask = rasterize_roi(structure_set({"ring": [outer, inner]}), series)
    expected = np.zeros(series.geometry.shape, np.uint8)
    expected[2, 1:7, 1:8] = 1
    expected[2, 3:5, 3:6] = 0
    assert np.array_equal(mask, expected)


def test_oblique_grid_uses_the_inverse_affine():
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    row, col = np.array([c, s, 0.0]), np.array([0.0, 0.0, -1.0])
    direction = np.column_stack([row, col, np.cross(row, col)]).ravel()
    series = grid_series(spacing=(3.0, 0.8, 0.7), origin=(10.0, -20.0, 30.0), direction=direction)
    mask = rasterize_roi(structure_set({"gtv": [voxel_polygon(series, 3, box(1.5, 4.5, 2.5, 5.5))]}), series)
    expected = np.zeros(series.geometry.shape, np.uint8)
    expected[3, 3:6, 2:5] = 1
    assert np.array_equal(mask, expected)


def test_several_rois_need_a_name():
    series = grid_series()
    contour = voxel_polygon(series, 1, box(0.5, 3.5, 0.5, 3.5))
    rtstruct = structure_set({"GTV": [contour], "CTV": [contour]})
    with pytest.raises(RTStructError, match=r"2 ROIs \('GTV', 'CTV'\); choose one with --roi NAME"):
        rasterize_roi(rtstruct, series)
    assert rasterize_roi(rtstruct, series, "CTV").sum() == 9


def test_contour_off_the_slices_is_refused():
    series = grid_series()
    ok = voxel_polygon(series, 1, box(0.5, 3.5, 0.5, 3.5))
    below_first = voxel_polygon(series, -0.8, box(0.5, 3.5, 0.5, 3.5))
    with pytest.raises(RTStructError, match=r"contour 2 .* 0.80 slice spacings \(1.60 mm\) off the nearest"):
        rasterize_roi(structure_set({"gtv": [ok, below_first]}), series)
    corners = [(1, 1, 1), (4, 1, 1), (4, 4, 2), (1, 4, 2)]
    tilted = np.array([voxel_polygon(series, k, [(i, j)])[0] for i, j, k in corners])
    with pytest.raises(RTStructError, match="not parallel to the slices"):
        rasterize_roi(structure_set({"gtv": [tilted]}), series)


def test_contour_outside_the_image_is_refused():
    series = grid_series()
    beyond_edge = voxel_polygon(series, 1, box(6.5, 12.5, 0.5, 3.5))
    with pytest.raises(RTStructError, match="outside the image"):
        rasterize_roi(structure_set({"gtv": [beyond_edge]}), series)


def test_other_frame_of_reference_is_refused():
    series = grid_series(frame_uid="9.9.9")
    contour = voxel_polygon(series, 1, box(0.5, 3.5, 0.5, 3.5))
    with pytest.raises(RTStructError, match="another frame of reference"):
        rasterize_roi(structure_set({"gtv": [contour]}), series)


def test_roi_without_contours_is_a_case_without_lesion():
    mask = rasterize_roi(structure_set({"gtv": []}), grid_series())
    assert mask.dtype == np.uint8 and mask.shape == grid_series().geometry.shape and not mask.any()


def _random_polygons(rng: np.random.Generator, shape: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Smooth and jagged outlines, vertices on pixel centres and edges through them, spills past the image."""
    rows, cols = shape
    polygons = []
    for n in range(400):
        count = int(rng.integers(3, 300))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radius = rng.uniform(0.5, 12) * (1 + rng.uniform(0, 0.6) * np.sin(rng.integers(1, 7) * angles))
        x = rng.uniform(-2, cols + 1) + radius * np.cos(angles)
        y = rng.uniform(-2, rows + 1) + radius * np.sin(angles)
        if n % 4 == 1:
            x, y = np.round(x), np.round(y)  # vertices on pixel centres, horizontal and vertical edges
        elif n % 4 == 2:
            x, y = np.round(x * 2) / 2, np.round(y * 2) / 2  # edges through pixel centres
        elif n % 4 == 3:
            x, y = rng.uniform(-1, cols, count), rng.uniform(-1, rows, count)  # self-intersecting
        polygons.append((x, y))
    return polygons


def test_scanline_fill_matches_skimage_polygon_pixel_for_pixel():
    """Rasterisation fills rows between crossings; it must give exactly skimage.draw.polygon's pixels."""
    from skimage.draw import polygon

    from datasite_setup.rtstruct import _toggle_polygon

    shape = (40, 52)
    for x, y in _random_polygons(np.random.default_rng(11), shape):
        expected = np.zeros(shape, bool)
        expected[polygon(y, x, shape=shape)] = True
        got = np.zeros(shape, bool)
        _toggle_polygon(got, x, y)
        assert np.array_equal(got, expected), (x.tolist(), y.tolist())
