"""Scanner profiles: what makes one hospital's brain MR look different from another's.

A federated model has to cope with sites whose scanners disagree on intensity scale, contrast,
bias field, noise, resolution and tumour case-mix. Each profile fixes those knobs for one
synthetic hospital so that tests and benchmarks see a realistic, reproducible domain shift.

Intensities are described in "tissue units" (white matter ~0.45, tumour ~0.95) before the
scanner's own `intensity_scale`/`intensity_offset` turn them into scanner units; `noise_sigma`
is in tissue units too, so it is comparable between profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ScannerProfile:
    name: str
    manufacturer: str
    model_name: str
    institution_name: str
    field_strength_t: float
    intensity_scale: float
    intensity_offset: float
    contrast_gamma: float
    bias_field_strength: float
    noise_sigma: float
    pixel_spacing_mm: float
    slice_thickness_mm: float
    matrix: int
    n_slices: int
    tumour_prevalence: float
    tumour_radius_mm: tuple[float, float]
    bits_stored: int = 12
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    echo_time_ms: float = 90.0
    repetition_time_ms: float = 9000.0
    series_description: str = "AX T2 FLAIR"

    def __post_init__(self) -> None:
        if not 0.0 <= self.tumour_prevalence <= 1.0:
            raise ValueError(f"{self.name}: tumour_prevalence must be in [0, 1], got {self.tumour_prevalence}")
        low, high = self.tumour_radius_mm
        if not 0 < low <= high:
            raise ValueError(f"{self.name}: tumour_radius_mm must be (min, max) with 0 < min <= max, got {self.tumour_radius_mm}")
        if not 8 <= self.bits_stored <= 16:
            raise ValueError(f"{self.name}: bits_stored must be 8..16 (BitsAllocated is 16), got {self.bits_stored}")
        if self.rescale_slope <= 0:
            raise ValueError(f"{self.name}: rescale_slope must be positive, got {self.rescale_slope}")
        if self.matrix < 8 or self.n_slices < 1:
            raise ValueError(f"{self.name}: matrix must be >= 8 and n_slices >= 1, got {self.matrix}, {self.n_slices}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape in array order (z, y, x)."""
        return (self.n_slices, self.matrix, self.matrix)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm, array order (z, y, x)."""
        return (self.slice_thickness_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    @property
    def stored_range(self) -> tuple[float, float]:
        """Lowest and highest scanner value the DICOM storage (bits, slope, intercept) can hold."""
        return (self.rescale_intercept, self.rescale_intercept + self.rescale_slope * (2**self.bits_stored - 1))

    def with_size(self, matrix: int | None = None, n_slices: int | None = None) -> ScannerProfile:
        """Same scanner and field of view, different sampling: benchmarks need bigger volumes,
        tests need tiny ones, and the anatomy should stay comparable between the two."""
        matrix = self.matrix if matrix is None else matrix
        n_slices = self.n_slices if n_slices is None else n_slices
        return replace(
            self,
            matrix=matrix,
            n_slices=n_slices,
            pixel_spacing_mm=self.pixel_spacing_mm * self.matrix / matrix,
            slice_thickness_mm=self.slice_thickness_mm * self.n_slices / n_slices,
        )

    def scaled(self, factor: float) -> ScannerProfile:
        """Multiply matrix and slice count by `factor`, keeping the field of view."""
        return self.with_size(matrix=max(8, round(self.matrix * factor)), n_slices=max(1, round(self.n_slices * factor)))


PROFILES: dict[str, ScannerProfile] = {
    profile.name: profile
    for profile in (
        ScannerProfile(
            name="hospital-a",
            manufacturer="SIEMENS",
            model_name="MAGNETOM Skyra",
            institution_name="Hospital A University Medical Center",
            field_strength_t=3.0,
            intensity_scale=1000.0,
            intensity_offset=0.0,
            contrast_gamma=1.0,
            bias_field_strength=0.10,
            noise_sigma=0.02,
            pixel_spacing_mm=3.2,
            slice_thickness_mm=4.0,
            matrix=64,
            n_slices=24,
            tumour_prevalence=0.6,
            tumour_radius_mm=(12.0, 24.0),
            bits_stored=12,
            echo_time_ms=81.0,
            repetition_time_ms=9000.0,
            series_description="t2_tirm_tra_dark-fluid",
        ),
        # Philips stores a rescaled integer (RescaleSlope != 1) and shows a strong bias field.
        ScannerProfile(
            name="hospital-b",
            manufacturer="Philips Medical Systems",
            model_name="Ingenia",
            institution_name="Hospital B General",
            field_strength_t=1.5,
            intensity_scale=1400.0,
            intensity_offset=150.0,
            contrast_gamma=1.1,
            bias_field_strength=0.35,
            noise_sigma=0.03,
            pixel_spacing_mm=3.6,
            slice_thickness_mm=5.0,
            matrix=64,
            n_slices=20,
            tumour_prevalence=0.5,
            tumour_radius_mm=(12.0, 24.0),
            bits_stored=12,
            rescale_slope=1.6,
            rescale_intercept=0.0,
            echo_time_ms=125.0,
            repetition_time_ms=11000.0,
            series_description="FLAIR_TRA",
        ),
        # The outlier: much larger scale, flattened contrast, most noise, thickest slices, and a
        # 60-voxel matrix that the U-Net's multiple-of-8 rule forces to be padded.
        ScannerProfile(
            name="hospital-c",
            manufacturer="GE MEDICAL SYSTEMS",
            model_name="SIGNA Explorer",
            institution_name="Hospital C Regional",
            field_strength_t=1.5,
            intensity_scale=3200.0,
            intensity_offset=0.0,
            contrast_gamma=0.6,
            bias_field_strength=0.15,
            noise_sigma=0.08,
            pixel_spacing_mm=3.8,
            slice_thickness_mm=6.0,
            matrix=60,
            n_slices=16,
            tumour_prevalence=0.4,
            tumour_radius_mm=(14.0, 28.0),
            bits_stored=16,
            echo_time_ms=140.0,
            repetition_time_ms=9500.0,
            series_description="Ax T2 FLAIR",
        ),
    )
}
