"""How the brain-MR task turns a site's case records (`domains.case_record`) into training slices.

Segmentation needs the optional "mask" of a record (1 = tumour). Scanners disagree on intensity
scale and offset, so every volume is z-scored within its own head before the model sees it;
contrast (gamma), bias field and noise differences stay, which is the heterogeneity federated
training has to live with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.filters import threshold_otsu

from domains.case_record import check_case_record

MULTIPLE = 8


def check_segmentation_case(record: dict[str, Any]) -> None:
    """A case record this domain can train on: the common schema plus a mask."""
    check_case_record(record, require=("mask",))


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Voxels inside the head. Otsu's threshold is invariant to an affine change of intensities,
    so the same voxels are chosen whatever the scanner's scale and offset."""
    if np.ptp(image) == 0:
        return np.zeros(image.shape, dtype=bool)
    return image > threshold_otsu(image)


def normalise_volume(image: np.ndarray) -> np.ndarray:
    """Z-score the whole volume with the mean and standard deviation of its head voxels.

    A constant volume (no head to measure) becomes all zeros rather than dividing by zero.
    """
    image = np.asarray(image, dtype=np.float32)
    head = image[foreground_mask(image)]
    if head.size < 2 or head.std() == 0:
        return np.zeros_like(image)
    return ((image - head.mean()) / head.std()).astype(np.float32)


def training_size(cases: list[dict[str, Any]]) -> tuple[int, int]:
    """Smallest (H, W) that holds every case's slices and that the U-Net's three poolings divide."""
    height = max(case["image"].shape[1] for case in cases)
    width = max(case["image"].shape[2] for case in cases)
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


def slices_for_training(
    cases: list[dict[str, Any]], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All axial slices of all cases as x float32 [N, 1, H, W] and y float32 [N, 1, H, W].

    `size` defaults to `training_size(cases)` (pad only, nothing cropped); pass it explicitly to
    give several sites the same slice size. Padding uses each case's own background level so the
    border looks like air, not like tissue.
    """
    if not cases:
        raise ValueError("no cases given; a site needs at least one case to train on")
    for case in cases:
        check_segmentation_case(case)
    size = training_size(cases) if size is None else size
    if size[0] % MULTIPLE or size[1] % MULTIPLE:
        raise ValueError(f"slice size {size} must be a multiple of {MULTIPLE} in both axes for the U-Net")
    xs, ys = [], []
    for case in cases:
        image = normalise_volume(case["image"])
        xs.append(fit_centre(image, size, fill=float(image.min())))
        ys.append(fit_centre(case["mask"].astype(np.float32), size, fill=0.0))
    x = np.concatenate(xs)[:, None].astype(np.float32)
    y = (np.concatenate(ys)[:, None] > 0).astype(np.float32)
    return x, y
