"""Evaluation as additive integers, so clinics pool exactly: counts and fixed-point error sums.

A site returns, over its cases, the number of cases, the sums of absolute and squared errors of
weight and height (in millionths of a kg, kg², cm, cm², as integers), and how many estimates lie
within 10 % and within 20 % of the true value. Summed over sites these give the federation's
MAE, RMSE and P10/P20 exactly as if all cases had been evaluated in one place. P10 of weight (the
share of patients within 10 % of their true weight) is the figure the literature reports beside
MAE (above 78 %, often about 90 %).
"""

from __future__ import annotations

import numpy as np

FIXED_POINT = 1_000_000
_QUANTITIES = (("weight", "kg"), ("height", "cm"))
# An estimate further off than this counts as this far off: it bounds what one patient can add to
# the error sums, which a site that noises evaluations needs (`EVALUATION_BOUNDS`); the noise grows
# with it. A trained model's errors stay far below it; an untrained one's may reach it.
MAX_ERROR = {"weight": 30.0, "height": 30.0}
COUNT_KEYS = frozenset({"n_cases"} | {f"{q}_{kind}" for q, _ in _QUANTITIES for kind in (
    "abs_error_micro", "sq_error_micro", "within_10pct", "within_20pct")})
METRIC_KEYS = frozenset({"mae_kg", "rmse_kg", "mae_cm", "rmse_cm", "p10_weight", "p20_weight", "p10_height", "p20_height"})
# The most one patient adds to each count (0: a count that does not depend on what a case holds).
EVALUATION_BOUNDS = {"n_cases": 0.0, **{key: bound for q, _ in _QUANTITIES for key, bound in (
    (f"{q}_abs_error_micro", MAX_ERROR[q] * FIXED_POINT), (f"{q}_sq_error_micro", MAX_ERROR[q] ** 2 * FIXED_POINT),
    (f"{q}_within_10pct", 1.0), (f"{q}_within_20pct", 1.0))}}


def error_counts(predicted: np.ndarray, true: np.ndarray) -> dict[str, int]:
    """Counts of estimates `predicted` against `true`, both [N, 2] (weight kg, height cm); each
    error clipped to `MAX_ERROR`."""
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.ndim != 2 or predicted.shape[1] != 2:
        raise ValueError(f"predicted and true values must both be [N, 2] (weight kg, height cm), got "
                         f"{predicted.shape} and {true.shape}")
    counts = {"n_cases": len(true)}
    for column, (quantity, _) in enumerate(_QUANTITIES):
        error = np.clip(predicted[:, column] - true[:, column], -MAX_ERROR[quantity], MAX_ERROR[quantity])
        relative = np.abs(error) / np.abs(true[:, column])
        counts[f"{quantity}_abs_error_micro"] = int(np.rint(np.abs(error) * FIXED_POINT).sum())
        counts[f"{quantity}_sq_error_micro"] = int(np.rint(error**2 * FIXED_POINT).sum())
        counts[f"{quantity}_within_10pct"] = int(np.count_nonzero(relative <= 0.10))
        counts[f"{quantity}_within_20pct"] = int(np.count_nonzero(relative <= 0.20))
    return counts


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Counts of several sites (or halves of one) as one."""
    return {key: sum(int(c.get(key, 0)) for c in counts) for key in sorted(COUNT_KEYS)}


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """MAE and RMSE (kg, cm) and P10/P20 (shares) from (pooled) counts; NaN without cases."""
    missing = sorted(COUNT_KEYS - set(counts))
    if missing:
        raise ValueError(f"evaluation counts lack {missing}; they come from the body_weight_height domain's "
                         "evaluation_counts (summed over sites)")
    n = int(counts["n_cases"])
    if n == 0:
        return {key: float("nan") for key in sorted(METRIC_KEYS)}
    metrics = {}
    for quantity, unit in _QUANTITIES:
        metrics[f"mae_{unit}"] = int(counts[f"{quantity}_abs_error_micro"]) / FIXED_POINT / n
        metrics[f"rmse_{unit}"] = float(np.sqrt(int(counts[f"{quantity}_sq_error_micro"]) / FIXED_POINT / n))
        metrics[f"p10_{quantity}"] = min(int(counts[f"{quantity}_within_10pct"]), n) / n  # noised counts may exceed n
        metrics[f"p20_{quantity}"] = min(int(counts[f"{quantity}_within_20pct"]), n) / n
    return metrics
