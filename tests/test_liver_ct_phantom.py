"""The phantom abdominal CT fleet: hospitals that differ measurably, anatomy with a liver of adult
size and lesions inside it, and DICOM CT / SEG / RTSTRUCT files that read back exactly, also
through the site's own ingestion."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, binary_erosion, label

from datasite_setup.deidentify import _FLOAT_FIELDS, _TEXT_FIELDS
from datasite_setup.dicom_series import scan_folder
from datasite_setup.ingest import read_cases
from datasite_setup.rtstruct import rasterize_roi, read_rtstruct
from domains.liver_ct_segmentation.phantom import PhantomCTCase, generate_case, phantom_fleet
from domains.liver_ct_segmentation.phantom_dicom import write_ct_series, write_phantom_site, write_rtstruct, write_seg
from domains.liver_ct_segmentation.scanner_profiles import ARTERIAL, NON_CONTRAST, PORTAL_VENOUS, PROFILES

SMALL = 64  # matrix of the tests' cases: fast, and still ~5.6 mm pixels over the abdomen
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CT_METADATA_KEYS = {"Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ConvolutionKernel",
                    "SliceThickness", "SpacingBetweenSlices", "KVP"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def robust_sd(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation: vessels and lesion edges in a region
    are outliers that would inflate a plain standard deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def liver_core(case: PhantomCTCase) -> np.ndarray:
    """Liver voxels two pixels in from any other label in-plane: no partial volume, no kernel blur."""
    return binary_erosion(case.mask == 1, np.ones((1, 5, 5), bool))


def noise_and_grain(case: PhantomCTCase) -> tuple[float, float]:
    """(noise SD, correlation of horizontally neighbouring pixels) in the liver core."""
    core = liver_core(case)
    pairs = core[:, :, :-1] & core[:, :, 1:]
    sd = robust_sd(case.image[core])
    difference_sd = robust_sd(case.image[:, :, :-1][pairs] - case.image[:, :, 1:][pairs])
    return sd, 1.0 - difference_sd**2 / (2 * sd**2)


@pytest.fixture(scope="module")
def one_case_per_profile() -> dict[str, PhantomCTCase]:
    return {name: generate_case(profile, np.random.default_rng(5), matrix=SMALL) for name, profile in PROFILES.items()}


@pytest.fixture(scope="module")
def cases_with_lesions() -> list[tuple[str, PhantomCTCase]]:
    """Three small hospital-b cases that have lesions (5 mm slices: the fastest to write)."""
    found = []
    for seed in range(40):
        case = generate_case(PROFILES["hospital-b"], np.random.default_rng(seed), matrix=SMALL)
        if (case.mask == 2).sum() >= 10:
            found.append((f"P{seed:02d}", case))
        if len(found) == 3:
            return found
    raise AssertionError("fewer than three of 40 cases have lesions")


def test_profiles_are_four_distinct_hospitals() -> None:
    assert set(PROFILES) == {"hospital-a", "hospital-b", "hospital-c", "hospital-d"}
    profiles = list(PROFILES.values())
    for attribute in ("manufacturer", "model_name", "convolution_kernel", "slice_thickness_mm", "noise_sd_hu",
                      "reconstruction_fov_mm"):
        assert len({getattr(p, attribute) for p in profiles}) == 4, attribute
    assert len({p.pixel_spacing_mm(96) for p in profiles}) == 4
    assert {p.contrast_phase for p in profiles} == {"portal-venous", "arterial", "non-contrast"}
    assert {(p.rescale_intercept, p.pixel_representation) for p in profiles} == {(-1024, 0), (-1024, 1), (-1000, 0), (0, 1)}
    for profile in profiles:
        assert 8 <= profile.noise_sd_hu <= 25 and 80 <= profile.kvp <= 140
        assert profile.stored_hu_range[0] <= -1000 and profile.stored_hu_range[1] >= 3000
    assert PORTAL_VENOUS.liver_hu - ARTERIAL.liver_hu > 25 and ARTERIAL.liver_hu > NON_CONTRAST.liver_hu
    assert max(PORTAL_VENOUS.hypodense_lesion_hu) < PORTAL_VENOUS.liver_hu - 30
    assert min(ARTERIAL.hyperenhancing_lesion_hu) > ARTERIAL.liver_hu + 30 and ARTERIAL.hyperenhancing_lesion_fraction > 0
    sharpest = max(profiles, key=lambda p: p.kernel_mtf50_lp_per_cm)
    assert sharpest.kernel_sigma_px == min(p.kernel_sigma_px for p in profiles)


def test_profile_rejects_inconsistent_settings() -> None:
    a = PROFILES["hospital-a"]
    with pytest.raises(ValueError, match="contrast_agent"):
        replace(a, contrast_agent="")
    with pytest.raises(ValueError, match="noise_sd_hu"):
        replace(a, noise_sd_hu=0.0)
    with pytest.raises(ValueError, match="rescale_intercept"):
        replace(a, rescale_intercept=0.0)  # unsigned storage without offset cannot hold air
    with pytest.raises(ValueError, match="matrix"):
        generate_case(a, np.random.default_rng(0), matrix=8)
    with pytest.raises(ValueError, match="z_extent_mm"):
        generate_case(a, np.random.default_rng(0), z_extent_mm=2.0)
    with pytest.raises(ValueError, match="fov_mm"):
        generate_case(a, np.random.default_rng(0), fov_mm=100.0)


def test_profiles_differ_measurably_in_their_images(one_case_per_profile: dict[str, PhantomCTCase]) -> None:
    measured = {}
    for name, case in one_case_per_profile.items():
        profile = PROFILES[name]
        assert case.spacing == (profile.slice_thickness_mm, profile.pixel_spacing_mm(SMALL), profile.pixel_spacing_mm(SMALL))
        assert case.image.shape[0] == round(180.0 / profile.slice_thickness_mm)
        assert np.array_equal(case.image, np.rint(case.image))  # stored integers
        sd, grain = noise_and_grain(case)
        liver_hu = float(np.median(case.image[liver_core(case)]))
        measured[name] = (sd, grain, liver_hu)
        assert sd == pytest.approx(profile.noise_sd_hu, rel=0.15), (name, sd)
        assert abs(liver_hu - profile.contrast.liver_hu) < 20, (name, liver_hu)
    # Dose: the low-dose and sharp-kernel sites are about twice as noisy as hospital-a.
    assert measured["hospital-c"][0] > 1.6 * measured["hospital-a"][0]
    assert measured["hospital-d"][0] > 1.6 * measured["hospital-a"][0]
    # Kernel: smooth kernels (a: B30f, d: FC08) give coarse noise grain, the sharp one (c: "C") fine grain.
    assert min(measured["hospital-a"][1], measured["hospital-d"][1]) > measured["hospital-c"][1] + 0.15
    # Phase: portal-venous liver is brighter than arterial, which is brighter than unenhanced.
    assert measured["hospital-a"][2] - measured["hospital-c"][2] > 20
    assert measured["hospital-c"][2] - measured["hospital-d"][2] > 10


def test_lesions_sit_in_the_liver_with_the_phase_contrast(cases_with_lesions: list[tuple[str, PhantomCTCase]]) -> None:
    for _, case in cases_with_lesions:
        lesions, count = label(case.mask == 2)
        assert count >= 1
        for index in range(1, count + 1):
            lesion = lesions == index
            rim = binary_dilation(lesion, np.ones((1, 3, 3), bool)) & ~lesion
            assert (case.mask[rim] >= 1).mean() > 0.5  # mostly surrounded by liver, not floating in fat
        # portal-venous lesions are hypodense (40-70 HU against ~110 HU liver)
        assert np.median(case.image[case.mask == 2]) < np.median(case.image[liver_core(case)]) - 25


def test_labels_lesion_share_and_liver_volume() -> None:
    fleet = phantom_fleet(10, seed=1, profiles=("hospital-a", "hospital-b", "hospital-c"), matrix=48)
    lesion_free = 0
    for records in fleet.values():
        for record in records:
            mask = record["mask"]
            assert set(np.unique(mask)) <= {0, 1, 2} and mask.dtype == np.uint8
            litres = (mask >= 1).sum() * np.prod(record["spacing"]) / 1e6
            assert 1.2 <= litres <= 2.2, (record["case_id"], litres)
            lesion_free += int(not (mask == 2).any())
            # the lung bases: air-filled lung (about -850 HU) above the liver dome in the top slice
            top = record["image"][-1]
            assert (np.abs(top + 850) < 100).mean() > 0.05
            assert not (mask[-1] >= 1).any()
    assert 2 <= lesion_free <= 12, lesion_free  # about one case in five of 30


def test_fleet_is_deterministic_per_seed_and_shaped_like_ingested_cases() -> None:
    first = phantom_fleet({"hospital-a": 2, "hospital-d": 1}, seed=3, matrix=32)
    again = phantom_fleet({"hospital-a": 2, "hospital-d": 1}, seed=3, matrix=32)
    other = phantom_fleet({"hospital-a": 2, "hospital-d": 1}, seed=4, matrix=32)
    bigger = phantom_fleet(3, seed=3, profiles=("hospital-a",), matrix=32)
    assert list(first) == ["hospital-a", "hospital-d"]
    assert [r["case_id"] for r in first["hospital-a"]] == ["hospital-a-0000", "hospital-a-0001"]
    for site in first:
        for mine, theirs, different in zip(first[site], again[site], other[site]):
            np.testing.assert_array_equal(mine["image"], theirs["image"])
            np.testing.assert_array_equal(mine["mask"], theirs["mask"])
            assert mine["origin"] == theirs["origin"]
            assert not np.array_equal(mine["image"], different["image"])
    np.testing.assert_array_equal(bigger["hospital-a"][1]["image"], first["hospital-a"][1]["image"])
    assert not np.array_equal(first["hospital-a"][0]["image"], first["hospital-a"][1]["image"])

    record = first["hospital-d"][0]
    assert set(record["metadata"]) == CT_METADATA_KEYS <= set(_FLOAT_FIELDS) | set(_TEXT_FIELDS)
    for key, value in record["metadata"].items():
        assert isinstance(value, float if key in _FLOAT_FIELDS else str), key
    assert record["metadata"]["ConvolutionKernel"] == "FC08" and record["metadata"]["SliceThickness"] == 1.5
    assert record["image"].dtype == np.float32 and record["direction"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    with pytest.raises(ValueError, match="hospital-z"):
        phantom_fleet({"hospital-z": 1})
    with pytest.raises(ValueError, match="cases_per_site"):
        phantom_fleet(-1)


def test_generating_a_default_case_takes_well_under_a_second() -> None:
    profile = PROFILES["hospital-d"]  # 120 slices of 1.5 mm: the largest default case
    generate_case(profile, np.random.default_rng(0))
    started = time.process_time()
    case = generate_case(profile, np.random.default_rng(1))
    assert case.image.shape == (120, 96, 96)
    assert time.process_time() - started < 1.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_ct_series_reads_back_exactly(one_case_per_profile: dict[str, PhantomCTCase], tmp_path: Path, name: str) -> None:
    case, profile = one_case_per_profile[name], PROFILES[name]
    paths = write_ct_series(case, profile, tmp_path / "image", "DOE^JANE", "P-0001", np.random.default_rng(2))
    assert len(paths) == case.image.shape[0] and [p.name for p in paths] != sorted(p.name for p in paths)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "image")))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).astype(np.float32), case.image)
    np.testing.assert_allclose(image.GetSpacing(), case.spacing[::-1], atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), case.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), case.direction, atol=1e-9)

    first = pydicom.dcmread(paths[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == first.file_meta.MediaStorageSOPClassUID
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (first.Modality, first.BodyPartExamined, first.RescaleType) == ("CT", "ABDOMEN", "HU")
    assert (first.Manufacturer, first.ManufacturerModelName) == (profile.manufacturer, profile.model_name)
    assert first.ConvolutionKernel == profile.convolution_kernel and float(first.KVP) == profile.kvp
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == profile.slice_thickness_mm
    assert float(first.RescaleIntercept) == profile.rescale_intercept and first.PixelRepresentation == profile.pixel_representation
    assert ("ContrastBolusAgent" in first) == profile.contrast.enhanced
    assert first.PatientID == "P-0001" and len(first.PatientBirthDate) == 8 and first.PatientSex in ("F", "M")
    assert int(first.InstanceNumber) == 1 and first.FrameOfReferenceUID
    rescaled = first.pixel_array.astype(np.float64) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(rescaled, case.image[0])

    with pytest.raises(ValueError, match="case"):
        write_ct_series(replace(case, image=case.image + 0.5), profile, tmp_path / "bad", "X^Y", "P-2", np.random.default_rng(0))


def _seg_masks(seg: pydicom.Dataset, positions_z: np.ndarray, shape: tuple[int, int, int]) -> dict[int, np.ndarray]:
    """Each segment's mask rebuilt from the SEG's frames, placed by their ImagePositionPatient."""
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    masks = {int(item.SegmentNumber): np.zeros(shape, np.uint8) for item in seg.SegmentSequence}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(np.argmin(np.abs(positions_z - z)))
        assert abs(positions_z[k] - z) < 1e-3
        masks[number][k] |= frame.astype(np.uint8)
    return masks


def test_seg_frames_give_back_liver_and_lesion(cases_with_lesions: list[tuple[str, PhantomCTCase]], tmp_path: Path) -> None:
    patient, case = cases_with_lesions[0]
    paths = write_ct_series(case, PROFILES["hospital-b"], tmp_path / "image", "DOE^JOHN", patient, np.random.default_rng(1))
    ct = pydicom.dcmread(paths[0], stop_before_pixels=True)
    seg = pydicom.dcmread(write_seg(case, paths, tmp_path / "mask" / "seg.dcm"))

    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.BitsAllocated, seg.BitsStored, seg.Rows, seg.Columns) == (1, 1, *case.mask.shape[1:])
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg[keyword].value == ct[keyword].value, keyword
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert segments[1].SegmentLabel == "liver" and segments[2].SegmentLabel == "lesion"
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert segments[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert segments[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert all(s.SegmentAlgorithmType == "MANUAL" for s in segments.values())
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == list(case.spacing[1:])
    assert float(shared.PixelMeasuresSequence[0].SpacingBetweenSlices) == case.spacing[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert int(seg.NumberOfFrames) == len(seg.PerFrameFunctionalGroupsSequence)
    assert len(seg.DimensionIndexSequence) == 2

    positions_z = case.origin[2] + np.arange(case.mask.shape[0]) * case.spacing[0]
    masks = _seg_masks(seg, positions_z, case.mask.shape)
    np.testing.assert_array_equal(masks[1], case.mask >= 1)
    np.testing.assert_array_equal(masks[2], case.mask == 2)

    lesion_free = replace(case, mask=np.minimum(case.mask, 1))
    empty = pydicom.dcmread(write_seg(lesion_free, paths, tmp_path / "mask" / "seg0.dcm"))
    masks = _seg_masks(empty, positions_z, case.mask.shape)
    assert [int(s.SegmentNumber) for s in empty.SegmentSequence] == [1, 2]
    np.testing.assert_array_equal(masks[1], case.mask >= 1)
    assert not masks[2].any()


def test_rtstruct_rasterises_back_to_the_mask_in_ingestion(cases_with_lesions: list[tuple[str, PhantomCTCase]],
                                                           tmp_path: Path) -> None:
    overlap = {"liver": [0, 0], "lesion": [0, 0]}
    for patient, case in cases_with_lesions:
        folder = tmp_path / patient
        paths = write_ct_series(case, PROFILES["hospital-b"], folder / "image", "DOE^JOHN", patient, np.random.default_rng(1))
        rs_path = write_rtstruct(case, paths, folder / "mask" / "RS.dcm")
        rtstruct = read_rtstruct(rs_path)
        assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["liver", "lesion"]
        series = scan_folder(folder / "image", progress=False).series[0]
        np.testing.assert_array_equal(series.volume, case.image)
        np.testing.assert_allclose(series.origin, case.origin, atol=1e-4)
        for roi, truth in (("liver", case.mask >= 1), ("lesion", case.mask == 2)):
            mask = rasterize_roi(rtstruct, series, roi, source=str(rs_path)).astype(bool)
            overlap[roi][0] += 2 * int((mask & truth).sum())
            overlap[roi][1] += int(mask.sum() + truth.sum())
    assert overlap["liver"][0] / overlap["liver"][1] >= 0.95
    assert overlap["lesion"][0] / overlap["lesion"][1] >= 0.85


def test_rtstruct_holes_and_islands_fill_right_even_odd(tmp_path: Path) -> None:
    """A liver slice with a hole (the IVC) holding an island (a lesion), and a separate lobe."""
    rows, cols = np.mgrid[:32, :32]
    ring_centre = (rows - 14) ** 2 + (cols - 12) ** 2
    mask = np.zeros((3, 32, 32), np.uint8)
    mask[1][(ring_centre <= 81) & (ring_centre > 25)] = 1
    mask[1][ring_centre <= 4] = 2
    mask[1][(rows - 26) ** 2 + (cols - 26) ** 2 <= 9] = 1
    mask[2][(rows - 8) ** 2 + (cols - 24) ** 2 <= 9] = 2
    case = PhantomCTCase(np.zeros(mask.shape, np.float32), mask, (2.5, 4.0, 4.0), (-62.0, -62.0, 10.0))
    paths = write_ct_series(case, PROFILES["hospital-c"], tmp_path / "image", "DOE^JOHN", "P-3", np.random.default_rng(3))
    rtstruct = read_rtstruct(write_rtstruct(case, paths, tmp_path / "RS.dcm"))
    series = scan_folder(tmp_path / "image", progress=False).series[0]
    np.testing.assert_array_equal(rasterize_roi(rtstruct, series, "liver"), mask >= 1)
    np.testing.assert_array_equal(rasterize_roi(rtstruct, series, "lesion"), mask == 2)
    liver_contours = rtstruct.ROIContourSequence[0].ContourSequence
    assert len(liver_contours) == 5  # slice 1: ring outline, hole, island, lobe; slice 2: the lesion's envelope


def test_written_sites_are_ingested_and_match_the_fleet(tmp_path: Path) -> None:
    patients = write_phantom_site(tmp_path / "rt", "hospital-b", 2, seed=9, mask_format="rtstruct", matrix=SMALL)
    assert patients == ["hospital-b-0000", "hospital-b-0001"]
    truth = phantom_fleet({"hospital-b": 2}, seed=9, matrix=SMALL)["hospital-b"]
    result = read_cases(tmp_path / "rt" / "dicom", None, secret=b"0" * 32, roi="liver", progress=False)
    assert result.rejected == [] and len(result.cases) == 2
    for case in result.cases:
        expected = next(r for r in truth if np.array_equal(r["image"], case["image"]))
        assert dice(case["mask"], expected["mask"] >= 1) >= 0.95
        np.testing.assert_allclose(case["spacing"], expected["spacing"], atol=1e-6)
        np.testing.assert_allclose(case["origin"], expected["origin"], atol=1e-4)
        assert {k: case["metadata"][k] for k in CT_METADATA_KEYS} == expected["metadata"]
        assert case["metadata"]["ContrastBolusAgentPresent"] is True

    write_phantom_site(tmp_path / "seg", "hospital-b", 1, seed=9, matrix=SMALL)
    seg_files = list((tmp_path / "seg" / "dicom" / "hospital-b-0000" / "mask").iterdir())
    assert [p.name for p in seg_files] == ["seg.dcm"]
    assert len(list((tmp_path / "seg" / "dicom" / "hospital-b-0000" / "image").glob("*.dcm"))) == 36

    write_phantom_site(tmp_path / "nii", "hospital-b", 1, seed=9, mask_format="nifti", matrix=SMALL)
    nifti = sitk.ReadImage(str(tmp_path / "nii" / "masks" / "hospital-b-0000.nii.gz"))
    series = scan_folder(tmp_path / "nii" / "dicom", progress=False).series[0]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), truth[0]["mask"])
    np.testing.assert_allclose(nifti.GetOrigin(), series.origin, atol=1e-4)
    np.testing.assert_allclose(nifti.GetSpacing(), series.spacing[::-1], atol=1e-5)
    assert not (tmp_path / "nii" / "dicom" / "hospital-b-0000" / "mask").exists()

    with pytest.raises(FileExistsError, match="hospital-b-0000"):
        write_phantom_site(tmp_path / "nii", "hospital-b", 1, seed=9, mask_format="nifti", matrix=SMALL)
    with pytest.raises(ValueError, match="mask_format"):
        write_phantom_site(tmp_path / "x", "hospital-b", 1, seed=9, mask_format="png")
    with pytest.raises(ValueError, match="hospital-z"):
        write_phantom_site(tmp_path / "x", "hospital-z", 1, seed=9)
