"""One training epoch as shuffled mini-batches: how every slice-based domain feeds its model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors of `batch_size` rows in an order drawn from `rng` (so a round is reproducible);
    every row appears once per epoch and the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = rng.permutation(len(x))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield torch.from_numpy(x[chosen]), torch.from_numpy(y[chosen])
