"""Tumour segmentation on axial MR slices (brain phantoms, limb sarcoma): the first federated domain.

`DOMAIN` is what the orchestrator uses (see `domains.domain.Domain`); the modules below are the
pieces it is built from, public so that demos and benchmarks can reuse them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from domains.brain_mr_segmentation.augmentation import DEFAULT_AUGMENTATION, ScannerAugmentation, augment_slices, intensity_transforms
from domains.brain_mr_segmentation.cases import (
    SiteSlices, check_segmentation_case, fit_centre, foreground_mask, normalise_volume, preprocessed_cases, site_slices, slices_for_training,
    training_size,
)
from domains.brain_mr_segmentation.loss import dice_bce_loss, soft_dice_loss
from domains.brain_mr_segmentation.metrics import EVALUATION_BOUNDS, EVALUATION_SCALARS, add_counts, case_counts, metrics_from_counts
from domains.segmentation_metrics import confusion_counts, hd95_counts, hd95_mm
from domains.brain_mr_segmentation.mock_cases import mock_cases
from domains.brain_mr_segmentation.phantom import PhantomCase, generate_case, synthetic_case, write_dicom_series, write_nifti_mask, write_phantom_site, write_rtstruct
from domains.brain_mr_segmentation.preprocessing import DEFAULT_SETTINGS, PreprocessedCase, PreprocessingSettings, preprocess_case
from domains.brain_mr_segmentation.scanner_profiles import PROFILES, ScannerProfile
from domains.brain_mr_segmentation.unet2d import UNet2D
from domains.shuffled_batches import balanced_batches

__all__ = [
    "DEFAULT_AUGMENTATION",
    "DEFAULT_FOREGROUND_PRIOR",
    "DEFAULT_SETTINGS",
    "DOMAIN",
    "PRIOR_RANGE",
    "PROFILES",
    "BrainMRSegmentation",
    "PhantomCase",
    "PreprocessedCase",
    "PreprocessingSettings",
    "ScannerAugmentation",
    "ScannerProfile",
    "SiteSlices",
    "UNet2D",
    "add_counts",
    "augment_slices",
    "case_counts",
    "check_segmentation_case",
    "confusion_counts",
    "dice_bce_loss",
    "fit_centre",
    "foreground_mask",
    "generate_case",
    "hd95_counts",
    "hd95_mm",
    "intensity_transforms",
    "metrics_from_counts",
    "mock_cases",
    "normalise_volume",
    "preprocess_case",
    "preprocessed_cases",
    "site_slices",
    "slices_for_training",
    "soft_dice_loss",
    "synthetic_case",
    "training_size",
    "write_dicom_series",
    "write_nifti_mask",
    "write_phantom_site",
    "write_rtstruct",
]

# Output-bias prior when the federation has no data estimate (`foreground_counts` pooled over
# sites -> `prior_from_counts` -> `build_model`). Phantom tumours fill ~0.5 % of the cropped
# voxels, limb sarcomas 0.7-18 %: 0.1 lies within that span and is what this domain has always used.
DEFAULT_FOREGROUND_PRIOR = 0.1
PRIOR_RANGE = (1e-3, 0.5)


class BrainMRSegmentation:
    """2D U-Net (GroupNorm) on preprocessed axial slices (`preprocessing.py`), trained with Dice +
    BCE on class-balanced slices with scanner augmentation (`augmentation.py`; None trains on the
    slices as they are), evaluated voxel-wise on the original grid of each case (what
    preprocessing cropped, resampled or padded is mapped back and never counted twice)."""

    name = "brain_mr_segmentation"
    evaluation_scalars = EVALUATION_SCALARS
    evaluation_bounds = EVALUATION_BOUNDS  # what one case adds to each count at most (noised evaluations)
    primary_metric = "dice"
    higher_is_better = True

    def __init__(self, base_channels: int = 8, eval_batch_size: int = 32, preprocessing: PreprocessingSettings = DEFAULT_SETTINGS,
                 augmentation: ScannerAugmentation | None = DEFAULT_AUGMENTATION) -> None:
        self.base_channels = base_channels
        self.eval_batch_size = eval_batch_size
        self.preprocessing = preprocessing
        self.augmentation = augmentation

    def build_model(self, foreground_fraction: float | None = None) -> torch.nn.Module:
        """U-Net whose output bias starts at the logit of the tumour share of voxels
        (`foreground_fraction`, from `prior_from_counts` of the sites' `foreground_counts`;
        `DEFAULT_FOREGROUND_PRIOR` without one). Starting from "tumour everywhere" (bias 0) makes
        the first steps unlearn it, and a prior far below the data's share ("~1 %" where tumour
        fills up to 18 % of limb-MR voxels) starts every method at Dice 0 in short rounds."""
        fraction = DEFAULT_FOREGROUND_PRIOR if foreground_fraction is None else float(foreground_fraction)
        fraction = min(max(fraction, PRIOR_RANGE[0]), PRIOR_RANGE[1])
        model = UNet2D(in_channels=1, out_channels=1, base_channels=self.base_channels)
        torch.nn.init.constant_(model.head.bias, math.log(fraction / (1 - fraction)))
        return model

    def foreground_counts(self, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Additive integers behind the output-bias prior: tumour voxels and all voxels of the
        site's preprocessed (foreground-cropped) cases, read one case at a time. Summed over sites
        they give the federation's prior (`prior_from_counts`)."""
        tumour = voxels = 0
        for case in cases:
            check_segmentation_case(case)
            mask = preprocess_case(case, self.preprocessing).mask
            tumour += int(np.count_nonzero(mask))
            voxels += int(mask.size)
        return {"tumour_voxels": tumour, "voxels": voxels}

    @staticmethod
    def prior_from_counts(counts: dict[str, int]) -> float:
        """The tumour share of voxels from (pooled) `foreground_counts`."""
        return DEFAULT_FOREGROUND_PRIOR if not counts.get("voxels") else int(counts["tumour_voxels"]) / int(counts["voxels"])

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(logits, target)

    def batches(self, cases: Sequence[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of preprocessed slices, x and y both [B, 1, H, W], as many as the site has
        slices, at least half of them holding tumour when the site has any (`balanced_batches`),
        each batch augmented (`augment_slices`) unless the domain was built without; the last batch
        may be smaller."""
        slices = site_slices(preprocessed_cases(cases, self.preprocessing))
        batches = balanced_batches(slices.x, slices.y, slices.has_tumour, batch_size, rng)
        if self.augmentation is None:
            return batches
        intensity = intensity_transforms(self.augmentation)
        return (augment_slices(x, y, rng, self.augmentation, intensity) for x, y in batches)

    def without_augmentation(self) -> BrainMRSegmentation:
        """The same domain training on the slices as they are (the harmonization experiment's baseline)."""
        return BrainMRSegmentation(self.base_channels, self.eval_batch_size, self.preprocessing, augmentation=None)

    def training_samples(self, cases: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Every preprocessed slice of `cases` exactly once, x and y float32 [N, 1, H, W]: what
        DP-SGD samples from, one slice being one unit of privacy (`batches` repeats tumour slices
        to balance the classes, which would let one slice count several times)."""
        slices = site_slices(preprocessed_cases(cases, self.preprocessing))
        return slices.x, slices.y

    def augmented(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `training_samples` augmented as `batches` augments its batches: each slice is
        transformed on its own (one random draw for the batch, no slice's values reaching another)."""
        if self.augmentation is None:
            return x, y
        return augment_slices(x, y, rng, self.augmentation)

    def predict_probabilities(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """Tumour probability float32 [Z, Y, X] on the case's own grid; 0 where preprocessing
        cropped the case (air)."""
        processed = preprocess_case(case, self.preprocessing)
        size = training_size([processed])
        x = fit_centre(processed.image, size, fill=float(processed.image.min()))[:, None].astype(np.float32)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = [model(torch.from_numpy(x[i : i + self.eval_batch_size]).to(device)).cpu() for i in range(0, len(x), self.eval_batch_size)]
        finally:
            model.train(was_training)
        probabilities = torch.sigmoid(torch.cat(logits)[:, 0]).numpy()
        return processed.to_original_grid(fit_centre(probabilities, processed.image.shape[1:], fill=0.0))

    def predict_mask(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """Binary tumour mask uint8 [Z, Y, X] on the case's own grid (p > 0.5)."""
        return (self.predict_probabilities(model, case) > 0.5).astype(np.uint8)

    def evaluation_counts(self, model: torch.nn.Module, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Voxel confusion counts, HD95 sums and per-case metric sums over all cases (`metrics`),
        one case in memory at a time."""
        per_case = []
        for case in cases:
            check_segmentation_case(case)
            per_case.append(case_counts(self.predict_mask(model, case), case["mask"], case["spacing"]))
        return add_counts(*per_case)

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        return metrics_from_counts(counts)

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        return mock_cases(templates, seed)


DOMAIN = BrainMRSegmentation()
