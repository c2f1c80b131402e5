"""Synthetic brain MR phantoms, written the way hospitals store them (DICOM + RTSTRUCT/NIfTI).

Real patient images cannot leave a hospital, yet tests, demos and benchmarks need sites whose
data look and are filed like the real thing: one DICOM file per slice with randomly named files,
scanner-specific storage (RescaleSlope), and a tumour outline as an RT Structure Set or a NIfTI
mask. Anatomy is drawn in patient millimetres, not voxels, so the same seed gives comparable
heads at any resolution (see `ScannerProfile.with_size`).

Coordinates follow DICOM/ITK (LPS): +x towards the patient's left, +y posterior, +z superior.
Arrays are [Z, Y, X]; slice k lies at z = origin_z + k * slice_thickness.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from domains.case_record import make_case_record
from domains.brain_mr_segmentation.scanner_profiles import PROFILES, ScannerProfile
from domains.rtstruct_export import Structure, file_meta, write_structure_set

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
PROGRESS_FROM_CASES = 20

# Tissue intensities of a FLAIR-like contrast in tissue units: CSF suppressed, grey brighter than
# white matter, oedema and tumour brightest, so the tumour is findable but not by threshold alone.
_INTENSITY = {"air": 0.0, "scalp": 0.55, "skull": 0.06, "csf": 0.10, "grey": 0.62, "white": 0.45, "oedema": 0.78, "tumour": 0.95}
_HEAD_SEMI_AXES_MM = (72.0, 90.0, 80.0)  # x (left-right), y (anterior-posterior), z
# Shell boundaries in normalised head radius (1 = skin surface).
_SKULL_OUTER, _CSF_OUTER, _BRAIN_OUTER, _GREY_INNER = 0.93, 0.86, 0.82, 0.68

GENERIC_PROFILE = ScannerProfile(
    name="generic",
    manufacturer="SYNTHETIC",
    model_name="Phantom",
    institution_name="Synthetic",
    field_strength_t=1.5,
    intensity_scale=1000.0,
    intensity_offset=0.0,
    contrast_gamma=1.0,
    bias_field_strength=0.1,
    noise_sigma=0.03,
    pixel_spacing_mm=3.5,
    slice_thickness_mm=5.0,
    matrix=64,
    n_slices=20,
    tumour_prevalence=0.5,
    tumour_radius_mm=(12.0, 24.0),
)


@dataclass
class PhantomCase:
    """One synthetic study. `spacing` is (z, y, x) like the array; `origin` and `direction` are
    in patient order (x, y, z), as DICOM and SimpleITK state them."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_record(self, case_id: str) -> dict[str, Any]:
        """The plain-dict case record a datasite hands to the training code."""
        return make_case_record(case_id, self.image, self.mask, self.spacing, self.origin, self.direction, self.metadata)


