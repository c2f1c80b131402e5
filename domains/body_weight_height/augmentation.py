"""Training frames made to look as if the patient had lain otherwise: mirrored, feet first, shifted.

A clinic's routine decides how its patients lie (clinic-d scans a third of them feet first, and
centring on the body leaves a few pixels' play), and a model trained at one clinic should not read
weight or height from how that clinic places patients. Mirroring across the table, swapping head
and feet and shifting by a few pixels change nothing a label depends on, so every clinic can show
its model all of them. Heights (the frame's values) are never changed: they are the measurement.
Only training batches are augmented, never evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FrameAugmentation:
    """Per frame: probabilities of mirroring across the table and of swapping head and feet, and
    the largest shift in pixels along each axis (drawn uniformly)."""

    flip_across: float = 0.5
    flip_along: float = 0.5
    max_shift_px: int = 3

    def __post_init__(self) -> None:
        for name in ("flip_across", "flip_along"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FrameAugmentation.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_shift_px < 0:
            raise ValueError(f"FrameAugmentation.max_shift_px must be >= 0, got {self.max_shift_px}")


DEFAULT_AUGMENTATION = FrameAugmentation()


def augment_frames(x: torch.Tensor, rng: np.random.Generator, settings: FrameAugmentation = DEFAULT_AUGMENTATION) -> torch.Tensor:
    """A batch x [B, 1, rows, cols] augmented frame by frame (a new tensor; x is left as it was),
    every draw from `rng`, so a batch is reproducible and no frame's values reach another."""
    frames = x.detach().cpu().numpy().copy()
    n = len(frames)
    across = rng.random(n) < settings.flip_across
    along = rng.random(n) < settings.flip_along
    shifts = rng.integers(-settings.max_shift_px, settings.max_shift_px + 1, size=(n, 2))
    for i in range(n):
        frame = frames[i, 0]
        if across[i]:
            frame = frame[:, ::-1]
        if along[i]:
            frame = frame[::-1, :]
        frames[i, 0] = _shifted(frame, int(shifts[i, 0]), int(shifts[i, 1]))
    return torch.from_numpy(frames).to(x.dtype)


def _shifted(frame: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`frame` moved by (rows, cols) pixels, 0 (the table's level) where nothing moved in."""
    out = np.zeros_like(frame)
    height, width = frame.shape
    out[max(rows, 0):height + min(rows, 0), max(cols, 0):width + min(cols, 0)] = \
        frame[max(-rows, 0):height + min(-rows, 0), max(-cols, 0):width + min(-cols, 0)]
    return out
