"""The liver CT phantom filed as a hospital exports it: DICOM CT slices, with the masks as a DICOM
SEG, an RT Structure Set or a NIfTI label map.

Ingestion has to cope with real exports: slices in randomly named files that only
ImagePositionPatient orders, vendor-specific stored integers and rescale intercepts, SEG frames
that skip empty slices, RTSTRUCT contours with holes and islands, label maps matched to patients by
file name. Ingestion tests and benchmarks therefore need exports that look real, of cases whose
ground truth is known: the cases `phantom` draws.

- `write_ct_series`: one CT Image Storage file per slice with the profile's header (vendor,
  kernel, dose, contrast, stored range); UIDs, names, dates and file names come from the given
  rng, so a seed gives the same files byte for byte.
- `write_seg`: a BINARY DICOM Segmentation of that series, segments "liver" and "lesion".
- `write_rtstruct`: an RT Structure Set of that series, ROIs "liver" and "lesion" as
  CLOSED_PLANAR contours in patient millimetres.
- `write_nifti_mask`: the label map as NIfTI on the series' grid.
- `write_phantom_site`: a hospital's whole export folder; patient i is case i of
  `phantom.phantom_fleet` with the same seed.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, SegmentationStorage, generate_uid
from pydicom.valuerep import DSfloat
from tqdm import tqdm

from domains.liver_ct_segmentation.phantom import LESION, LIVER, PhantomCTCase, case_id_of, case_seeds, generate_case, profile_named
from domains.liver_ct_segmentation.scanner_profiles import CTScannerProfile
from domains.rtstruct_export import Structure, derived_object, file_meta, image_reference, write_structure_set

MASK_FORMATS = ("seg", "rtstruct", "nifti")
PROGRESS_FROM_CASES = 20

_ABDOMEN_WINDOW = (40.0, 400.0)  # WindowCenter, WindowWidth (HU) of the soft-tissue window
_SNOMED_LIVER = ("10200004", "SCT", "Liver")
_SNOMED_ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")
_SNOMED_NEOPLASM = ("108369006", "SCT", "Neoplasm")
_SNOMED_MORPHOLOGICALLY_ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")


def _uid(rng: np.random.Generator) -> str:
    """A UID that is random per study but reproducible for a seed."""
    return generate_uid(entropy_srcs=[rng.bytes(16).hex()])


def _random_date(rng: np.random.Generator, first_year: int, last_year: int) -> dt.date:
    start = dt.date(first_year, 1, 1)
    return start + dt.timedelta(days=int(rng.integers(0, (dt.date(last_year, 12, 31) - start).days + 1)))


def _ds(value: float) -> DSfloat:
    return DSfloat(value, auto_format=True)


def _slice_positions(case: PhantomCTCase) -> list[list[float]]:
    """ImagePositionPatient of every slice: origin plus k slice steps along the slice normal."""
    normal = np.array(case.direction).reshape(3, 3)[:, 2]
    return [[round(float(v), 4) for v in np.array(case.origin) + normal * case.spacing[0] * k] for k in range(case.image.shape[0])]


def write_ct_series(case: PhantomCTCase, profile: CTScannerProfile, out_dir: str | Path, patient_name: str, patient_id: str,
                    rng: np.random.Generator) -> list[Path]:
    """One CT Image Storage file per slice, named randomly as PACS exports often are (a reader has
    to order slices by ImagePositionPatient), storing `HU - RescaleIntercept` as integers.

    Returns the paths in slice order (k = 0 first)."""
    low, high = profile.stored_hu_range
    if not np.array_equal(case.image, np.rint(case.image)) or case.image.min() < low or case.image.max() > high:
        raise ValueError(f"case: image must hold integer HU within {profile.name}'s stored range {low:g}..{high:g} "
                         f"(got {case.image.min():g}..{case.image.max():g}); generate the case with the same profile")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored_dtype = np.int16 if profile.pixel_representation else np.uint16
    stored = (case.image.astype(np.int32) - int(profile.rescale_intercept)).astype(stored_dtype)
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    birth = _random_date(rng, 1940, 2000)
    study = _random_date(rng, 2019, 2024)
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    sex = "F" if rng.random() < 0.5 else "M"
    direction = np.array(case.direction).reshape(3, 3)
    orientation = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
    spacing_z, spacing_y, spacing_x = case.spacing
    phase = profile.contrast

    paths = []
    for k, position in enumerate(_slice_positions(case)):
        sop_uid = _uid(rng)
        ds = Dataset()
        ds.file_meta = file_meta(CTImageStorage, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "093000"
        ds.AccessionNumber = patient_id[-16:]
        ds.Modality = "CT"
        ds.Manufacturer = profile.manufacturer
        ds.InstitutionName = profile.institution_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN"
        ds.SeriesDescription = profile.series_description
        ds.ManufacturerModelName = profile.model_name
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = sex
        ds.PatientAge = f"{age:03d}Y"
        if phase.enhanced:
            ds.ContrastBolusAgent = profile.contrast_agent
            ds.ContrastBolusRoute = "IV"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing_z)
        ds.KVP = _ds(profile.kvp)
        ds.DataCollectionDiameter = _ds(500.0)
        ds.ReconstructionDiameter = _ds(round(spacing_x * case.image.shape[2], 2))
        ds.GantryDetectorTilt = _ds(0.0)
        ds.RotationDirection = "CW"
        ds.Exposure = int(round(profile.exposure_mas))
        ds.CTDIvol = float(profile.ctdi_vol_mgy)
        ds.CTDIPhantomTypeCodeSequence = DicomSequence([_code(("113691", "DCM", "IEC Body Dosimetry Phantom"))])
        ds.ConvolutionKernel = profile.convolution_kernel
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2 if phase.enhanced else 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(position[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
        ds.BitsAllocated = 16
        ds.BitsStored = profile.bits_stored
        ds.HighBit = profile.bits_stored - 1
        ds.PixelRepresentation = profile.pixel_representation
        ds.WindowCenter, ds.WindowWidth = (_ds(v) for v in _ABDOMEN_WINDOW)
        ds.RescaleIntercept = _ds(profile.rescale_intercept)
        ds.RescaleSlope = _ds(1.0)
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"CT_{rng.bytes(6).hex().upper()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series_headers(case: PhantomCTCase, series_files: Sequence[str | Path]) -> list[Dataset]:
    """The series' headers in the case's slice order, matched by ImagePositionPatient (not by the
    order of `series_files`), checked to be the case's grid."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series_files]
    if len(headers) != case.mask.shape[0]:
        raise ValueError(f"series_files: {len(headers)} files but the case has {case.mask.shape[0]} slices")
    by_position = {tuple(round(float(v), 2) for v in header.ImagePositionPatient): header for header in headers}
    ordered = []
    for position in _slice_positions(case):
        header = by_position.get(tuple(round(v, 2) for v in position))
        if header is None:
            raise ValueError(f"series_files: no slice at {position} mm; the series was not written from this case")
        ordered.append(header)
    return ordered


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


