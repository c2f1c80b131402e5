"""Site-side preprocessing of one CT case for the 3-D U-Net, run with MONAI's invertible transforms.

CT arrives calibrated in Hounsfield units, so unlike MR nothing is estimated from the image: a
fixed abdominal window maps HU to [0, 1] the same way at every hospital. What differs between
scanners is the grid (0.7-1 mm pixels, 1-5 mm slices), so every case is resampled to one
isotropic-ish spacing; a 3-D model sees millimetres, not voxels. The body (anything denser than
`body_threshold_hu`) is cropped out of the surrounding air, and a case smaller than a patch is
padded to one. Every geometric step is inverted for predictions, so a model is scored on the
case's own grid against the mask as the hospital drew it.

Steps: canonical orientation (axial slices on the first array axis), resampling to
`target_spacing_mm`, HU window to [0, 1], crop to the body, pad to at least `min_shape`.

MONAI is imported where a case is processed (importing it costs ~2.5 s), not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from domains.case_record import record_affine

if TYPE_CHECKING:
    from monai.data import MetaTensor
    from monai.transforms import Compose

CANONICAL_AXCODES = "SPL"  # array order [Z, Y, X]: +z superior, +y posterior, +x left (LPS)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class CTPreprocessing:
    """What every site does to a CT case before the 3-D U-Net sees it.

    `hu_window` is the abdominal soft-tissue window (level 40, width 400): fat, liver, lesions and
    vessels spread over [0, 1], air and bone saturate. `target_spacing_mm` is (z, y, x); 4 mm keeps
    a whole abdomen within a few hundred thousand voxels, which a CPU site trains on in minutes.
    `min_shape` is the patch size the model trains on (a case is padded to at least that)."""

    hu_window: tuple[float, float] = (-160.0, 240.0)
    target_spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    body_threshold_hu: float = -500.0
    crop_margin_voxels: int = 2
    min_shape: tuple[int, int, int] = (32, 48, 48)

    def __post_init__(self) -> None:
        low, high = self.hu_window
        if not high > low:
            raise ValueError(f"hu_window {self.hu_window}: the upper bound must exceed the lower one")
        if min(self.target_spacing_mm) <= 0:
            raise ValueError(f"target_spacing_mm {self.target_spacing_mm} must be positive")


DEFAULT_PREPROCESSING = CTPreprocessing()


@dataclass
class PreprocessedCT:
    """One case on the model's grid: image float32 [Z', Y', X'] in [0, 1], mask uint8 labels (None
    for a case without one), their spacing, and what it takes to map a prediction back."""

    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    _stages: tuple[Compose, Compose]
    _reference: MetaTensor

    def to_original_grid(self, channels: np.ndarray) -> np.ndarray:
        """Per-class maps float32 [C, Z', Y', X'] on the model's grid -> [C, Z, Y, X] on the case's
        own grid (trilinear). Voxels cropped away as air come back as 0 in every channel."""
        from monai.data import MetaTensor

        reference = self._reference
        prediction = MetaTensor(torch.as_tensor(channels, dtype=torch.float32), affine=reference.affine.clone())
        prediction.applied_operations = [dict(op) for op in reference.applied_operations]
        data = {"image": prediction}
        for stage in reversed(self._stages):
            data = stage.inverse(data)
        return np.asarray(data["image"].array, dtype=np.float32)


def _as_meta(array: np.ndarray, affine: np.ndarray, dtype: type) -> MetaTensor:
    """A private channel-first copy: transforms may work in place, and the site's record (possibly a
    read-only memory map) must come out of preprocessing untouched."""
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.array(array, dtype=dtype, copy=True))[None], affine=torch.as_tensor(affine, dtype=torch.float64))


def preprocess_ct(record: dict[str, Any], settings: CTPreprocessing = DEFAULT_PREPROCESSING, with_mask: bool = True) -> PreprocessedCT:
    """Orient, resample, window, crop and pad one case record (its "mask" too when it has one and
    `with_mask`). Only this case's arrays are read."""
    from monai.transforms import Compose, Orientationd, Spacingd, SpatialCropd, SpatialPadd

    keys = ["image"] + (["mask"] if with_mask and record.get("mask") is not None else [])
    affine = record_affine(record)
    data: dict[str, Any] = {"image": _as_meta(np.asarray(record["image"]), affine, np.float32)}
    if "mask" in keys:
        data["mask"] = _as_meta(np.asarray(record["mask"]), affine, np.float32)
    orient = Compose([Orientationd(keys=keys, axcodes=CANONICAL_AXCODES, labels=_RAS_LABELS, allow_missing_keys=True)])
    data = orient(data)
    resample = Spacingd(keys=keys, pixdim=settings.target_spacing_mm, mode=["bilinear", "nearest"][: len(keys)], padding_mode="border", allow_missing_keys=True)
    data = resample(data)
    hu = data["image"].array[0]
    body = hu > settings.body_threshold_hu
    low, high = settings.hu_window
    data["image"].array = ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)[None]
    crop = SpatialCropd(keys=keys, **_crop_box(body, settings.crop_margin_voxels), allow_missing_keys=True)
    pad = SpatialPadd(keys=keys, spatial_size=settings.min_shape, mode="constant", value=0.0, allow_missing_keys=True)
    data = pad(crop(data))
    mask = np.rint(data["mask"].array[0]).astype(np.uint8) if "mask" in keys else None
    return PreprocessedCT(
        image=np.ascontiguousarray(data["image"].array[0], dtype=np.float32),
        mask=mask,
        spacing=tuple(float(v) for v in data["image"].pixdim),
        _stages=(orient, Compose([resample, crop, pad])),
        _reference=data["image"],
    )


def _crop_box(body: np.ndarray, margin: int) -> dict[str, list[int]]:
    """Bounding box of the body plus `margin` voxels; the whole volume when nothing is body."""
    if not body.any():
        return {"roi_start": [0] * body.ndim, "roi_end": list(body.shape)}
    start, end = [], []
    for axis in range(body.ndim):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(body.ndim) if a != axis)))
        start.append(max(0, int(present[0]) - margin))
        end.append(min(body.shape[axis], int(present[-1]) + 1 + margin))
    return {"roi_start": start, "roi_end": end}
