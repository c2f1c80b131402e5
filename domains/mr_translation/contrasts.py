"""T1- and T2-weighted images of one anatomy (`anatomy.Anatomy`), as a hospital's scanner records them.

The tissue signals follow brain MR: on T1 white matter is brighter than grey matter, CSF is dark and
scalp fat bright; on T2 the order flips (CSF brightest, grey above white) and tumour and oedema are
bright. A site's protocol blends each towards proton density (`sites.PairedProfile`), so the
translation a model must learn differs a little between hospitals. Both series of a case share the
coil's bias field (one acquisition session) and get independent Rician noise.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from domains.brain_mr_segmentation.scanner_profiles import ScannerProfile
from domains.mr_translation.anatomy import TISSUES, Anatomy

CONTRASTS = ("T1", "T2")

# Signal per tissue in tissue units, ordered like `anatomy.TISSUES`.
TISSUE_SIGNAL: dict[str, dict[str, float]] = {
    "T1": {"air": 0.0, "scalp": 0.85, "skull": 0.05, "csf": 0.10, "grey": 0.48, "white": 0.70, "oedema": 0.38, "tumour": 0.32},
    "T2": {"air": 0.0, "scalp": 0.40, "skull": 0.04, "csf": 0.95, "grey": 0.62, "white": 0.45, "oedema": 0.82, "tumour": 0.88},
    "PD": {"air": 0.0, "scalp": 0.65, "skull": 0.06, "csf": 0.80, "grey": 0.72, "white": 0.62, "oedema": 0.78, "tumour": 0.80},
}


def tissue_signal(contrast: str, weighting: float) -> np.ndarray:
    """Signal of each tissue (indexed by label) for `contrast` blended towards proton density:
    `weighting` 1 is the pure contrast."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; known: {', '.join(CONTRASTS)}")
    pure, density = TISSUE_SIGNAL[contrast], TISSUE_SIGNAL["PD"]
    return np.array([weighting * pure[t] + (1 - weighting) * density[t] for t in TISSUES], dtype=np.float32)


def render_contrast(anatomy: Anatomy, signal: np.ndarray, bias_field: np.ndarray, scanner: ScannerProfile,
                    rng: np.random.Generator) -> np.ndarray:
    """Scanner units float32 [Z, Y, X]: tissue signal with texture and partial volume, the
    scanner's contrast curve and the session's bias field (a multiplicative field), Rician noise,
    then the vendor's scale and offset, clipped to what its DICOM storage holds."""
    tissue = gaussian_filter(signal[anatomy.labels] * anatomy.texture, sigma=(0.35, 0.5, 0.5))
    clean = np.clip(tissue, 0, None) ** scanner.contrast_gamma * bias_field
    real = clean + scanner.noise_sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    imaginary = scanner.noise_sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    magnitude = np.sqrt(real**2 + imaginary**2)
    return np.clip(magnitude * scanner.intensity_scale + scanner.intensity_offset, *scanner.stored_range).astype(np.float32)