def _smooth_field(coords: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator, n_modes: int, wavelength_mm: tuple[float, float]) -> np.ndarray:
    """A random smooth field in [-1, 1] made of plane waves in millimetres.

    Summing waves (amplitudes adding up to 1) rather than blurring voxel noise keeps the field
    independent of the sampling grid and bounded without looking at the grid.
    """
    z, y, x = coords
    directions = rng.normal(size=(n_modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavenumbers = 2 * np.pi / rng.uniform(*wavelength_mm, size=n_modes)
    phases = rng.uniform(0, 2 * np.pi, size=n_modes)
    amplitudes = rng.uniform(0.5, 1.0, size=n_modes)
    amplitudes /= amplitudes.sum()
    total = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for (dx, dy, dz), k, phase, amplitude in zip(directions, wavenumbers, phases, amplitudes):
        total += np.float32(amplitude) * np.cos(np.float32(k) * (np.float32(dx) * x + np.float32(dy) * y + np.float32(dz) * z) + np.float32(phase))
    return total


def _ellipsoid_radius(coords: tuple[np.ndarray, np.ndarray, np.ndarray], centre: np.ndarray, semi_axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of every voxel; `centre` and `semi_axes`
    are (x, y, z) mm, `rotation` maps ellipsoid axes to patient axes."""
    z, y, x = coords
    offsets = (x - centre[0], y - centre[1], z - centre[2])
    local = [sum(rotation[row, axis] * offsets[row] for row in range(3)) for axis in range(3)]
    return np.sqrt(sum((local[axis] / semi_axes[axis]) ** 2 for axis in range(3)))


def _render(profile: ScannerProfile, shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator) -> PhantomCase:
    """Draw anatomy, maybe a tumour, then the scanner; noise is drawn last so that every
    shape-independent choice uses the same random numbers at any resolution.

    The tumour centre lies in the deep brain (within 0.55 of the head radius) and is pulled into
    the imaged slab, so a drawn tumour is (nearly) always visible; oedema around it is bright
    too but not labelled, so intensity alone does not segment it."""
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = spacing
    origin = (-(n_x - 1) / 2 * s_x, -(n_y - 1) / 2 * s_y, -(n_z - 1) / 2 * s_z)
    coords = (
        (origin[2] + np.arange(n_z) * s_z).astype(np.float32)[:, None, None],
        (origin[1] + np.arange(n_y) * s_y).astype(np.float32)[None, :, None],
        (origin[0] + np.arange(n_x) * s_x).astype(np.float32)[None, None, :],
    )

    fov_half = np.array([n_x * s_x / 2, n_y * s_y / 2, np.inf])
    semi_axes = np.minimum(np.array(_HEAD_SEMI_AXES_MM) * rng.uniform(0.93, 1.07, size=3), 0.92 * fov_half)
    head_centre = rng.uniform([-4, -4, -6], [4, 4, 6])
    head_rotation = Rotation.from_euler("z", rng.uniform(-8, 8), degrees=True).as_matrix()
    head_r = _ellipsoid_radius(coords, head_centre, semi_axes, head_rotation)
    head_r = head_r * (1 + 0.04 * _smooth_field(coords, rng, 6, (80, 200)))
    grey_inner = _GREY_INNER + 0.06 * _smooth_field(coords, rng, 10, (18, 40))
    texture = 1 + 0.03 * _smooth_field(coords, rng, 10, (8, 20))

    tissue = np.full(shape, _INTENSITY["air"], dtype=np.float32)
    tissue[head_r <= 1.0] = _INTENSITY["scalp"]
    tissue[head_r <= _SKULL_OUTER] = _INTENSITY["skull"]
    tissue[head_r <= _CSF_OUTER] = _INTENSITY["csf"]
    brain = head_r <= _BRAIN_OUTER
    tissue[brain] = _INTENSITY["grey"]
    tissue[brain & (head_r <= grey_inner)] = _INTENSITY["white"]
    for side in (-1, 1):
        ventricle = _ellipsoid_radius(coords, head_centre + head_rotation @ [side * 11, 0, 4], np.array([6.0, 22.0, 12.0]), head_rotation)
        tissue[ventricle <= 1] = _INTENSITY["csf"]
    tissue = tissue * texture

    mask = np.zeros(shape, dtype=np.uint8)
    if rng.random() < profile.tumour_prevalence:
        radius = rng.uniform(*profile.tumour_radius_mm)
        direction = rng.normal(size=3)
        centre = head_centre + 0.55 * semi_axes * rng.uniform() ** (1 / 3) * direction / np.linalg.norm(direction)
        z_limit = max(0.0, (n_z - 1) / 2 * s_z - 0.5 * radius)
        centre[2] = np.clip(centre[2], -z_limit, z_limit)
        tumour_axes = radius * rng.uniform(0.75, 1.25, size=3)
        tumour_rotation = Rotation.from_euler("zyx", rng.uniform(-180, 180, size=3), degrees=True).as_matrix()
        tumour_r = _ellipsoid_radius(coords, centre, tumour_axes, tumour_rotation)
        tumour_r = tumour_r * (1 + 0.12 * _smooth_field(coords, rng, 6, (15, 40)))
        heterogeneity = 1 + 0.08 * _smooth_field(coords, rng, 6, (6, 15))
        oedema = brain & (tumour_r <= 1.4)
        tumour = brain & (tumour_r <= 1.0)
        tissue[oedema] = _INTENSITY["oedema"] * texture[oedema]
        tissue[tumour] = _INTENSITY["tumour"] * heterogeneity[tumour]
        mask[tumour] = 1

    tissue = gaussian_filter(tissue, sigma=(0.35, 0.5, 0.5))
    signal = np.clip(tissue, 0, None) ** profile.contrast_gamma
    signal = signal * np.exp(profile.bias_field_strength * _smooth_field(coords, rng, 4, (250, 500)))
    real_noise = profile.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    imaginary_noise = profile.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt((signal + real_noise) ** 2 + imaginary_noise**2)
    image = np.clip(magnitude * profile.intensity_scale + profile.intensity_offset, *profile.stored_range)
    return PhantomCase(
        image=image.astype(np.float32),
        mask=mask,
        spacing=(float(s_z), float(s_y), float(s_x)),
        origin=tuple(float(v) for v in origin),
        metadata={
            "site": profile.name,
            "manufacturer": profile.manufacturer,
            "model_name": profile.model_name,
            "field_strength_t": profile.field_strength_t,
            "tumour_voxels": int(mask.sum()),
        },
    )


def generate_case(profile: ScannerProfile, rng: np.random.Generator) -> PhantomCase:
    """One study as the profile's scanner would acquire it; image values are in scanner units
    and already clipped to what the profile's DICOM storage can hold."""
    return _render(profile, profile.shape, profile.spacing, rng)


def synthetic_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A plausible (image, mask) of any shape/spacing, for mock assets that must match a real
    site's schema without containing any of its pixels."""
    case = _render(GENERIC_PROFILE, tuple(int(n) for n in shape), tuple(float(s) for s in spacing), rng)
    return case.image, case.mask


def _uid(rng: np.random.Generator) -> str:
    """A UID that is random per study but reproducible for a seed."""
    return generate_uid(entropy_srcs=[rng.bytes(16).hex()])


def _random_date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    start = dt.date(first_year, 1, 1)
    days = (dt.date(last_year, 12, 31) - start).days
    return (start + dt.timedelta(days=int(rng.integers(0, days + 1)))).strftime("%Y%m%d")


def _slice_positions(case: PhantomCase) -> list[list[float]]:
    """ImagePositionPatient of every slice: origin plus k slice steps along the slice normal."""
    direction = np.array(case.direction).reshape(3, 3)
    return [list(np.array(case.origin) + direction[:, 2] * case.spacing[0] * k) for k in range(case.image.shape[0])]


def write_dicom_series(case: PhantomCase, profile: ScannerProfile, out_dir: str | Path, patient_name: str, patient_id: str, rng: np.random.Generator) -> list[Path]:
    """One MR Image Storage file per slice, named randomly as PACS exports often are, so that a
    reader has to order slices by ImagePositionPatient rather than by file name.

    Returns the paths in slice order (k = 0 first)."""
    low, high = profile.stored_range
    if case.image.min() < low - profile.rescale_slope or case.image.max() > high + profile.rescale_slope:
        raise ValueError(
            f"image values {case.image.min():.1f}..{case.image.max():.1f} do not fit {profile.name}'s storage "
            f"{low:.1f}..{high:.1f}; generate the case with the same profile"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint((case.image - profile.rescale_intercept) / profile.rescale_slope), 0, 2**profile.bits_stored - 1).astype(np.uint16)
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    birth_date = _random_date(rng, 1940, 2000)
    study_date = _random_date(rng, 2019, 2024)
    sex = "F" if rng.random() < 0.5 else "M"
    row_direction = list(np.array(case.direction).reshape(3, 3)[:, 0])
    column_direction = list(np.array(case.direction).reshape(3, 3)[:, 1])
    spacing_z, spacing_y, spacing_x = case.spacing

    paths = []
    for k, position in enumerate(_slice_positions(case)):
        sop_uid = _uid(rng)
        ds = Dataset()
        ds.file_meta = file_meta(MRImageStorage, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber = patient_id[-16:]
        ds.Modality = "MR"
        ds.Manufacturer = profile.manufacturer
        ds.InstitutionName = profile.institution_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MR BRAIN"
        ds.SeriesDescription = profile.series_description
        ds.ManufacturerModelName = profile.model_name
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth_date
        ds.PatientSex = sex
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = ["SE", "IR"]
        ds.SequenceVariant = ["SK", "OSP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = ds.SpacingBetweenSlices = DSfloat(spacing_z, auto_format=True)
        ds.RepetitionTime = profile.repetition_time_ms
        ds.EchoTime = profile.echo_time_ms
        ds.InversionTime = 2500.0
        ds.MagneticFieldStrength = profile.field_strength_t
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in row_direction + column_direction]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(float(position[2]), 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.PixelSpacing = [DSfloat(spacing_y, auto_format=True), DSfloat(spacing_x, auto_format=True)]
        ds.BitsAllocated = 16
        ds.BitsStored = profile.bits_stored
        ds.HighBit = profile.bits_stored - 1
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = profile.rescale_intercept
        ds.RescaleSlope = profile.rescale_slope
        ds.RescaleType = "US"
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"IM_{rng.bytes(6).hex().upper()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti_mask(case: PhantomCase, path: str | Path) -> Path:
    """The tumour mask as NIfTI with the series' geometry, so a reader can verify alignment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(case.mask.astype(np.uint8))
    image.SetSpacing(tuple(reversed(case.spacing)))
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    sitk.WriteImage(image, str(path))
    return path


def write_rtstruct(case: PhantomCase, series_files: list[Path], path: str | Path) -> Path:
    """An RT Structure Set with one ROI "GTV" outlining `case.mask` on the given series.

    Slices are matched to files by ImagePositionPatient, not by list order. A case without a
    tumour still gets the ROI, with no contours, as planning systems write it.
    """
    headers = [pydicom.dcmread(file, stop_before_pixels=True) for file in series_files]
    gtv = Structure("GTV", case.mask, (255, 0, 0), "GTV")
    return write_structure_set(headers, [gtv], path, label="GTV", description="Tumour outline", series_number=99)


def fresh_case_dir(case_dir: Path, overwrite: bool) -> Path:
    """`case_dir`, emptied if `overwrite`, refused if it exists otherwise: stale randomly named
    slices left in it would silently join a series."""
    if case_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{case_dir} already exists; choose an empty out_dir or pass overwrite=True")
        shutil.rmtree(case_dir)
    return case_dir


def write_phantom_site(
    profile: str | ScannerProfile,
    out_dir: str | Path,
    n_cases: int,
    seed: int,
    mask_format: str = "rtstruct",
    overwrite: bool = False,
) -> list[Path]:
    """A hospital's export folder: `<case_id>/image/*.dcm` plus `<case_id>/mask/RS.dcm` or
    `<case_id>/mask.nii.gz`.

    Case i depends only on (seed, i), so a bigger site with the same seed starts with the same
    cases. Existing case folders are refused unless `overwrite` (then only those are replaced),
    because stale randomly named slices would silently join a series.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown scanner profile {profile!r}; known: {sorted(PROFILES)}")
        profile = PROFILES[profile]
    if mask_format not in ("rtstruct", "nifti"):
        raise ValueError(f"mask_format must be 'rtstruct' or 'nifti', got {mask_format!r}")
    out_dir = Path(out_dir)
    case_seeds = np.random.SeedSequence(seed).spawn(n_cases)
    case_dirs = []
    for i in tqdm(range(n_cases), desc=f"phantom {profile.name}", unit="case", disable=n_cases < PROGRESS_FROM_CASES):
        case_id = f"{profile.name}-{i + 1:04d}"
        case_dir = fresh_case_dir(out_dir / case_id, overwrite)
        rng = np.random.default_rng(case_seeds[i])
        case = generate_case(profile, rng)
        series = write_dicom_series(case, profile, case_dir / "image", f"PHANTOM^{case_id}", case_id, rng)
        if mask_format == "rtstruct":
            write_rtstruct(case, series, case_dir / "mask" / "RS.dcm")
        else:
            write_nifti_mask(case, case_dir / "mask.nii.gz")
        case_dirs.append(case_dir)
    return case_dirs
