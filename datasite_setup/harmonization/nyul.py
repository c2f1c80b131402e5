"""Nyul-Udupa intensity standardization, the site's half: landmarks of its images and the mapping.

A site computes each image's foreground percentiles ("landmarks"), sends their mean and variance
(`site_landmark_summary`), and later maps its images onto the standard scale the data scientist
fitted from every site's summary (`standardize`). The per-case landmarks and the mapped images stay
at the site. The fitting half is `analyses.harmonization.nyul`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)


def check_percentiles(percentiles: Sequence[float]) -> np.ndarray:
    """The percentiles as an array, or a ValueError saying what a valid list is."""
    values = np.asarray(percentiles, dtype=float)
    if values.ndim != 1 or values.size < 2 or np.any(np.diff(values) <= 0) or values[0] < 0 or values[-1] > 100:
        raise ValueError(f"percentiles must be 2 or more increasing values in [0, 100], got {list(percentiles)}")
    return values


def foreground(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The voxels whose intensities define the landmarks, flattened.

    With a mask, its non-zero voxels. Without one, voxels brighter than the image mean: in MR the
    air background is dark and large, so this keeps the body while discarding most of the air, which
    would otherwise pin the low percentiles to noise (the usual default of Nyul implementations).
    """
    image = np.asarray(image, dtype=float)
    if mask is None:
        selected = image[image > image.mean()]
    else:
        if np.shape(mask) != image.shape:
            raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {image.shape}")
        selected = image[np.asarray(mask) > 0]
    if selected.size == 0:
        raise ValueError("the foreground is empty: the mask selects no voxel, or the image is constant")
    return selected


def case_landmarks(
    image: np.ndarray, mask: np.ndarray | None = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """Site side: [L] intensity percentiles of one image's foreground (see `foreground`)."""
    return np.percentile(foreground(image, mask), check_percentiles(percentiles))


def site_landmark_summary(cases_landmarks: Sequence[np.ndarray]) -> dict[str, Any]:
    """Site side: {"n": cases, "mean": [L], "var": [L] (ddof=1; 0 for a single case)} of the landmarks."""
    if len(cases_landmarks) == 0:
        raise ValueError("no case landmarks to summarize")
    sizes = sorted({np.size(case) for case in cases_landmarks})
    if len(sizes) > 1:
        raise ValueError(f"every case must have the same number of landmarks, got {sizes}")
    stacked = np.array([np.ravel(case) for case in cases_landmarks], dtype=float)
    n = stacked.shape[0]
    variance = stacked.var(axis=0, ddof=1) if n > 1 else np.zeros(stacked.shape[1])
    return {"n": int(n), "mean": stacked.mean(axis=0).tolist(), "var": variance.tolist()}


@dataclass(frozen=True)
class StandardScale:
    """The standard landmark positions [L] for `percentiles` [L]; landmarks[0] = scale[0], landmarks[-1] = scale[1]."""

    percentiles: list[float]
    landmarks: list[float]
    scale: tuple[float, float] = (0.0, 100.0)

    def to_params(self) -> dict[str, Any]:
        return {"percentiles": list(self.percentiles), "landmarks": list(self.landmarks), "scale": list(self.scale)}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> StandardScale:
        percentiles = [float(v) for v in params["percentiles"]]
        landmarks = [float(v) for v in params["landmarks"]]
        if len(percentiles) != len(landmarks):
            raise ValueError(f"scale has {len(percentiles)} percentiles but {len(landmarks)} landmarks")
        low, high = (float(v) for v in params["scale"])
        return cls(percentiles=percentiles, landmarks=landmarks, scale=(low, high))


def standardize(image: np.ndarray, landmarks: np.ndarray, scale: StandardScale) -> np.ndarray:
    """Site side: the image mapped piecewise-linearly from its own landmarks [L] onto the standard ones.

    Beyond the end landmarks the first and last segments are extended linearly, so dark background and
    bright outliers keep their order instead of being clipped. Same shape as `image`; monotone increasing.
    """
    source = np.asarray(landmarks, dtype=float)
    target = np.asarray(scale.landmarks, dtype=float)
    if source.shape != target.shape:
        raise ValueError(f"image has {source.size} landmarks, the standard scale {target.size}")
    if np.any(np.diff(source) <= 0):
        raise ValueError(
            f"image landmarks are not strictly increasing ({source.tolist()}): too few distinct intensities "
            "in the foreground for these percentiles"
        )
    values = np.asarray(image, dtype=float)
    low_slope = (target[1] - target[0]) / (source[1] - source[0])
    high_slope = (target[-1] - target[-2]) / (source[-1] - source[-2])
    mapped = np.interp(values, source, target)
    mapped = np.where(values < source[0], target[0] + (values - source[0]) * low_slope, mapped)
    return np.where(values > source[-1], target[-1] + (values - source[-1]) * high_slope, mapped)
