"""One training epoch as mini-batches: how every slice-based domain feeds its model."""

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


def balanced_batches(
    x: np.ndarray, y: np.ndarray, positive: np.ndarray, batch_size: int, rng: np.random.Generator, min_positive_share: float = 0.5
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch of len(x) rows in which at least `min_positive_share` are `positive` rows (for
    segmentation: slices holding tumour), drawn from `rng`.

    In brain MR most slices hold no tumour, and an epoch of them teaches "predict nothing" before
    it teaches the tumour; positives are then repeated (each as evenly as possible, in a fresh
    order every pass) and negatives drawn without repetition. When positives are already at least
    that share, or either kind is missing, this is `shuffled_batches`: every row once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    positive = np.asarray(positive, dtype=bool)
    positives, negatives = np.flatnonzero(positive), np.flatnonzero(~positive)
    n = len(x)
    n_positive = int(np.ceil(min_positive_share * n))
    if len(positives) >= n_positive or len(positives) == 0 or len(negatives) == 0:
        yield from shuffled_batches(x, y, batch_size, rng)
        return
    passes = -(-n_positive // len(positives))
    drawn_positive = np.concatenate([rng.permutation(positives) for _ in range(passes)])[:n_positive]
    drawn_negative = rng.permutation(negatives)[: n - n_positive]
    order = rng.permutation(np.concatenate([drawn_positive, drawn_negative]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield torch.from_numpy(x[chosen]), torch.from_numpy(y[chosen])
