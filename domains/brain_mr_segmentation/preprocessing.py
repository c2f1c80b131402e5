"""Site-side preprocessing of one case record, declared by the domain and run with MONAI transforms.

Real scans arrive in any orientation, at any in-plane resolution, with any amount of air and of
any body part. A 2-D slice model needs them aligned, and federated training needs every site to
align them the same way, so the steps and their settings live here, in the domain, and not at the
site. Each case is processed on its own (a site's cases may be memory-mapped and never all
loaded), and every geometric step is invertible, so predictions are scored on the case's own grid.

Steps: canonical orientation (axial slices on the first array axis), in-plane resampling to the
declared spacing, percentile clipping, z-scoring on a foreground mask that assumes no anatomy,
cropping to that foreground.

MONAI is imported where a case is processed, not with this module: importing it loads all of
MONAI (~2.5 s on the 2-core dev VM), which the phantom generator, mock cases and output
contracts, all importing this package, do not need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter

from domains.case_record import record_affine

if TYPE_CHECKING:
    from monai.data import MetaTensor
    from monai.transforms import Compose

# Array order [Z, Y, X] of a record with identity direction: +z superior, +y posterior, +x left,
# written as MONAI's RAS-based axis codes. Every case is turned this way before slicing.
CANONICAL_AXCODES = "SPL"
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessingSettings:
    """What every site does to a case before the model sees it.

    `target_spacing_mm` is (row, column) in mm: finer scans are resampled to it, coarser ones keep
    their grid, because upsampling adds no information and multiplies the cost of every step.
    The foreground is every voxel brighter than `foreground_fraction` of the robust intensity range
    (percentiles 1 to 99) after light smoothing, with holes filled per slice: it assumes only that
    air is darker than tissue, not a head shape, and it does not depend on scanner scale or offset.
    """

    target_spacing_mm: tuple[float, float] = (2.0, 2.0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_fraction: float = 0.1
    smoothing_voxels: float = 1.0
    crop_margin_voxels: int = 2


DEFAULT_SETTINGS = PreprocessingSettings()


def foreground_mask(image: np.ndarray, settings: PreprocessingSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Voxels that are not air, bool like `image`: above `foreground_fraction` of the range between
    the 1st and 99th percentile of the lightly smoothed image, holes filled slice by slice (dark
    tissue such as bone or CSF inside the body). Smoothing keeps Rician noise in air below the
    threshold; percentiles make the choice independent of the scanner's scale and offset."""
    image = np.asarray(image, dtype=np.float32)
    if image.size == 0 or np.ptp(image) == 0:
        return np.zeros(image.shape, dtype=bool)
    smooth = gaussian_filter(image, settings.smoothing_voxels) if settings.smoothing_voxels > 0 else image
    low, high = np.percentile(smooth, (1.0, 99.0))
    if high <= low:
        return np.zeros(image.shape, dtype=bool)
    inside = smooth > low + settings.foreground_fraction * (high - low)
    return np.stack([binary_fill_holes(plane) for plane in inside]) if inside.ndim == 3 else binary_fill_holes(inside)


def zscore_on_foreground(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """The whole image z-scored with its foreground's mean and standard deviation, so air stays
    darker than tissue; an image without a measurable foreground becomes zeros."""
    values = image[foreground]
    if values.size < 2 or values.std() == 0:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - values.mean()) / values.std()).astype(np.float32)


@dataclass
class PreprocessedCase:
    """One case on the model's grid: image float32 and mask uint8 [Z', Y', X'] (mask None for an
    unlabelled case), their spacing (z, y, x) mm, and what it takes to bring a prediction back to
    the case's own grid."""

    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    _stages: tuple[Compose, Compose]
    _reference: MetaTensor

    def to_original_grid(self, probabilities: np.ndarray) -> np.ndarray:
        """Tumour probabilities float32 [Z', Y', X'] on the model's grid -> [Z, Y, X] on the case's
        own grid. Cropped-away voxels come back as probability 0 (air is never tumour)."""
        from monai.data import MetaTensor

        reference = self._reference
        prediction = MetaTensor(torch.as_tensor(probabilities, dtype=torch.float32)[None], affine=reference.affine.clone())
        prediction.applied_operations = [dict(op) for op in reference.applied_operations]
        data = {"image": prediction}
        for stage in reversed(self._stages):
            data = stage.inverse(data)
        return np.asarray(data["image"].array[0], dtype=np.float32)


def _as_meta(array: np.ndarray, affine: np.ndarray, dtype: type) -> MetaTensor:
    """A private copy as a channel-first MetaTensor: transforms may work in place, and the site's
    record (possibly a read-only memory map) must come out of preprocessing untouched."""
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.array(array, dtype=dtype, copy=True))[None], affine=torch.as_tensor(affine, dtype=torch.float64))


def preprocess_case(record: dict[str, Any], settings: PreprocessingSettings = DEFAULT_SETTINGS) -> PreprocessedCase:
    """Orient, resample in-plane, clip, z-score and crop one case record (its "mask" too, if any).

    Only this case's arrays are read, so a lazy case source is processed one case at a time."""
    from monai.transforms import Compose, Orientationd, Spacingd, SpatialCropd

    affine = record_affine(record)
    keys = ["image"] + (["mask"] if record.get("mask") is not None else [])
    data: dict[str, Any] = {"image": _as_meta(np.asarray(record["image"]), affine, np.float32)}
    if "mask" in keys:
        data["mask"] = _as_meta(np.asarray(record["mask"]), affine, np.float32)
    orient = Compose([Orientationd(keys=keys, axcodes=CANONICAL_AXCODES, labels=_RAS_LABELS, allow_missing_keys=True)])
    data = orient(data)
    spacing = [float(v) for v in data["image"].pixdim]
    pixdim = (spacing[0], max(spacing[1], settings.target_spacing_mm[0]), max(spacing[2], settings.target_spacing_mm[1]))
    resample = Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear", "nearest"][: len(keys)], padding_mode="border", allow_missing_keys=True)
    data = resample(data)
    image = data["image"].array[0]
    low, high = np.percentile(image, settings.clip_percentiles)
    image = np.clip(image, low, high)
    foreground = foreground_mask(image, settings)
    data["image"].array = zscore_on_foreground(image, foreground)[None]
    crop = SpatialCropd(keys=keys, **_crop_box(foreground, settings.crop_margin_voxels), allow_missing_keys=True)
    data = crop(data)
    mask = (data["mask"].array[0] > 0.5).astype(np.uint8) if "mask" in keys else None
    return PreprocessedCase(
        image=np.ascontiguousarray(data["image"].array[0], dtype=np.float32),
        mask=mask,
        spacing=tuple(float(v) for v in data["image"].pixdim),
        _stages=(orient, Compose([resample, crop])),
        _reference=data["image"],
    )


def _crop_box(foreground: np.ndarray, margin: int) -> dict[str, list[int]]:
    """Bounding box of the foreground plus `margin` voxels, within the image; the whole image when
    there is no foreground (nothing to crop to)."""
    if not foreground.any():
        return {"roi_start": [0] * foreground.ndim, "roi_end": list(foreground.shape)}
    start, end = [], []
    for axis in range(foreground.ndim):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        start.append(max(0, int(present[0]) - margin))
        end.append(min(foreground.shape[axis], int(present[-1]) + 1 + margin))
    return {"roi_start": start, "roi_end": end}
