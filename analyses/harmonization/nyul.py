"""Nyul-Udupa intensity standardization, trained across sites from landmark summaries only.

MR intensities have no physical unit: the same tissue reads differently on each scanner, and radiomics
features computed on raw intensities inherit that. Nyul & Udupa (1999, 2000) map every image's
intensity percentiles ("landmarks") onto one standard scale with a piecewise-linear function, so that
the same tissue lands at about the same value everywhere.

Federated, the training step needs only each site's mean landmarks:

    site      case_landmarks         percentiles of one image's foreground
    site      site_landmark_summary  n, mean and variance of the landmarks over its cases
    central   fit_standard_scale     the standard landmark positions, a `StandardScale`
    site      standardize            each image mapped onto the standard scale (stays at the site)

Departure from the original: Nyul averages the rescaled landmarks of every training image; here each
site's *mean* landmarks are rescaled and averaged, weighted by case count, so a site only ever sends
means and variances.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from datasite_setup.harmonization.nyul import (
    DEFAULT_PERCENTILES,
    StandardScale,
    case_landmarks,
    check_percentiles,
    foreground,
    site_landmark_summary,
    standardize,
)

__all__ = [
    "DEFAULT_PERCENTILES", "StandardScale", "case_landmarks", "fit_standard_scale", "foreground",
    "site_landmark_summary", "standardize",
]


def _rescaled(site: str, mean_landmarks: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """[L]: the site's mean landmarks mapped linearly so the first lands on scale[0], the last on scale[1]."""
    if np.any(np.diff(mean_landmarks) <= 0):
        raise ValueError(f"site '{site}': mean landmarks are not strictly increasing: {mean_landmarks.tolist()}")
    low, high = mean_landmarks[0], mean_landmarks[-1]
    return scale[0] + (mean_landmarks - low) / (high - low) * (scale[1] - scale[0])


def fit_standard_scale(
    summaries: Mapping[str, Mapping[str, Any]],
    scale: tuple[float, float] = (0.0, 100.0),
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> StandardScale:
    """Central: the standard landmarks, the case-weighted average of the sites' rescaled mean landmarks.

    `percentiles` must be those the sites used in `case_landmarks`; they travel with the scale so
    `standardize` can be given landmarks computed the same way.
    """
    percentiles = check_percentiles(percentiles)
    if not summaries:
        raise ValueError("no site landmark summaries")
    if not scale[1] > scale[0]:
        raise ValueError(f"scale must be increasing, got {scale}")
    total, weighted = 0, np.zeros(percentiles.size)
    for site, summary in summaries.items():
        mean = np.asarray(summary["mean"], dtype=float)
        if mean.shape != percentiles.shape:
            raise ValueError(f"site '{site}' sent {mean.size} landmarks, the scale has {percentiles.size} percentiles")
        weighted += int(summary["n"]) * _rescaled(site, mean, scale)
        total += int(summary["n"])
    if total == 0:
        raise ValueError("the site summaries hold no cases")
    return StandardScale(percentiles=percentiles.tolist(), landmarks=(weighted / total).tolist(), scale=tuple(scale))
