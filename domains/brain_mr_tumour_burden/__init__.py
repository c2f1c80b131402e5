"""Tumour burden per axial MR slice (cm²): a regression domain on the same cases as segmentation.

It exists for two reasons. It is the second domain the orchestrator must run without changes
(regression instead of segmentation). And its loss is a plain mean over slices with no batch
normalisation and a fixed slice size, so one full-batch SGD step per site followed by
sample-weighted FedAvg equals one centralized gradient step exactly: the check that aggregation
is right, not merely that it runs.

Evaluation counts are additive integers like segmentation's confusion counts: the number of
slices and fixed-point sums (micro-cm²) of absolute and squared errors, so sites can be pooled.
Each case also adds its own mean absolute and squared error over its slices, each slice's error
clipped at `MAX_SLICE_ERROR_CM2`, and 1 to `cases`: one case moves those sums by a bounded amount
whatever its slice count, so they are what a site that noises evaluations
(`[privacy.evaluation_dp]`) releases (`EVALUATION_BOUNDS`), as `mae_cm2_per_case` and
`rmse_cm2_per_case`. The per-slice sums (a case's share grows with its slices) are withheld there,
and with them the primary metric: a federated run then keeps its final round and says so.
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
MAX_SLICE_ERROR_CM2 = 50.0  # a slice's error counts at most this much in the per-case sums
# The most one case adds to each count a noised evaluation releases (0: the same for every case).
EVALUATION_BOUNDS = {"cases": 0.0, "case_abs_error_micro": MAX_SLICE_ERROR_CM2 * FIXED_POINT,
                     "case_sq_error_micro": MAX_SLICE_ERROR_CM2**2 * FIXED_POINT}


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
    evaluation_scalars = frozenset({"n_slices", "abs_error_micro", "sq_error_micro", "mae_cm2", "rmse_cm2", *EVALUATION_BOUNDS,
                                    "mae_cm2_per_case", "rmse_cm2_per_case"})
    evaluation_bounds = EVALUATION_BOUNDS  # what one case adds to each count at most (noised evaluations)
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
        """Per-slice error sums and per-case mean errors (each slice's clipped), one case at a time."""
        if not cases:
            raise ValueError("no cases given; a site needs at least one case to evaluate on")
        model.eval()
        counts = dict.fromkeys(("n_slices", "abs_error_micro", "sq_error_micro", *EVALUATION_BOUNDS), 0)
        for case in cases:
            x, y = slices_and_burden([case])
            with torch.no_grad():
                error = (model(torch.from_numpy(x)) - torch.from_numpy(y)).double().numpy().ravel()
            clipped = np.minimum(np.abs(error), MAX_SLICE_ERROR_CM2)
            counts["n_slices"] += int(len(error))
            counts["abs_error_micro"] += int(round(float(np.abs(error).sum()) * FIXED_POINT))
            counts["sq_error_micro"] += int(round(float((error**2).sum()) * FIXED_POINT))
            counts["cases"] += 1
            counts["case_abs_error_micro"] += int(round(float(clipped.mean()) * FIXED_POINT))
            counts["case_sq_error_micro"] += int(round(float((clipped**2).mean()) * FIXED_POINT))
        return counts

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        """Per-slice MAE and RMSE when the slice sums are there, per-case ones when the case sums
        are (the root of the mean of the cases' mean squared errors); a noised sum is capped at
        what `cases` cases can add."""
        metrics: dict[str, float] = {}
        if all(key in counts for key in ("n_slices", "abs_error_micro", "sq_error_micro")):
            n = max(int(counts["n_slices"]), 1)
            metrics["mae_cm2"] = int(counts["abs_error_micro"]) / FIXED_POINT / n
            metrics["rmse_cm2"] = float(np.sqrt(int(counts["sq_error_micro"]) / FIXED_POINT / n))
        if all(key in counts for key in EVALUATION_BOUNDS):
            cases = max(int(counts["cases"]), 1)
            mean = {key: min(max(int(counts[key]), 0), cases * EVALUATION_BOUNDS[key]) / FIXED_POINT / cases
                    for key in ("case_abs_error_micro", "case_sq_error_micro")}
            metrics["mae_cm2_per_case"] = mean["case_abs_error_micro"]
            metrics["rmse_cm2_per_case"] = float(np.sqrt(mean["case_sq_error_micro"]))
        if not metrics:
            raise KeyError(f"tumour burden counts lack both the slice sums and the per-case sums {sorted(EVALUATION_BOUNDS)}")
        return metrics

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        """The same cases as segmentation (a mask gives the burden), so the same mocks."""
        return mock_cases(templates, seed)


DOMAIN = BrainMRTumourBurden()
