"""The paired-contrast hospitals: a scanner (`brain_mr_segmentation.scanner_profiles`) and how pure
its T1 and T2 weightings are.

Translation across institutions has to cope with more than the scanner's scale, bias field, noise
and resolution: each hospital's protocol (TE, TR, flip angle) mixes some proton-density weighting
into its T1 and T2 images, so the same tissue pair maps to different intensity pairs at different
sites. `t1_weighting` and `t2_weighting` (1 = the pure contrast of `contrasts.TISSUE_SIGNAL`, lower
= blended towards proton density) are that knob. Four hospitals, so that one can be held out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from domains.brain_mr_segmentation.scanner_profiles import PROFILES as SCANNERS
from domains.brain_mr_segmentation.scanner_profiles import ScannerProfile


@dataclass(frozen=True)
class PairedProfile:
    """One hospital's scanner and its T1/T2 protocol (echo and repetition times go into the DICOM)."""

    scanner: ScannerProfile
    t1_weighting: float
    t2_weighting: float
    t1_echo_repetition_ms: tuple[float, float] = (2.5, 1900.0)
    t2_echo_repetition_ms: tuple[float, float] = (95.0, 5000.0)

    def __post_init__(self) -> None:
        for name in ("t1_weighting", "t2_weighting"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{self.scanner.name}: {name} must be in [0, 1] (1 = pure contrast), got {getattr(self, name)}")

    @property
    def name(self) -> str:
        return self.scanner.name

    def with_size(self, matrix: int | None = None, n_slices: int | None = None) -> PairedProfile:
        """Same hospital and field of view, other sampling (tests need tiny volumes)."""
        return replace(self, scanner=self.scanner.with_size(matrix, n_slices))


# A fourth scanner beside the segmentation fleet's three: a mid-field Canon with its own scale and
# offset, a 56-voxel matrix and a strong blend towards proton density in its T1.
_HOSPITAL_D = ScannerProfile(
    name="hospital-d",
    manufacturer="CANON_MEC",
    model_name="Vantage Orian",
    institution_name="Hospital D Teaching Hospital",
    field_strength_t=1.5,
    intensity_scale=2000.0,
    intensity_offset=50.0,
    contrast_gamma=0.85,
    bias_field_strength=0.25,
    noise_sigma=0.05,
    pixel_spacing_mm=4.0,
    slice_thickness_mm=5.0,
    matrix=56,
    n_slices=18,
    tumour_prevalence=0.5,
    tumour_radius_mm=(12.0, 24.0),
    bits_stored=12,
)

PROFILES: dict[str, PairedProfile] = {
    profile.name: profile
    for profile in (
        PairedProfile(SCANNERS["hospital-a"], t1_weighting=1.0, t2_weighting=1.0),
        PairedProfile(SCANNERS["hospital-b"], t1_weighting=0.85, t2_weighting=0.9, t2_echo_repetition_ms=(80.0, 4000.0)),
        PairedProfile(SCANNERS["hospital-c"], t1_weighting=0.9, t2_weighting=0.7, t1_echo_repetition_ms=(3.0, 2200.0),
                      t2_echo_repetition_ms=(70.0, 3500.0)),
        PairedProfile(_HOSPITAL_D, t1_weighting=0.7, t2_weighting=0.95, t1_echo_repetition_ms=(4.0, 600.0)),
    )
}
