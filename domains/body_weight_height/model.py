"""The regressor: a small CNN from the height map to standardised weight and height.

Targets are standardised with fixed constants (adult means and spreads), not with statistics of
a site's data: every site then trains towards the same numbers without sharing anything, and a
model's output means the same at every site. The network has no batch normalisation, whose
running statistics would differ per site and which DP-SGD (Opacus) refuses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

TARGETS = ("weight_kg", "height_cm")
TARGET_MEAN = np.array([78.0, 170.0], dtype=np.float32)  # adult weight (kg) and height (cm)
TARGET_SCALE = np.array([17.0, 10.0], dtype=np.float32)


def standardised(labels: Mapping[str, float]) -> np.ndarray:
    """float32 [2]: (weight_kg, height_cm) as the model is trained to output them."""
    return ((np.array([float(labels[name]) for name in TARGETS], dtype=np.float32) - TARGET_MEAN) / TARGET_SCALE).astype(np.float32)


def in_units(outputs: np.ndarray) -> np.ndarray:
    """Model outputs [N, 2] back in kg and cm."""
    return np.asarray(outputs, dtype=np.float64) * TARGET_SCALE + TARGET_MEAN


class BodySizeNet(nn.Module):
    """[B, 1, rows, cols] height map -> [B, 2] standardised (weight, height).

    Convolutions (two of them strided: a 4x coarser map) find the body's parts; two summaries of
    each feature feed a small linear head. The mean over the whole map says how much body there
    is (its volume, which weight follows). The span says over how much of the table's length a
    part reaches: each feature's maximum across the table, per row, kept from the first row that
    shows it to the last (the smaller of its running maxima from either end), averaged over the
    rows and divided by the feature's maximum: the share of the rows it reaches, however strong it
    is (strength follows thickness, hence weight, which would blur length). A feature of thick parts (head, trunk, upturned feet) then spans the head's top to the
    toes - what height follows - whatever lies thin in between or reaches beyond (raised arms).
    Both summaries ignore where the body lies and which way round, as the labels do."""

    def __init__(self, channels: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels * 2, channels * 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels * 2, channels * 4, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(channels * 8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        amount = features.mean(dim=(2, 3))
        return self.head(torch.cat([amount, span(features.amax(dim=3))], dim=1))


def span(profile: torch.Tensor) -> torch.Tensor:
    """[B, C, rows] -> [B, C]: per feature, the mean over rows of min(running max from the first
    row, running max from the last row) over its maximum: the share of the rows it reaches along
    the table, gaps filled (0 for a feature that is 0 everywhere)."""
    from_start = torch.cummax(profile, dim=2).values
    from_end = torch.cummax(profile.flip(2), dim=2).values.flip(2)
    return torch.minimum(from_start, from_end).mean(dim=2) / (profile.amax(dim=2) + 1e-3)
