"""Training loss: L1 plus structural dissimilarity, half each.

L1 alone fits intensities voxel by voxel and blurs edges (its optimum under uncertainty is the
median, which averages away texture); 1 - SSIM rewards local contrast and structure but ignores a
global intensity offset. Their equal-weight sum is the usual compromise of synthesis papers and
keeps both terms on the same [0, 1]-ish scale, since images are on [0, 1] (`preprocessing`).
SSIM is MONAI's (Gaussian window 11, sigma 1.5, data range 1), the same as evaluation's.
"""

from __future__ import annotations

import torch
from monai.losses import SSIMLoss
from torch import nn

L1_WEIGHT = 0.5


class TranslationLoss(nn.Module):
    """`l1_weight` * L1 + (1 - `l1_weight`) * (1 - SSIM) over a batch [B, 1, H, W] on [0, 1]."""

    def __init__(self, l1_weight: float = L1_WEIGHT) -> None:
        super().__init__()
        if not 0.0 <= l1_weight <= 1.0:
            raise ValueError(f"l1_weight must be in [0, 1], got {l1_weight}")
        self.l1_weight = float(l1_weight)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = nn.functional.l1_loss(prediction, target)
        return self.l1_weight * l1 + (1.0 - self.l1_weight) * self.ssim(prediction, target)