_SEGMENTS = (  # number, label, category, type, display colour (CIELab, DICOM-scaled)
    (LIVER, "liver", _SNOMED_ANATOMICAL_STRUCTURE, _SNOMED_LIVER, (40092, 37002, 49800)),
    (LESION, "lesion", _SNOMED_MORPHOLOGICALLY_ALTERED, _SNOMED_NEOPLASM, (43803, 47400, 24440)),
)


def _segment_masks(case: PhantomCTCase) -> dict[int, np.ndarray]:
    """Segment number -> its binary mask: the liver is the organ envelope (lesions included)."""
    return {LIVER: case.mask >= LIVER, LESION: case.mask == LESION}


def write_seg(case: PhantomCTCase, series_files: Sequence[str | Path], path: str | Path) -> Path:
    """A BINARY DICOM Segmentation of the CT series with segment 1 "liver" (mask >= 1, the organ
    envelope) and segment 2 "lesion" (mask == 2).

    Frames are one slice of one segment, ordered by segment then slice, and only non-empty ones
    are stored (as dcmqi and highdicom write them): a lesion-free case has a "lesion" segment
    with no frames, which reads back as an empty mask. Each frame names its segment
    (SegmentIdentificationSequence) and its slice (PlanePositionSequence, DerivationImageSequence).
    """
    headers = _series_headers(case, series_files)
    first = headers[0]
    rows, cols = case.mask.shape[1:]
    series_uid = str(first.SeriesInstanceUID)
    sop_uid = generate_uid(entropy_srcs=[series_uid, "seg-sop"])
    dimension_uid = generate_uid(entropy_srcs=[series_uid, "seg-dimensions"])
    spacing_z, spacing_y, spacing_x = case.spacing

    ds = derived_object(SegmentationStorage, sop_uid, first)
    ds.SeriesDate = ds.ContentDate = first.StudyDate
    ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = "SEG"
    ds.Manufacturer = "MEDFED PHANTOM"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = "1"
    ds.SeriesDescription = "Liver and lesions"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[series_uid, "seg-series"])
    ds.SeriesNumber = 300
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel = "LIVER"
    ds.ContentDescription = "Liver and liver lesions"
    ds.ContentCreatorName = "PHANTOM^GROUND TRUTH"
    ds.SegmentationType = "BINARY"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0

    segments = []
    for number, label, category, kind, colour in _SEGMENTS:
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        item.SegmentAlgorithmType = "MANUAL"
        item.SegmentedPropertyCategoryCodeSequence = DicomSequence([_code(category)])
        item.SegmentedPropertyTypeCodeSequence = DicomSequence([_code(kind)])
        item.AnatomicRegionSequence = DicomSequence([_code(_SNOMED_LIVER)])
        item.RecommendedDisplayCIELabValue = list(colour)
        segments.append(item)
    ds.SegmentSequence = DicomSequence(segments)

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series_uid
    referenced_series.ReferencedInstanceSequence = DicomSequence([image_reference(header) for header in headers])
    ds.ReferencedSeriesSequence = DicomSequence([referenced_series])

    organisation = Dataset()
    organisation.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = DicomSequence([organisation])
    dimensions = []
    for pointer, group, label in ((0x0062000B, 0x0062000A, "ReferencedSegmentNumber"),
                                  (0x00200032, 0x00209113, "ImagePositionPatient")):
        dimension = Dataset()
        dimension.DimensionOrganizationUID = dimension_uid
        dimension.DimensionIndexPointer = pointer
        dimension.FunctionalGroupPointer = group
        dimension.DimensionDescriptionLabel = label
        dimensions.append(dimension)
    ds.DimensionIndexSequence = DicomSequence(dimensions)

    shared = Dataset()
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = first.ImageOrientationPatient
    pixel_measures = Dataset()
    pixel_measures.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
    pixel_measures.SliceThickness = pixel_measures.SpacingBetweenSlices = _ds(spacing_z)
    shared.PlaneOrientationSequence = DicomSequence([plane_orientation])
    shared.PixelMeasuresSequence = DicomSequence([pixel_measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames, per_frame = [], []
    for number, binary in _segment_masks(case).items():
        for k, header in enumerate(headers):
            if not binary[k].any():
                continue
            frames.append(binary[k])
            per_frame.append(_seg_frame(number, k, header))
    if not frames:
        raise ValueError("case: the mask has no liver voxel, so the SEG would have no frame")
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.add_new(0x7FE00010, "OB", pack_bits(np.stack(frames).astype(np.uint8)))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _seg_frame(segment_number: int, slice_index: int, header: Dataset) -> Dataset:
    """A frame's functional groups: its dimension indices, segment, position and source slice."""
    content = Dataset()
    content.DimensionIndexValues = [segment_number, slice_index + 1]
    segment = Dataset()
    segment.ReferencedSegmentNumber = segment_number
    position = Dataset()
    position.ImagePositionPatient = header.ImagePositionPatient
    source = image_reference(header)
    source.PurposeOfReferenceCodeSequence = DicomSequence([_code(("121322", "DCM", "Source image for image processing operation"))])
    source.SpatialLocationsPreserved = "YES"
    derivation = Dataset()
    derivation.DerivationCodeSequence = DicomSequence([_code(("113076", "DCM", "Segmentation"))])
    derivation.SourceImageSequence = DicomSequence([source])
    frame = Dataset()
    frame.FrameContentSequence = DicomSequence([content])
    frame.SegmentIdentificationSequence = DicomSequence([segment])
    frame.PlanePositionSequence = DicomSequence([position])
    frame.DerivationImageSequence = DicomSequence([derivation])
    return frame


def write_rtstruct(case: PhantomCTCase, series_files: Sequence[str | Path], path: str | Path) -> Path:
    """An RT Structure Set with ROI 1 "liver" (mask >= 1, the organ envelope) and ROI 2 "lesion"
    (mask == 2), as CLOSED_PLANAR contours per slice in patient mm.

    Holes (the IVC inside the liver) and several islands per slice are separate contours that
    even-odd filling combines. A case without lesions keeps the "lesion" ROI with no contours, as
    planning systems write it.
    """
    masks = _segment_masks(case)
    structures = [Structure("liver", masks[LIVER], (221, 130, 101), "ORGAN"),
                  Structure("lesion", masks[LESION], (255, 255, 0), "GTV")]
    return write_structure_set(_series_headers(case, series_files), structures, path, label="LIVER",
                               description="Liver and lesions", series_number=301)


def write_nifti_mask(case: PhantomCTCase, path: str | Path) -> Path:
    """The label map (0 background, 1 liver, 2 lesion) as NIfTI on the series' grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(case.mask.astype(np.uint8))
    image.SetSpacing(tuple(reversed(case.spacing)))
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    sitk.WriteImage(image, str(path))
    return path


def write_phantom_site(out_dir: str | Path, profile_name: str, n_cases: int, seed: int, mask_format: str = "seg", *,
                       overwrite: bool = False, matrix: int = 96, fov_mm: float | None = None,
                       z_extent_mm: float = 180.0) -> list[str]:
    """A hospital's export: `out_dir/dicom/<patient>/image/*.dcm` with the mask as
    `out_dir/dicom/<patient>/mask/seg.dcm` ("seg") or `.../mask/RS.dcm` ("rtstruct"), or as a label
    map `out_dir/masks/<patient>.nii.gz` ("nifti", named as ingestion's --masks folder matches it).

    Patient i is case i of `phantom_fleet` with the same seed and size. Existing patient folders
    are refused unless `overwrite` (then only those are replaced), because stale randomly named
    slices would silently join a series. Returns the patient ids.
    """
    profile = profile_named(profile_name)
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    if not isinstance(n_cases, (int, np.integer)) or n_cases < 0:
        raise ValueError(f"n_cases must be a non-negative integer, got {n_cases!r}")
    out_dir = Path(out_dir)
    patient_ids = []
    for index in tqdm(range(n_cases), desc=f"phantom {profile.name}", unit="case", disable=n_cases < PROGRESS_FROM_CASES):
        patient_id = case_id_of(profile.name, index)
        case_dir = out_dir / "dicom" / patient_id
        nifti_path = out_dir / "masks" / f"{patient_id}.nii.gz"
        stale = [p for p in (case_dir, nifti_path) if p.exists()]
        if stale and not overwrite:
            raise FileExistsError(f"{stale[0]} already exists; choose an empty out_dir or pass overwrite=True")
        if case_dir.exists():
            shutil.rmtree(case_dir)
        nifti_path.unlink(missing_ok=True)
        anatomy_seed, files_seed = case_seeds(seed, profile.name, index)
        case = generate_case(profile, np.random.default_rng(anatomy_seed), matrix, fov_mm, z_extent_mm)
        series = write_ct_series(case, profile, case_dir / "image", f"PHANTOM^{patient_id.upper()}", patient_id,
                                 np.random.default_rng(files_seed))
        if mask_format == "seg":
            write_seg(case, series, case_dir / "mask" / "seg.dcm")
        elif mask_format == "rtstruct":
            write_rtstruct(case, series, case_dir / "mask" / "RS.dcm")
        else:
            write_nifti_mask(case, nifti_path)
        patient_ids.append(patient_id)
    return patient_ids
