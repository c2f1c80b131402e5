"""Paired T1/T2 brain phantoms, filed as a hospital exports them: two MR series of one study.

Translation needs both contrasts of the same head on the same grid, which a hospital stores as two
series (SeriesDescription "T1" and "T2") sharing a study and a FrameOfReferenceUID. Ingestion with
`--primary-series-description T1` then makes T1 the case's image and T2 its further image
`images["T2"]`. Each case also carries the tumour outline (an RTSTRUCT on the T1 series, or a NIfTI
mask), because ingestion accepts a series only with a mask.

The series are written by the segmentation phantom's writer (`write_dicom_series`), which gives
each series its own study; the T2 series is then re-stamped into the T1 series' study and frame
of reference, with sequence tags matching its contrast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from tqdm import tqdm

from domains.brain_mr_segmentation.phantom import (
    IDENTITY_DIRECTION, PhantomCase, fresh_case_dir, write_dicom_series, write_nifti_mask, write_rtstruct,
)
from domains.case_record import make_case_record
from domains.mr_translation.anatomy import draw_anatomy, smooth_field
from domains.mr_translation.contrasts import render_contrast, tissue_signal
from domains.mr_translation.sites import PROFILES, PairedProfile

PROGRESS_FROM_CASES = 20
TARGET_KEY = "T2"  # the further image's key after ingestion with --primary-series-description T1
# Study-level tags the T2 series takes over from the T1 series: one patient, one session, one frame.
_SHARED_TAGS = ("StudyInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                "StudyTime", "SeriesTime", "PatientBirthDate", "PatientSex", "AccessionNumber")


@dataclass
class PairedPhantom:
    """One synthetic study in both contrasts, scanner units, on one grid: `spacing` (z, y, x) mm,
    `origin` and `direction` in patient order as DICOM states them."""

    t1: np.ndarray
    t2: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_record(self, case_id: str) -> dict[str, Any]:
        """The case record ingestion makes of it: image = T1, images["T2"], the tumour mask."""
        return make_case_record(case_id, self.t1, self.mask, self.spacing, self.origin, self.direction, self.metadata,
                                images={TARGET_KEY: self.t2})

    def series(self, contrast: str) -> PhantomCase:
        """One contrast as the segmentation phantom's case, which its DICOM and mask writers take."""
        image = {"T1": self.t1, "T2": self.t2}[contrast]
        return PhantomCase(image=image, mask=self.mask, spacing=self.spacing, origin=self.origin,
                           direction=self.direction, metadata=self.metadata)


def render_pair(profile: PairedProfile, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                rng: np.random.Generator) -> PairedPhantom:
    """Both contrasts of one head at any grid (mock cases copy a template's grid)."""
    scanner = profile.scanner
    anatomy = draw_anatomy(shape, spacing, rng, scanner.tumour_prevalence, scanner.tumour_radius_mm)
    bias_field = np.exp(scanner.bias_field_strength * smooth_field(anatomy.coordinates, rng, 4, (250, 500)))
    t1 = render_contrast(anatomy, tissue_signal("T1", profile.t1_weighting), bias_field, scanner, rng)
    t2 = render_contrast(anatomy, tissue_signal("T2", profile.t2_weighting), bias_field, scanner, rng)
    return PairedPhantom(
        t1=t1, t2=t2, mask=anatomy.mask, spacing=anatomy.spacing, origin=anatomy.origin,
        metadata={"site": scanner.name, "manufacturer": scanner.manufacturer, "model_name": scanner.model_name,
                  "field_strength_t": scanner.field_strength_t, "tumour_voxels": int(anatomy.mask.sum())},
    )


def generate_pair(profile: str | PairedProfile, rng: np.random.Generator) -> PairedPhantom:
    """One study as the hospital's scanner and protocol acquire it, in scanner units."""
    profile = _profile(profile)
    return render_pair(profile, profile.scanner.shape, profile.scanner.spacing, rng)


