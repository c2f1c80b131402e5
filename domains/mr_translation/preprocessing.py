"""From a paired case record to 2-D (source, target) slices on [0, 1]: what the generator sees.

Sites differ in intensity scale, offset and resolution, so each case is made comparable by itself:
- source = the record's primary image, target = its single further image (`source_and_target`);
- each is normalised to [0, 1] by robust percentiles over the head (`head_mask` of the source,
  shared by both since they lie on one grid): (0.5, 99.5) maps dark tissue to 0 and the brightest
  tissue to 1, clipping air, noise and a few hot voxels, whatever the vendor's units;
- slices are resampled in-plane to `spacing_mm` (a 256-matrix 1 mm scan and a 64-matrix 3.5 mm one
  then show the head at the same size) and centre-fitted to `slice_size`, filling with 0 (air);
- slices whose head covers less than `min_head_share` of the slice are skipped: a slab end with a
  sliver of scalp teaches nothing and inflates PSNR with empty air.
Axial slices are the array's first axis as stored (the cases come from axial acquisitions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter

from domains.brain_mr_segmentation.cases import fit_centre
from domains.case_record import check_case_record

HEAD_FRACTION = 0.1  # of the 1st-99th percentile range: above it is head, below air (as the brain domain's foreground)


@dataclass(frozen=True)
class TranslationSettings:
    """How cases become slices; `slice_size` must be divisible by 4 (the generator pools twice)."""

    slice_size: tuple[int, int] = (64, 64)
    spacing_mm: float = 3.6
    percentiles: tuple[float, float] = (0.5, 99.5)
    min_head_share: float = 0.05

    def __post_init__(self) -> None:
        if any(n < 4 or n % 4 for n in self.slice_size):
            raise ValueError(f"TranslationSettings.slice_size must be multiples of 4 (two poolings), got {self.slice_size}")
        if self.spacing_mm <= 0:
            raise ValueError(f"TranslationSettings.spacing_mm must be positive, got {self.spacing_mm}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"TranslationSettings.percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles}")
        if not 0 <= self.min_head_share < 1:
            raise ValueError(f"TranslationSettings.min_head_share must be in [0, 1), got {self.min_head_share}")


DEFAULT_SETTINGS = TranslationSettings()


@dataclass(frozen=True)
class PairedSlices:
    """A case's usable slices: normalised `source` and `target` float32 [N, H, W] and the index of
    each slice in the case's own volume (`slice_index`, int [N])."""

    source: np.ndarray
    target: np.ndarray
    slice_index: np.ndarray


def source_and_target(case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The primary image and the case's one further image: translation needs exactly one target."""
    check_case_record(case, require=("images",))
    images = case["images"]
    if len(images) != 1:
        raise ValueError(f"case {case['case_id']}: translation needs exactly one further image as its target, the case has "
                         f"{len(images)} ({', '.join(sorted(images)) or 'none'}); ingest with --primary-series-description "
                         "naming the source contrast and keep one other series in its frame of reference")
    (target,) = images.values()
    return np.asarray(case["image"], dtype=np.float32), np.asarray(target, dtype=np.float32)


def head_mask(image: np.ndarray) -> np.ndarray:
    """Voxels of the head, bool [Z, Y, X]: brighter than `HEAD_FRACTION` of the robust range after
    in-plane smoothing, holes (dark skull, CSF) filled slice by slice. Unlike the segmentation
    domain's `foreground_mask` it never smooths across slices: with 6-12 mm slices that would lend
    a slab's end slice, all air, the head of its neighbour."""
    image = np.asarray(image, dtype=np.float32)
    if image.size == 0 or np.ptp(image) == 0:
        return np.zeros(image.shape, dtype=bool)
    smooth = gaussian_filter(image, sigma=(0.0, 1.0, 1.0))
    low, high = np.percentile(smooth, (1.0, 99.0))
    if high <= low:
        return np.zeros(image.shape, dtype=bool)
    return np.stack([binary_fill_holes(plane) for plane in smooth > low + HEAD_FRACTION * (high - low)])


def normalise(image: np.ndarray, head: np.ndarray, percentiles: tuple[float, float] = DEFAULT_SETTINGS.percentiles) -> np.ndarray:
    """`image` mapped to [0, 1] by the percentiles of its `head` voxels; zeros when the head is
    empty or flat (nothing to measure)."""
    values = image[head]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    low, high = np.percentile(values, percentiles)
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _resample_in_plane(volume: np.ndarray, spacing_yx: tuple[float, float], target_mm: float) -> np.ndarray:
    """[Z, Y, X] resampled bilinearly (anti-aliased when shrinking) to `target_mm` in-plane spacing."""
    size = tuple(max(1, round(n * s / target_mm)) for n, s in zip(volume.shape[1:], spacing_yx))
    if size == volume.shape[1:]:
        return volume
    shrinking = size[0] < volume.shape[1] or size[1] < volume.shape[2]
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)[:, 0].numpy()


def preprocess_pair(case: Mapping[str, Any], settings: TranslationSettings = DEFAULT_SETTINGS) -> PairedSlices:
    """The case's slices that show the head, source and target on one fixed-size grid, both on [0, 1]."""
    source, target = source_and_target(case)
    head = head_mask(source)
    spacing_yx = (float(case["spacing"][1]), float(case["spacing"][2]))
    planes = [fit_centre(_resample_in_plane(volume, spacing_yx, settings.spacing_mm), settings.slice_size, fill=0.0)
              for volume in (normalise(source, head, settings.percentiles), normalise(target, head, settings.percentiles),
                             head.astype(np.float32))]
    source_planes, target_planes, head_planes = planes
    keep = np.flatnonzero((head_planes > 0.5).mean(axis=(1, 2)) >= settings.min_head_share)
    return PairedSlices(source=np.clip(source_planes[keep], 0, 1).astype(np.float32),
                        target=np.clip(target_planes[keep], 0, 1).astype(np.float32),
                        slice_index=keep.astype(np.int64))
