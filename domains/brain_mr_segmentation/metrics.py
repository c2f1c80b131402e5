"""Segmentation metrics built from confusion counts.

Sites report integer counts, not metrics: counts add up across slices, cases and hospitals, so
the federation's pooled Dice is exact, while averaging per-site Dice is not.

Conventions for empty denominators: a ratio whose denominator is 0 is 1.0. So Dice (and F1) of
an empty prediction on an empty target is 1.0 (a tumour-free case correctly left empty is a
success, not a missing value), sensitivity with no tumour voxels is 1.0 and specificity with no
background voxels is 1.0; precision, used inside F1, follows the same rule. For binary voxel counts F1 equals Dice; both are
reported because clinical and ML readers look for different names.
"""

from __future__ import annotations

import numpy as np

COUNT_KEYS = ("tp", "fp", "tn", "fn")


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
    """Sum confusion counts, e.g. over the cases of a site or over sites."""
    return {key: sum(int(c[key]) for c in counts) for key in COUNT_KEYS}


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """Dice, sensitivity, specificity and F1 from tp/fp/tn/fn."""
    missing = [key for key in COUNT_KEYS if key not in counts]
    if missing:
        raise KeyError(f"confusion counts lack {missing}; expected keys {list(COUNT_KEYS)}")
    tp, fp, tn, fn = (int(counts[key]) for key in COUNT_KEYS)
    if min(tp, fp, tn, fn) < 0:
        raise ValueError(f"confusion counts must be non-negative, got {counts}")
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = 0.0 if precision + sensitivity == 0 else 2 * precision * sensitivity / (precision + sensitivity)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
    }