def _profile(profile: str | PairedProfile) -> PairedProfile:
    if isinstance(profile, PairedProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown paired-contrast hospital {profile!r}; known: {sorted(PROFILES)}")
    return PROFILES[profile]


def _restamp(files: list[Path], study: pydicom.Dataset | None, series_number: int, sequence: list[str]) -> None:
    """Put a written series into `study`'s study and frame (None: keep its own) with its contrast's
    sequence tags: the segmentation writer stamps every series as an inversion-recovery FLAIR."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in _SHARED_TAGS if study is not None else ():
            setattr(ds, keyword, study.get(keyword))
        ds.SeriesNumber = series_number
        ds.ScanningSequence = sequence
        del ds.InversionTime
        ds.save_as(path, enforce_file_format=True)


def write_case(pair: PairedPhantom, profile: PairedProfile, case_dir: Path, case_id: str, rng: np.random.Generator,
               mask_format: str = "rtstruct") -> dict[str, list[Path]]:
    """`case_dir/T1/*.dcm`, `case_dir/T2/*.dcm` (one study, one frame of reference) and the mask:
    `case_dir/mask/RS.dcm` (RTSTRUCT on the T1 series) or `case_dir/mask.nii.gz`."""
    if mask_format not in ("rtstruct", "nifti"):
        raise ValueError(f"mask_format must be 'rtstruct' or 'nifti', got {mask_format!r}")
    written: dict[str, list[Path]] = {}
    study = None
    for number, (contrast, (echo, repetition), sequence) in enumerate((
        ("T1", profile.t1_echo_repetition_ms, ["GR"]),
        ("T2", profile.t2_echo_repetition_ms, ["SE"]),
    ), start=3):
        scanner = replace(profile.scanner, series_description=contrast, echo_time_ms=echo, repetition_time_ms=repetition)
        files = write_dicom_series(pair.series(contrast), scanner, case_dir / contrast, f"PHANTOM^{case_id}", case_id, rng)
        _restamp(files, study, number, sequence)
        study = study or pydicom.dcmread(files[0], stop_before_pixels=True)
        written[contrast] = files
    if mask_format == "rtstruct":
        written["mask"] = [write_rtstruct(pair.series("T1"), written["T1"], case_dir / "mask" / "RS.dcm")]
    else:
        written["mask"] = [write_nifti_mask(pair.series("T1"), case_dir / "mask.nii.gz")]
    return written


def write_phantom_site(profile: str | PairedProfile, out_dir: str | Path, n_cases: int, seed: int,
                       mask_format: str = "rtstruct", overwrite: bool = False,
                       matrix: int | None = None, n_slices: int | None = None) -> list[Path]:
    """A hospital's export folder of paired cases, `<case_id>/{T1,T2}/*.dcm` plus the mask.

    `matrix` and `n_slices` resample the hospital's field of view (small for quick tests). Case i
    depends only on (seed, i), so a bigger site with the same seed starts with the same cases.
    Existing case folders are refused unless `overwrite` (then only those are replaced), because
    stale randomly named slices would silently join a series."""
    profile = _profile(profile)
    if matrix is not None or n_slices is not None:
        profile = profile.with_size(matrix, n_slices)
    out_dir = Path(out_dir)
    case_seeds = np.random.SeedSequence(seed).spawn(n_cases)
    case_dirs = []
    for i in tqdm(range(n_cases), desc=f"paired phantom {profile.name}", unit="case", disable=n_cases < PROGRESS_FROM_CASES):
        case_id = f"{profile.name}-{i + 1:04d}"
        case_dir = fresh_case_dir(out_dir / case_id, overwrite)
        rng = np.random.default_rng(case_seeds[i])
        write_case(generate_pair(profile, rng), profile, case_dir, case_id, rng, mask_format)
        case_dirs.append(case_dir)
    return case_dirs


def phantom_records(profile: str | PairedProfile, n_cases: int, seed: int, matrix: int | None = None,
                    n_slices: int | None = None) -> list[dict[str, Any]]:
    """The case records a site would hold after ingesting `write_phantom_site`'s export, made in
    memory (same anatomy and contrasts, no DICOM round trip): for training tests and benchmarks."""
    profile = _profile(profile)
    if matrix is not None or n_slices is not None:
        profile = profile.with_size(matrix, n_slices)
    case_seeds = np.random.SeedSequence(seed).spawn(n_cases)
    return [generate_pair(profile, np.random.default_rng(case_seeds[i])).as_record(f"{profile.name}-{i + 1:04d}")
            for i in range(n_cases)]
