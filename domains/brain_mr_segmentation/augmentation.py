"""Scanner augmentation: training slices made to look as if another hospital's scanner took them.

Preprocessing removes what it can of a scanner (scale and offset, by z-scoring), but not its
contrast curve, bias field or noise. A model trained at one site then learns that site's look, and
in federated training each site pulls the shared model towards its own: on the phantom fleet FedAvg
fell 0.03 below centralized training, almost all of it at the outlier scanner (hospital-c, which
has a compressed contrast curve and four times the noise). Showing every site random contrast
curves, bias fields, noise and left-right flips teaches each site the same invariances, so their
updates agree. The ranges cover the fleet's scanners (`scanner_profiles.py`) with some margin.

Intensity steps run on each slice scaled to [0, 1] (MONAI's transforms, seeded from the caller's
generator, so a batch is reproducible); each slice then gets its own mean and standard deviation
back, so an augmented slice stays on the scale preprocessing produced. Only training batches are
augmented, never evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from monai.transforms import Compose


@dataclass(frozen=True)
class ScannerAugmentation:
    """Probabilities and ranges, each step drawn independently (per batch, flips per slice).
    `gamma` is the range of the contrast exponent, `bias_coefficients` the range of each
    coefficient of the degree-3 polynomial whose exponential multiplies the slice, `noise_std` the
    largest Gaussian noise standard deviation as a share of the slice's intensity range."""

    gamma_prob: float = 0.5
    gamma: tuple[float, float] = (0.5, 1.6)
    bias_prob: float = 0.5
    bias_coefficients: tuple[float, float] = (-0.3, 0.3)
    noise_prob: float = 0.5
    noise_std: float = 0.08
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("gamma_prob", "bias_prob", "noise_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ScannerAugmentation.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"ScannerAugmentation.gamma must be (low, high) with 0 < low <= high, got {self.gamma}")
        if self.noise_std < 0:
            raise ValueError(f"ScannerAugmentation.noise_std must be >= 0, got {self.noise_std}")


DEFAULT_AUGMENTATION = ScannerAugmentation()


def intensity_transforms(settings: ScannerAugmentation = DEFAULT_AUGMENTATION) -> Compose:
    """The intensity steps of `settings` as one MONAI Compose: build it once per epoch and hand it
    to every `augment_slices` call of that epoch, which reseeds it per batch."""
    from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise

    return Compose([
        RandBiasField(prob=settings.bias_prob, degree=3, coeff_range=settings.bias_coefficients),
        RandAdjustContrast(prob=settings.gamma_prob, gamma=settings.gamma),
        RandGaussianNoise(prob=settings.noise_prob, std=settings.noise_std),
    ])


def augment_slices(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                   settings: ScannerAugmentation = DEFAULT_AUGMENTATION,
                   intensity: Compose | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of slices x and masks y, both [B, 1, H, W], augmented: new tensors, the inputs are
    left as they were. Masks only follow the flips. `intensity` is `intensity_transforms(settings)`,
    built here when not given.

    One draw of contrast curve, bias field and noise level serves the whole batch (its slices are
    the transforms' channels), as one scanner would; flips are drawn per slice. A batch costs three
    transform calls, not three per slice: MONAI's transforms carry metadata on every call (about
    1 ms per call), and switching that off is process-wide, which sites training in threads share."""
    from monai.utils import convert_to_tensor

    if intensity is None:
        intensity = intensity_transforms(settings)
    intensity.set_random_state(seed=int(rng.integers(2**31)))
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - low
    unit = (x - low) / torch.where(span > 0, span, torch.ones_like(span))
    changed = convert_to_tensor(intensity(unit[:, 0]), track_meta=False).to(x.dtype)[:, None]
    augmented = _with_stats_of(changed, x)
    flips = torch.from_numpy(rng.random(len(x)) < settings.flip_prob)
    augmented[flips] = augmented[flips].flip(-1)
    masks = y.clone()
    masks[flips] = masks[flips].flip(-1)
    return augmented, masks


def _with_stats_of(changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Each slice of `changed` shifted and scaled to the mean and standard deviation of the same
    slice of `original` (both [B, 1, H, W]); a slice without spread becomes its original mean."""
    dims = (1, 2, 3)
    spread = changed.std(dim=dims, keepdim=True)
    centred = changed - changed.mean(dim=dims, keepdim=True)
    scaled = centred / torch.where(spread > 0, spread, torch.ones_like(spread))
    return scaled * original.std(dim=dims, keepdim=True) + original.mean(dim=dims, keepdim=True)
