"""CT scanner profiles: what makes one hospital's abdominal CT look different from another's.

A liver model trained across hospitals meets scanners that disagree on sharpness, noise, slice
thickness, pixel size and, above all, on when the images were taken after the contrast injection:
the same liver is ~55 HU without contrast, ~75 HU in the late arterial phase and ~110 HU in the
portal-venous phase, and its lesions can be darker or brighter than it depending on the phase.
Each profile fixes those knobs for one synthetic hospital, with clinically realistic values, so
that tests and simulations see a realistic, reproducible domain shift.

Units: HU for attenuation, mm for lengths, lp/cm for the kernel's MTF50 (the spatial frequency at
which the modulation transfer function falls to 50 %), mGy for CTDIvol, mAs for the tube
current-time product. Enhancement values are those of 120 kVp imaging of an adult.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HU_FLOOR = -1024.0
HU_CEILING = 3071.0
CLINICAL_MATRIX = 512
# sigma (mm) of a Gaussian point-spread function whose MTF halves at 1 lp/mm: MTF(f) = exp(-2 pi^2 sigma^2 f^2).
_GAUSSIAN_SIGMA_AT_MTF50_1_LP_PER_MM = math.sqrt(math.log(2) / (2 * math.pi**2))


@dataclass(frozen=True)
class ContrastPhase:
    """Tissue attenuation (HU) at one time after an intravenous iodine bolus.

    Ranges are (low, high) from which each patient and lesion draws its value: enhancement varies
    with cardiac output, body weight and injection rate, and lesions vary by type.
    """

    name: str
    scan_delay_s: float  # after the start of injection; 0 without contrast
    liver_hu: float
    spleen_hu: float
    spleen_texture_hu: float  # the arterial-phase "moire" spleen is heterogeneous; later phases are uniform
    aorta_hu: float
    ivc_hu: float
    portal_vein_hu: float
    hepatic_vein_hu: float
    heart_hu: float
    kidney_cortex_hu: float
    kidney_medulla_hu: float
    bowel_wall_hu: float
    muscle_hu: float
    hypodense_lesion_hu: tuple[float, float]
    hyperenhancing_lesion_fraction: float  # share of lesions brighter than the liver (hypervascular: HCC, FNH)
    hyperenhancing_lesion_hu: tuple[float, float]

    def __post_init__(self) -> None:
        for field_name in ("hypodense_lesion_hu", "hyperenhancing_lesion_hu"):
            low, high = getattr(self, field_name)
            if low > high:
                raise ValueError(f"{self.name}: {field_name} must be (low, high) with low <= high, got {(low, high)}")
        if not 0.0 <= self.hyperenhancing_lesion_fraction <= 1.0:
            raise ValueError(f"{self.name}: hyperenhancing_lesion_fraction must be in [0, 1], "
                             f"got {self.hyperenhancing_lesion_fraction}")

    @property
    def enhanced(self) -> bool:
        """Whether iodine was injected (the DICOM then names a contrast agent)."""
        return self.scan_delay_s > 0


# Unenhanced: blood (~40 HU) is darker than liver (~55 HU), lesions are faint (cysts and most
# metastases 20-45 HU).
NON_CONTRAST = ContrastPhase(
    name="non-contrast", scan_delay_s=0.0, liver_hu=56.0, spleen_hu=46.0, spleen_texture_hu=3.0,
    aorta_hu=42.0, ivc_hu=40.0, portal_vein_hu=40.0, hepatic_vein_hu=40.0, heart_hu=42.0,
    kidney_cortex_hu=32.0, kidney_medulla_hu=30.0, bowel_wall_hu=35.0, muscle_hu=48.0,
    hypodense_lesion_hu=(20.0, 42.0), hyperenhancing_lesion_fraction=0.0, hyperenhancing_lesion_hu=(42.0, 42.0),
)
# Late arterial (~35 s): aorta 250-350 HU, liver only mildly enhanced (~75 HU, it is fed ~75 % by the
# portal vein, not yet opacified), hepatic veins still unopacified, renal corticomedullary
# differentiation; hypervascular lesions (HCC, FNH, some metastases) outshine the liver.
ARTERIAL = ContrastPhase(
    name="arterial", scan_delay_s=35.0, liver_hu=75.0, spleen_hu=115.0, spleen_texture_hu=22.0,
    aorta_hu=300.0, ivc_hu=95.0, portal_vein_hu=140.0, hepatic_vein_hu=65.0, heart_hu=220.0,
    kidney_cortex_hu=185.0, kidney_medulla_hu=90.0, bowel_wall_hu=70.0, muscle_hu=55.0,
    hypodense_lesion_hu=(35.0, 58.0), hyperenhancing_lesion_fraction=0.4, hyperenhancing_lesion_hu=(110.0, 150.0),
)
# Portal-venous (~70 s): the phase of routine abdominal staging; liver 100-120 HU, portal and
# hepatic veins brighter than the liver, most lesions (metastases, washed-out HCC) hypodense at 40-70 HU.
PORTAL_VENOUS = ContrastPhase(
    name="portal-venous", scan_delay_s=70.0, liver_hu=110.0, spleen_hu=118.0, spleen_texture_hu=4.0,
    aorta_hu=160.0, ivc_hu=140.0, portal_vein_hu=175.0, hepatic_vein_hu=160.0, heart_hu=150.0,
    kidney_cortex_hu=175.0, kidney_medulla_hu=160.0, bowel_wall_hu=90.0, muscle_hu=60.0,
    hypodense_lesion_hu=(40.0, 70.0), hyperenhancing_lesion_fraction=0.0, hyperenhancing_lesion_hu=(70.0, 70.0),
)
PHASES: dict[str, ContrastPhase] = {phase.name: phase for phase in (NON_CONTRAST, ARTERIAL, PORTAL_VENOUS)}


@dataclass(frozen=True)
class CTScannerProfile:
    """One hospital's CT scanner and abdominal protocol.

    `kernel_mtf50_lp_per_cm` is the reconstruction kernel's sharpness as measured on a clinical
    512 x 512 image: ~3.5 lp/cm for smooth body kernels, ~6 lp/cm for sharp ones. The phantom
    renders far fewer pixels, and keeps the kernel's look *in pixels* (see `kernel_sigma_px`):
    a smooth kernel blurs over more pixels and gives coarse, low-frequency noise grain; a sharp
    kernel blurs less and gives fine, high-frequency grain. `noise_sd_hu` is the image noise in a
    uniform region (the liver) at this protocol's dose, slice thickness and kernel.

    Storage: the scanner keeps HU in [-1024, 3071] and stores `HU - rescale_intercept` as integers
    of `bits_stored` bits, unsigned or signed (`pixel_representation` 0 or 1), which vendors choose
    differently.
    """

    name: str
    manufacturer: str
    model_name: str
    institution_name: str
    convolution_kernel: str
    kernel_mtf50_lp_per_cm: float
    noise_sd_hu: float
    ctdi_vol_mgy: float
    exposure_mas: float
    kvp: float
    slice_thickness_mm: float
    reconstruction_fov_mm: float
    contrast: ContrastPhase
    contrast_agent: str
    series_description: str
    rescale_intercept: float = -1024.0
    pixel_representation: int = 0
    bits_stored: int = 12

    def __post_init__(self) -> None:
        positive = ("kernel_mtf50_lp_per_cm", "noise_sd_hu", "ctdi_vol_mgy", "exposure_mas", "kvp",
                    "slice_thickness_mm", "reconstruction_fov_mm")
        for field_name in positive:
            if not getattr(self, field_name) > 0:
                raise ValueError(f"{self.name}: {field_name} must be positive, got {getattr(self, field_name)}")
        if self.contrast.enhanced != bool(self.contrast_agent):
            raise ValueError(f"{self.name}: contrast_agent must name the agent exactly when the phase is enhanced "
                             f"(phase {self.contrast.name!r}, agent {self.contrast_agent!r})")
        if self.pixel_representation not in (0, 1):
            raise ValueError(f"{self.name}: pixel_representation must be 0 (unsigned) or 1 (signed), "
                             f"got {self.pixel_representation}")
        if not 12 <= self.bits_stored <= 16:
            raise ValueError(f"{self.name}: bits_stored must be 12..16 (BitsAllocated is 16), got {self.bits_stored}")
        low, high = self.stored_hu_range
        if low > HU_FLOOR + 100 or high < 1000:
            raise ValueError(f"{self.name}: rescale_intercept {self.rescale_intercept} with {self.bits_stored} "
                             f"{'signed' if self.pixel_representation else 'unsigned'} bits stores only "
                             f"{low:g}..{high:g} HU; air (-1000) and bone (~1000) must fit")

    @property
    def contrast_phase(self) -> str:
        return self.contrast.name

    @property
    def stored_value_range(self) -> tuple[int, int]:
        """The integers the pixel storage can hold."""
        if self.pixel_representation:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def stored_hu_range(self) -> tuple[float, float]:
        """The HU the scanner writes: its reconstruction range cut to what the storage can hold."""
        low, high = self.stored_value_range
        return max(HU_FLOOR, low + self.rescale_intercept), min(HU_CEILING, high + self.rescale_intercept)

    @property
    def kernel_sigma_px(self) -> float:
        """The kernel's Gaussian point-spread sigma in pixels of the clinical 512 x 512 image, which
        the phantom applies in its own pixels so that blur and noise grain keep their clinical look."""
        sigma_mm = _GAUSSIAN_SIGMA_AT_MTF50_1_LP_PER_MM / (self.kernel_mtf50_lp_per_cm / 10.0)
        return sigma_mm / (self.reconstruction_fov_mm / CLINICAL_MATRIX)

    def pixel_spacing_mm(self, matrix: int, fov_mm: float | None = None) -> float:
        """In-plane pixel size of a `matrix` x `matrix` reconstruction of `fov_mm` (default: the
        profile's field of view), rounded to the micrometre as scanners state it."""
        if matrix < 1:
            raise ValueError(f"matrix must be a positive number of pixels, got {matrix}")
        fov = self.reconstruction_fov_mm if fov_mm is None else fov_mm
        if not fov > 0:
            raise ValueError(f"fov_mm must be positive, got {fov_mm}")
        return round(fov / matrix, 6)


PROFILES: dict[str, CTScannerProfile] = {
    profile.name: profile
    for profile in (
        # Routine portal-venous staging at standard dose: medium-smooth kernel, 3 mm slices, low noise.
        CTScannerProfile(
            name="hospital-a",
            manufacturer="SIEMENS",
            model_name="SOMATOM Definition AS",
            institution_name="Hospital A University Medical Center",
            convolution_kernel="B30f",
            kernel_mtf50_lp_per_cm=3.8,
            noise_sd_hu=10.0,
            ctdi_vol_mgy=12.0,
            exposure_mas=170.0,
            kvp=120.0,
            slice_thickness_mm=3.0,
            reconstruction_fov_mm=360.0,
            contrast=PORTAL_VENOUS,
            contrast_agent="ULTRAVIST 370",
            series_description="Abdomen PV 3.0 B30f",
        ),
        # Portal-venous with thick 5 mm slices (least noise per slice, most partial volume), a wide
        # field of view (large pixels) and signed 16-bit storage.
        CTScannerProfile(
            name="hospital-b",
            manufacturer="GE MEDICAL SYSTEMS",
            model_name="LightSpeed VCT",
            institution_name="Hospital B General",
            convolution_kernel="STANDARD",
            kernel_mtf50_lp_per_cm=4.3,
            noise_sd_hu=12.0,
            ctdi_vol_mgy=6.0,
            exposure_mas=85.0,
            kvp=120.0,
            slice_thickness_mm=5.0,
            reconstruction_fov_mm=380.0,
            contrast=PORTAL_VENOUS,
            contrast_agent="OMNIPAQUE 350",
            series_description="PORTAL VENOUS 5mm STND",
            rescale_intercept=-1024.0,
            pixel_representation=1,
            bits_stored=16,
        ),
        # Late arterial liver protocol (HCC surveillance) with a sharp kernel and 2.5 mm slices:
        # the noisiest contrast-enhanced site, and its storage offset is -1000 rather than -1024.
        CTScannerProfile(
            name="hospital-c",
            manufacturer="Philips",
            model_name="Brilliance 64",
            institution_name="Hospital C Regional",
            convolution_kernel="C",
            kernel_mtf50_lp_per_cm=6.2,
            noise_sd_hu=20.0,
            ctdi_vol_mgy=10.0,
            exposure_mas=145.0,
            kvp=120.0,
            slice_thickness_mm=2.5,
            reconstruction_fov_mm=350.0,
            contrast=ARTERIAL,
            contrast_agent="IOMERON 400",
            series_description="Liver arterial 2.5mm C",
            rescale_intercept=-1000.0,
        ),
        # Low-dose unenhanced 100 kVp scan with thin 1.5 mm slices and a soft kernel: coarse,
        # blotchy noise and faint lesions; HU stored as signed integers without offset.
        CTScannerProfile(
            name="hospital-d",
            manufacturer="TOSHIBA",
            model_name="Aquilion",
            institution_name="Hospital D Community",
            convolution_kernel="FC08",
            kernel_mtf50_lp_per_cm=3.3,
            noise_sd_hu=24.0,
            ctdi_vol_mgy=5.0,
            exposure_mas=110.0,
            kvp=100.0,
            slice_thickness_mm=1.5,
            reconstruction_fov_mm=400.0,
            contrast=NON_CONTRAST,
            contrast_agent="",
            series_description="ABD NC 1.5 FC08",
            rescale_intercept=0.0,
            pixel_representation=1,
            bits_stored=16,
        ),
    )
}
