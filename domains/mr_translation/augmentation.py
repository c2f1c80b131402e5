"""Light augmentation for translation: left-right flips of source and target together.

A brain is nearly left-right symmetric, so a mirrored slice is a plausible slice and doubles the
anatomy a small site shows. Intensity augmentation (the segmentation domain's contrast curves and
bias fields) is left out on purpose: the target's intensities are what the model must predict, and
changing the source's would teach it a mapping that no scanner has.
"""

from __future__ import annotations

import numpy as np
import torch

FLIP_PROB = 0.5


def flip_pairs(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, prob: float = FLIP_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """New [B, 1, H, W] tensors with each slice pair flipped left-right with probability `prob`
    (drawn per slice from `rng`, so a batch is reproducible); the inputs are left as they were."""
    flips = torch.from_numpy(rng.random(len(x)) < prob)
    x, y = x.clone(), y.clone()
    x[flips] = x[flips].flip(-1)
    y[flips] = y[flips].flip(-1)
    return x, y
