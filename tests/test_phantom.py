"""The synthetic hospitals: different scanners, files a real reader can parse, exact geometry."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RTStructureSetStorage
from scipy.stats import wasserstein_distance
from skimage.draw import polygon

from domains.brain_mr_segmentation.cases import foreground_mask, normalise_volume
from domains.brain_mr_segmentation.phantom import generate_case, synthetic_case, write_dicom_series, write_nifti_mask, write_phantom_site, write_rtstruct
from domains.brain_mr_segmentation.scanner_profiles import PROFILES, ScannerProfile

PHILIPS = PROFILES["hospital-b"]


def _with_tumour(profile: ScannerProfile) -> ScannerProfile:
    return replace(profile, tumour_prevalence=1.0)


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(path) for path in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def philips_case():
    return generate_case(_with_tumour(PHILIPS), np.random.default_rng(11))


@pytest.fixture(scope="module")
def philips_series(philips_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    paths = write_dicom_series(philips_case, PHILIPS, out / "image", "DOE^JANE", "P-0001", np.random.default_rng(5))
    return out, paths


def test_profiles_are_three_distinct_hospitals():
    assert set(PROFILES) == {"hospital-a", "hospital-b", "hospital-c"}
    a, b, c = PROFILES["hospital-a"], PROFILES["hospital-b"], PROFILES["hospital-c"]
    assert len({a.manufacturer, b.manufacturer, c.manufacturer}) == 3
    assert a.field_strength_t == 3.0 and b.field_strength_t == c.field_strength_t == 1.5
    assert a.pixel_spacing_mm < b.pixel_spacing_mm < c.pixel_spacing_mm
    assert c.slice_thickness_mm == max(p.slice_thickness_mm for p in PROFILES.values())
    assert c.noise_sigma == max(p.noise_sigma for p in PROFILES.values())
    assert b.rescale_slope != 1.0 and b.bias_field_strength > a.bias_field_strength
    for profile in PROFILES.values():
        assert profile.matrix <= 64 and 16 <= profile.n_slices <= 24


def test_scaled_profile_keeps_field_of_view():
    a = PROFILES["hospital-a"]
    big = a.scaled(2)
    assert big.shape == (48, 128, 128)
    assert big.matrix * big.pixel_spacing_mm == pytest.approx(a.matrix * a.pixel_spacing_mm)
    assert big.n_slices * big.slice_thickness_mm == pytest.approx(a.n_slices * a.slice_thickness_mm)
    assert big.manufacturer == a.manufacturer


def test_hospital_c_is_the_intensity_outlier():
    """Raw scanner units and, more importantly, after per-case z-scoring: contrast, bias field and
    noise differences survive normalisation, and hospital-c differs most."""
    raw, normalised = {}, {}
    for name, profile in PROFILES.items():
        rng = np.random.default_rng(3)
        images = [generate_case(profile, rng).image for _ in range(2)]
        raw[name] = np.concatenate([image[foreground_mask(image)] for image in images])
        normalised[name] = np.concatenate([normalise_volume(image)[foreground_mask(image)] for image in images])
    for values in (raw, normalised):
        ab = wasserstein_distance(values["hospital-a"], values["hospital-b"])
        ac = wasserstein_distance(values["hospital-a"], values["hospital-c"])
        bc = wasserstein_distance(values["hospital-b"], values["hospital-c"])
        assert ab < 0.75 * min(ac, bc), (ab, ac, bc)


def test_generated_case_has_a_bright_tumour_inside_the_head(philips_case):
    case = philips_case
    assert case.image.shape == PHILIPS.shape and case.image.dtype == np.float32
    assert case.mask.shape == PHILIPS.shape and case.mask.dtype == np.uint8
    assert case.spacing == PHILIPS.spacing
    assert set(np.unique(case.mask)) == {0, 1}
    assert case.metadata["tumour_voxels"] == int(case.mask.sum()) > 50
    head = foreground_mask(case.image)
    assert head[case.mask == 1].mean() > 0.95
    assert np.median(case.image[case.mask == 1]) > np.percentile(case.image[head & (case.mask == 0)], 90)
    low, high = PHILIPS.stored_range
    assert low <= case.image.min() and case.image.max() <= high


def test_tumour_prevalence_zero_gives_empty_masks():
    profile = replace(PROFILES["hospital-a"], tumour_prevalence=0.0)
    rng = np.random.default_rng(0)
    assert all(generate_case(profile, rng).mask.sum() == 0 for _ in range(3))


def test_generation_is_deterministic_per_seed():
    profile = PROFILES["hospital-c"]
    first, again = generate_case(profile, np.random.default_rng(42)), generate_case(profile, np.random.default_rng(42))
    other = generate_case(profile, np.random.default_rng(43))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not np.array_equal(first.image, other.image)


def test_synthetic_case_follows_any_schema():
    image, mask = synthetic_case((10, 40, 52), (6.0, 4.5, 4.0), np.random.default_rng(1))
    assert image.shape == mask.shape == (10, 40, 52)
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert foreground_mask(image).mean() > 0.2


def test_case_record_is_plain(philips_case):
    record = philips_case.as_record("case-1")
    assert record["case_id"] == "case-1"
    assert record["spacing"] == list(PHILIPS.spacing) and len(record["direction"]) == 9
    assert all(isinstance(v, float) for v in record["origin"])
    assert all(isinstance(v, (str, int, float)) for v in record["metadata"].values())


def test_dicom_series_reads_back_with_tags_and_geometry(philips_case, philips_series):
    _, paths = philips_series
    case = philips_case
    assert len(paths) == case.image.shape[0]
    names_in_slice_order = [path.name for path in paths]
    assert names_in_slice_order != sorted(names_in_slice_order)

    series = _read_series(paths)
    first = series[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.file_meta.MediaStorageSOPClassUID == MRImageStorage == first.SOPClassUID
    assert first.Modality == "MR" and first.Manufacturer == PHILIPS.manufacturer
    assert first.ManufacturerModelName == PHILIPS.model_name and first.InstitutionName == PHILIPS.institution_name
    assert float(first.MagneticFieldStrength) == PHILIPS.field_strength_t
    assert str(first.PatientName) == "DOE^JANE" and first.PatientID == "P-0001" and len(first.PatientBirthDate) == 8
    assert (first.Rows, first.Columns) == case.image.shape[1:]
    assert (first.BitsAllocated, first.BitsStored, first.PixelRepresentation) == (16, PHILIPS.bits_stored, 0)
    assert float(first.RescaleSlope) == PHILIPS.rescale_slope and float(first.RescaleIntercept) == PHILIPS.rescale_intercept
    assert float(first.EchoTime) > 0 and float(first.RepetitionTime) > 0 and first.SeriesDescription
    assert len({ds.SeriesInstanceUID for ds in series}) == 1 and len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, len(series) + 1))

    spacing_z, spacing_y, spacing_x = case.spacing
    assert [float(v) for v in first.PixelSpacing] == [spacing_y, spacing_x]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == spacing_z
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series])
    expected = np.array(case.origin) + np.outer(np.arange(len(series)), [0, 0, spacing_z])
    np.testing.assert_allclose(positions, expected, atol=1e-3)

    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series])
    assert np.abs(volume - case.image).max() <= PHILIPS.rescale_slope / 2 + 1e-3


def test_nifti_mask_geometry_equals_series_geometry(philips_case, philips_series, tmp_path):
    _, paths = philips_series
    nifti = sitk.ReadImage(str(write_nifti_mask(philips_case, tmp_path / "mask.nii.gz")))
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(paths[0].parent)))
    assert nifti.GetSize() == series.GetSize()
    np.testing.assert_allclose(nifti.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(nifti.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(nifti.GetDirection(), series.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), philips_case.mask)


def test_rtstruct_contours_rasterise_back_to_the_mask(philips_case, philips_series):
    out, paths = philips_series
    rs = pydicom.dcmread(write_rtstruct(philips_case, paths, out / "mask" / "RS.dcm"))
    series = _read_series(paths)
    sop_to_slice = {ds.SOPInstanceUID: k for k, ds in enumerate(series)}

    assert rs.SOPClassUID == RTStructureSetStorage and rs.Modality == "RTSTRUCT"
    assert rs.StudyInstanceUID == series[0].StudyInstanceUID and rs.PatientID == series[0].PatientID
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    referenced_series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced_series.ContourImageSequence} == set(sop_to_slice)
    assert [roi.ROIName for roi in rs.StructureSetROISequence] == ["GTV"]

    origin_x, origin_y, _ = philips_case.origin
    _, spacing_y, spacing_x = philips_case.spacing
    rasterised = np.zeros_like(philips_case.mask)
    for contour in rs.ROIContourSequence[0].ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        k = sop_to_slice[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == int(contour.NumberOfContourPoints)
        np.testing.assert_allclose(points[:, 2], float(series[k].ImagePositionPatient[2]), atol=1e-3)
        rows, cols = polygon((points[:, 1] - origin_y) / spacing_y, (points[:, 0] - origin_x) / spacing_x, rasterised.shape[1:])
        rasterised[k, rows, cols] ^= 1
    overlap = np.logical_and(rasterised, philips_case.mask).sum()
    dice = 2 * overlap / (rasterised.sum() + philips_case.mask.sum())
    assert dice >= 0.9, dice


def test_rtstruct_of_a_tumour_free_case_has_an_empty_gtv(tmp_path):
    profile = replace(PROFILES["hospital-a"], tumour_prevalence=0.0)
    case = generate_case(profile, np.random.default_rng(2))
    paths = write_dicom_series(case, profile, tmp_path / "image", "DOE^JOHN", "P-2", np.random.default_rng(2))
    rs = pydicom.dcmread(write_rtstruct(case, paths, tmp_path / "RS.dcm"))
    assert rs.StructureSetROISequence[0].ROIName == "GTV"
    assert "ContourSequence" not in rs.ROIContourSequence[0]


def test_write_phantom_site_layout_and_determinism(tmp_path):
    rt_dirs = write_phantom_site("hospital-c", tmp_path / "rt", n_cases=2, seed=7)
    assert [d.name for d in rt_dirs] == ["hospital-c-0001", "hospital-c-0002"]
    for case_dir in rt_dirs:
        assert len(list((case_dir / "image").glob("*.dcm"))) == PROFILES["hospital-c"].n_slices
        assert (case_dir / "mask" / "RS.dcm").is_file()

    nifti_dirs = write_phantom_site(PROFILES["hospital-c"], tmp_path / "nii", n_cases=1, seed=7, mask_format="nifti")
    assert (nifti_dirs[0] / "mask.nii.gz").is_file() and not (nifti_dirs[0] / "mask").exists()

    write_phantom_site("hospital-c", tmp_path / "again", n_cases=2, seed=7)
    write_phantom_site("hospital-c", tmp_path / "other", n_cases=2, seed=8)
    assert _tree_digest(tmp_path / "rt") == _tree_digest(tmp_path / "again")
    assert _tree_digest(tmp_path / "rt") != _tree_digest(tmp_path / "other")


def test_write_phantom_site_refuses_to_mix_into_existing_cases(tmp_path):
    write_phantom_site("hospital-a", tmp_path, n_cases=1, seed=1)
    with pytest.raises(FileExistsError, match="hospital-a-0001"):
        write_phantom_site("hospital-a", tmp_path, n_cases=1, seed=2)
    write_phantom_site("hospital-a", tmp_path, n_cases=1, seed=2, overwrite=True)
    with pytest.raises(ValueError, match="hospital-a"):
        write_phantom_site("hospital-z", tmp_path, n_cases=1, seed=1)
    with pytest.raises(ValueError, match="mask_format"):
        write_phantom_site("hospital-a", tmp_path / "x", n_cases=1, seed=1, mask_format="png")
