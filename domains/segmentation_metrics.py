"""Segmentation metrics built from confusion counts.

Sites report integer counts, not metrics: counts add up across slices, cases and hospitals, so
the federation's pooled Dice is exact, while averaging per-site Dice is not.

Conventions for empty denominators: a ratio whose denominator is 0 is 1.0. So Dice (and F1) of
an empty prediction on an empty target is 1.0 (a tumour-free case correctly left empty is a
success, not a missing value), sensitivity with no tumour voxels is 1.0 and specificity with no
background voxels is 1.0; precision, used inside F1, follows the same rule. For binary voxel counts F1 equals Dice; both are
reported because clinical and ML readers look for different names.

HD95 (the 95th percentile of surface distances, by MONAI) is not additive by itself, so a site
reports the sum of its cases' HD95 in whole micrometres and the number of those cases; summed over
sites these give the exact mean HD95 over all pooled cases, and a site's pair never describes
fewer cases than the evaluation's cohort (every evaluated case enters, see `hd95_mm`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


COUNT_KEYS = ("tp", "fp", "tn", "fn")
HD95_KEYS = ("hd95_sum_um", "hd95_cases")


def confusion_counts(prediction: np.ndarray, target: np.ndarray) -> dict[str, int]:
    """Voxel counts of a binary prediction (non-zero = tumour) against a binary target."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    predicted, actual = prediction.astype(bool), target.astype(bool)
    tp = int(np.count_nonzero(predicted & actual))
    fp = int(np.count_nonzero(predicted & ~actual))
    fn = int(np.count_nonzero(~predicted & actual))
    return {"tp": tp, "fp": fp, "tn": int(actual.size) - tp - fp - fn, "fn": fn}


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Sum confusion counts (and HD95 sums, when every part has them), e.g. over the cases of a site or over sites."""
    keys = COUNT_KEYS + (HD95_KEYS if counts and all(key in c for c in counts for key in HD95_KEYS) else ())
    return {key: sum(int(c[key]) for c in counts) for key in keys}


def hd95_mm(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of a binary prediction against a binary target on a grid of `spacing` (array order):
    MONAI's definition (edge voxels from `get_mask_edges`, the larger of the two directed 95th
    percentiles of edge-to-edge distances).

    Every case gets a value, so a site's mean is over all its evaluated cases: both empty is a
    perfect 0, exactly one empty is the grid's diagonal (the worst distance the grid allows).
    Distances come from Euclidean distance transforms of the edges rather than MONAI's KD-tree:
    the same nearest-edge distances, in time linear in the box around both masks, where a noisy
    prediction of an early 3-D model (millions of edge voxels) made the KD-tree take seconds per case.
    MONAI is imported here, on first use (see `preprocessing`)."""
    from monai.metrics.utils import get_mask_edges
    from scipy.ndimage import distance_transform_edt

    predicted, actual = prediction.astype(bool), target.astype(bool)
    if not predicted.any() and not actual.any():
        return 0.0
    if not predicted.any() or not actual.any():
        return float(np.linalg.norm(np.asarray(predicted.shape) * np.asarray(spacing, dtype=float)))
    sampling = [float(v) for v in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        predicted_edges, actual_edges = get_mask_edges(predicted, actual, crop=True, always_return_as_numpy=True)
    to_actual = distance_transform_edt(~actual_edges, sampling=sampling)[predicted_edges]
    to_predicted = distance_transform_edt(~predicted_edges, sampling=sampling)[actual_edges]
    return float(max(np.percentile(to_actual, 95), np.percentile(to_predicted, 95)))


def hd95_counts(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict[str, int]:
    """One case's HD95 as additive integers: micrometres and a case count."""
    return {"hd95_sum_um": int(round(hd95_mm(prediction, target, spacing) * 1000)), "hd95_cases": 1}


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """Dice, sensitivity, specificity and F1 from tp/fp/tn/fn; mean HD95 (mm) too when the counts
    carry its sums."""
    missing = [key for key in COUNT_KEYS if key not in counts]
    if missing:
        raise KeyError(f"confusion counts lack {missing}; expected keys {list(COUNT_KEYS)}")
    tp, fp, tn, fn = (int(counts[key]) for key in COUNT_KEYS)
    if min(tp, fp, tn, fn) < 0:
        raise ValueError(f"confusion counts must be non-negative, got {counts}")
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = 0.0 if precision + sensitivity == 0 else 2 * precision * sensitivity / (precision + sensitivity)
    metrics = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
    }
    if all(key in counts for key in HD95_KEYS) and int(counts["hd95_cases"]) > 0:
        metrics["hd95_mm"] = int(counts["hd95_sum_um"]) / 1000 / int(counts["hd95_cases"])
    return metrics
