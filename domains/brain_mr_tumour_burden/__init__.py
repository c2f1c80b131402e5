"""Tumour burden per axial MR slice (cm²): a regression domain on the same cases as segmentation.

It exists for two reasons. It is the second domain the orchestrator must run without changes
(regression instead of segmentation). And its loss is a plain mean over slices with no batch
normalisation and a fixed slice size, so one full-batch SGD step per site followed by
sample-weighted FedAvg equals one centralized gradient step exactly: the check that aggregation
is right, not merely that it runs.

Evaluation counts are additive integers like segmentation's confusion counts: the number of
slices and fixed-point sums (micro-cm²) of absolute and squared errors, so sites can be pooled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from domains.brain_mr_segmentation.cases import check_segmentation_case, fit_centre, normalise_volume
from domains.brain_mr_segmentation.mock_cases import mock_cases
from domains.shuffled_batches import shuffled_batches

SLICE_SIZE = (64, 64)
FIXED_POINT = 1_000_000  # errors are summed as integers in micro-units so counts stay additive


def slices_and_burden(cases: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, 1, 64, 64] (z-scored, centre-fitted slices) and y float32 [N, 1]: tumour
    area of each slice in cm², measured on the case's own grid before any cropping."""
    if not cases:
        raise ValueError("no cases given; a site needs at least one case to train on")
    xs, ys = [], []
    for case in cases:
        check_segmentation_case(case)
        image = normalise_volume(case["image"])
        xs.append(fit_centre(image, SLICE_SIZE, fill=float(image.min())))
        pixel_cm2 = float(case["spacing"][1]) * float(case["spacing"][2]) / 100.0
        ys.append(case["mask"].reshape(len(case["mask"]), -1).sum(axis=1) * pixel_cm2)
    return np.concatenate(xs)[:, None].astype(np.float32), np.concatenate(ys)[:, None].astype(np.float32)


class BurdenNet(nn.Module):
    """[B, 1, 64, 64] -> [B, 1]: two strided convolutions, global average pooling, a linear head."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BrainMRTumourBurden:
    name = "brain_mr_tumour_burden"
    evaluation_scalars = frozenset({"n_slices", "abs_error_micro", "sq_error_micro", "mae_cm2", "rmse_cm2"})
    primary_metric = "rmse_cm2"
    higher_is_better = False

    def build_model(self) -> nn.Module:
        return BurdenNet()

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def batches(self, cases: list[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = slices_and_burden(cases)
        return shuffled_batches(x, y, batch_size, rng)

    def evaluation_counts(self, model: nn.Module, cases: list[dict[str, Any]]) -> dict[str, int]:
        x, y = slices_and_burden(cases)
        model.eval()
        with torch.no_grad():
            error = (model(torch.from_numpy(x)) - torch.from_numpy(y)).double().numpy().ravel()
        return {
            "n_slices": int(len(error)),
            "abs_error_micro": int(round(float(np.abs(error).sum()) * FIXED_POINT)),
            "sq_error_micro": int(round(float((error**2).sum()) * FIXED_POINT)),
        }

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        n = max(counts["n_slices"], 1)
        return {
            "mae_cm2": counts["abs_error_micro"] / FIXED_POINT / n,
            "rmse_cm2": float(np.sqrt(counts["sq_error_micro"] / FIXED_POINT / n)),
        }

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        """The same cases as segmentation (a mask gives the burden), so the same mocks."""
        return mock_cases(templates, seed)


DOMAIN = BrainMRTumourBurden()
