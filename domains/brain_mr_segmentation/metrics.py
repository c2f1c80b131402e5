"""Brain MR segmentation's evaluation counts: pooled voxel counts, and per-case sums.

Pooled (voxel) Dice is the domain's primary metric: voxel counts add over cases and sites, so the
federation's value is exact (`domains.segmentation_metrics`). Each case also adds its own Dice,
sensitivity and specificity (parts per million) and 1 to `cases`; their means weigh every case
alike. They are also what a site that noises its evaluations (`[privacy.evaluation_dp]`) can
release, since one case moves each sum by at most 1 (`EVALUATION_BOUNDS`). Such a site withholds
the voxel counts (one case is up to millions of voxels, and noise that hid it would hide
everything) and the HD95 sums (one case's HD95 is not bounded: an empty prediction scores the
grid's diagonal), so the pooled metrics and mean HD95 are absent there, and a federated run finds
no pooled validation Dice to select a round by (it keeps the final round, and says so).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from domains import segmentation_metrics
from domains.segmentation_metrics import COUNT_KEYS, HD95_KEYS, confusion_counts, hd95_counts

PER_CASE = ("dice", "sensitivity", "specificity")
PPM = 1_000_000
PER_CASE_KEYS = ("cases",) + tuple(f"{name}_sum_ppm" for name in PER_CASE)
# The most one case adds to each count a noised evaluation releases (0: the same for every case).
EVALUATION_BOUNDS = {"cases": 0.0, **{f"{name}_sum_ppm": float(PPM) for name in PER_CASE}}
EVALUATION_SCALARS = frozenset(COUNT_KEYS + HD95_KEYS + PER_CASE_KEYS) | frozenset(
    {"dice", "sensitivity", "specificity", "f1", "hd95_mm"} | {f"{name}_per_case" for name in PER_CASE}
)


def case_counts(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, int]:
    """Every count of one case: binary masks `predicted` and `truth` [Z, Y, X] on the case's grid."""
    confusion = confusion_counts(predicted, truth)
    own = segmentation_metrics.metrics_from_counts(confusion)
    return {**confusion, **hd95_counts(predicted, truth, spacing), "cases": 1,
            **{f"{name}_sum_ppm": int(round(own[name] * PPM)) for name in PER_CASE}}


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Counts summed key by key over cases (or sites); a key some parts lack is left out."""
    keys = [key for key in COUNT_KEYS + HD95_KEYS + PER_CASE_KEYS if counts and all(key in c for c in counts)]
    return {key: sum(int(c[key]) for c in counts) for key in keys}


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """The pooled metrics (and mean HD95) when the voxel counts are there, the per-case means when
    the per-case sums are; a noised sum is capped at what `cases` cases can add."""
    metrics: dict[str, float] = {}
    if all(key in counts for key in COUNT_KEYS):
        metrics.update(segmentation_metrics.metrics_from_counts(counts))
    if all(key in counts for key in PER_CASE_KEYS):
        cases = int(counts["cases"])
        for name in PER_CASE:
            total = min(max(int(counts[f"{name}_sum_ppm"]), 0), cases * PPM)
            metrics[f"{name}_per_case"] = total / PPM / cases if cases else 1.0
    if not metrics:
        raise KeyError(f"brain MR counts lack both the voxel counts {list(COUNT_KEYS)} and the per-case sums "
                       f"{list(PER_CASE_KEYS)}")
    return metrics
