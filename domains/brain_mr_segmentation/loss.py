"""Soft Dice plus BCE: Dice copes with tumours filling under 1% of voxels, BCE gives useful
gradients early, when the soft Dice of an untrained network is flat."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch. Pooling the batch (rather than averaging per slice)
    keeps tumour-free slices from dominating; `smooth` makes an empty prediction of an empty
    target score a loss of 0."""
    probabilities = torch.sigmoid(logits)
    intersection = (probabilities * target).sum()
    return 1 - (2 * intersection + smooth) / (probabilities.sum() + target.sum() + smooth)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0) -> torch.Tensor:
    """Weighted sum of soft Dice and BCE-with-logits; logits and target are [B, 1, H, W]."""
    target = target.to(logits.dtype)
    return dice_weight * soft_dice_loss(logits, target) + bce_weight * F.binary_cross_entropy_with_logits(logits, target)
