"""How the brain-MR task turns a site's case records (`domains.case_record`) into training slices.

Segmentation needs the optional "mask" of a record (1 = tumour). Every case goes through the
domain's preprocessing (`preprocessing.preprocess_case`: canonical orientation, in-plane
resampling, percentile clipping, z-scoring on an anatomy-free foreground, foreground crop) one
case at a time; contrast (gamma), bias field and noise differences stay, which is the
heterogeneity federated training has to live with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from domains.brain_mr_segmentation.preprocessing import DEFAULT_SETTINGS, PreprocessedCase, PreprocessingSettings, foreground_mask, preprocess_case, zscore_on_foreground
from domains.case_record import check_case_record

MULTIPLE = 8

__all__ = [
    "MULTIPLE",
    "SiteSlices",
    "check_segmentation_case",
    "fit_centre",
    "foreground_mask",
    "normalise_volume",
    "preprocessed_cases",
    "site_slices",
    "slices_for_training",
    "training_size",
]


def check_segmentation_case(record: dict[str, Any]) -> None:
    """A case record this domain can train on: the common schema plus a mask."""
    check_case_record(record, require=("mask",))


def normalise_volume(image: np.ndarray, settings: PreprocessingSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Z-score the whole volume with the mean and standard deviation of its foreground
    (`foreground_mask`: not air, whatever the body part), on the volume's own grid.

    A constant volume (nothing to measure) becomes all zeros rather than dividing by zero."""
    image = np.asarray(image, dtype=np.float32)
    return zscore_on_foreground(image, foreground_mask(image, settings))


def preprocessed_cases(cases: Sequence[dict[str, Any]], settings: PreprocessingSettings = DEFAULT_SETTINGS) -> list[PreprocessedCase]:
    """Every case checked and preprocessed, one at a time: a lazy case source is read case by case
    and only the (cropped) model-grid arrays are kept."""
    if not len(cases):
        raise ValueError("no cases given; a site needs at least one case to train on")
    processed = []
    for case in cases:
        check_segmentation_case(case)
        processed.append(preprocess_case(case, settings))
    return processed


def training_size(cases: Sequence[PreprocessedCase | dict[str, Any]]) -> tuple[int, int]:
    """Smallest (H, W) that holds every case's slices and that the U-Net's three poolings divide."""
    height = max(case["image"].shape[1] if isinstance(case, dict) else case.image.shape[1] for case in cases)
    width = max(case["image"].shape[2] if isinstance(case, dict) else case.image.shape[2] for case in cases)
    return (-(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE)


def fit_centre(volume: np.ndarray, size: tuple[int, int], fill: float) -> np.ndarray:
    """Centre-pad (with `fill`) or centre-crop the last two axes to `size`.

    Padding by (size - n) // 2 before and cropping from (size - n) // 2 are the same offset,
    so fitting a prediction back to the original size undoes the padding exactly.
    """
    out = volume
    for axis, target in ((-2, size[0]), (-1, size[1])):
        current = out.shape[axis]
        if current < target:
            before = (target - current) // 2
            widths = [(0, 0)] * out.ndim
            widths[axis] = (before, target - current - before)
            out = np.pad(out, widths, mode="constant", constant_values=fill)
        elif current > target:
            start = (current - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
    return out


class SiteSlices:
    """All axial slices of a site's preprocessed cases, x and y float32 [N, 1, H, W], and which
    slices hold tumour (for class-balanced sampling) - the training set of one site."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.has_tumour = y.reshape(len(y), -1).any(axis=1)


def site_slices(processed: Sequence[PreprocessedCase], size: tuple[int, int] | None = None) -> SiteSlices:
    """Slices of preprocessed cases padded to one size (`training_size` unless given; pass it
    explicitly to give several sites the same slice size). Padding uses each case's own darkest
    value so the border looks like air, not like tissue."""
    size = training_size(processed) if size is None else size
    if size[0] % MULTIPLE or size[1] % MULTIPLE:
        raise ValueError(f"slice size {size} must be a multiple of {MULTIPLE} in both axes for the U-Net")
    xs, ys = [], []
    for case in processed:
        xs.append(fit_centre(case.image, size, fill=float(case.image.min())))
        ys.append(fit_centre(case.mask.astype(np.float32), size, fill=0.0))
    x = np.concatenate(xs)[:, None].astype(np.float32)
    y = (np.concatenate(ys)[:, None] > 0).astype(np.float32)
    return SiteSlices(x, y)


def slices_for_training(
    cases: Sequence[dict[str, Any]], size: tuple[int, int] | None = None, settings: PreprocessingSettings = DEFAULT_SETTINGS
) -> tuple[np.ndarray, np.ndarray]:
    """All preprocessed axial slices of all cases as x float32 [N, 1, H, W] and y float32 [N, 1, H, W]."""
    slices = site_slices(preprocessed_cases(cases, settings), size)
    return slices.x, slices.y
