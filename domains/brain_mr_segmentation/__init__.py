"""Brain-tumour segmentation on axial MR slices: the first federated domain.

`DOMAIN` is what the orchestrator uses (see `domains.domain.Domain`); the modules below are the
pieces it is built from, public so that demos and benchmarks can reuse them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from domains.brain_mr_segmentation.cases import check_segmentation_case, fit_centre, normalise_volume, slices_for_training
from domains.brain_mr_segmentation.loss import dice_bce_loss, soft_dice_loss
from domains.brain_mr_segmentation.metrics import add_counts, confusion_counts, metrics_from_counts
from domains.brain_mr_segmentation.mock_cases import mock_cases
from domains.brain_mr_segmentation.phantom import PhantomCase, generate_case, synthetic_case, write_dicom_series, write_nifti_mask, write_phantom_site, write_rtstruct
from domains.brain_mr_segmentation.scanner_profiles import PROFILES, ScannerProfile
from domains.brain_mr_segmentation.unet2d import UNet2D
from domains.shuffled_batches import shuffled_batches

__all__ = [
    "DOMAIN",
    "PROFILES",
    "BrainMRSegmentation",
    "PhantomCase",
    "ScannerProfile",
    "UNet2D",
    "add_counts",
    "check_segmentation_case",
    "confusion_counts",
    "dice_bce_loss",
    "generate_case",
    "metrics_from_counts",
    "mock_cases",
    "normalise_volume",
    "slices_for_training",
    "soft_dice_loss",
    "synthetic_case",
    "write_dicom_series",
    "write_nifti_mask",
    "write_phantom_site",
    "write_rtstruct",
]

FOREGROUND_PRIOR = 0.1


class BrainMRSegmentation:
    """2D U-Net on z-scored axial slices, trained with Dice + BCE, evaluated voxel-wise on the
    original grid of each case (padding added for the U-Net never counts)."""

    name = "brain_mr_segmentation"
    evaluation_scalars = frozenset({"tp", "fp", "tn", "fn", "dice", "sensitivity", "specificity", "f1"})
    primary_metric = "dice"
    higher_is_better = True

    def __init__(self, base_channels: int = 8, eval_batch_size: int = 32) -> None:
        self.base_channels = base_channels
        self.eval_batch_size = eval_batch_size

    def build_model(self) -> torch.nn.Module:
        """U-Net whose output bias starts at the logit of `FOREGROUND_PRIOR`: tumour is ~1% of
        voxels, and starting from "tumour everywhere" (bias 0) makes the first steps spend
        themselves unlearning that, which in short federated rounds often collapses to an
        all-background model."""
        model = UNet2D(in_channels=1, out_channels=1, base_channels=self.base_channels)
        torch.nn.init.constant_(model.head.bias, math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR)))
        return model

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(logits, target)

    def batches(self, cases: list[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled slices of all cases, x and y both [B, 1, H, W]; the last batch may be smaller."""
        x, y = slices_for_training(cases)
        return shuffled_batches(x, y, batch_size, rng)

    def predict_mask(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """Binary tumour mask uint8 [Z, Y, X] on the case's own grid (logit > 0, i.e. p > 0.5)."""
        x, _ = slices_for_training([case])
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = [model(torch.from_numpy(x[i : i + self.eval_batch_size]).to(device)).cpu() for i in range(0, len(x), self.eval_batch_size)]
        finally:
            model.train(was_training)
        predicted = (torch.cat(logits)[:, 0] > 0).numpy().astype(np.uint8)
        return fit_centre(predicted, case["mask"].shape[1:], fill=0)

    def evaluation_counts(self, model: torch.nn.Module, cases: list[dict[str, Any]]) -> dict[str, int]:
        return add_counts(*(confusion_counts(self.predict_mask(model, case), case["mask"]) for case in cases))

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        return metrics_from_counts(counts)

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        return mock_cases(templates, seed)


DOMAIN = BrainMRSegmentation()
