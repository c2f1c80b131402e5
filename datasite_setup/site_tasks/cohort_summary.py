"""Site task `cohort_summary`: per scanner group, the lesions' intensity and size.

Returns, per group of the chosen acquisition field (e.g. Manufacturer), the number n of cases
with a lesion and, over exactly those n cases, the mean and variance of (a) the mean image
intensity inside the lesion mask and (b) the lesion volume in millilitres. A case without a lesion
has no lesion intensity, so it enters no group: every statistic of a group is over the same n
cases, and the site's min-count rule applies to that n. No per-case value is returned; the
site's disclosure rules (`datasite_setup.disclosure`) decide which groups leave.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from datasite_setup.site_tasks.task import (
    LESION_MEAN_INTENSITY, LESION_VOLUME, Cohort, Param, Release, SiteFacts, SiteTask, plain_aggregates,
)

GROUP_FIELDS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "SliceThickness")


def _lesion_stats(case: dict[str, Any]) -> tuple[float, float] | None:
    """(mean intensity inside the lesion, lesion ml), or None for a case without a usable lesion."""
    mask = case["mask"] > 0
    if not mask.any():
        return None
    intensity = float(case["image"][mask].mean())
    volume = float(mask.sum()) * float(np.prod(case["spacing"])) / 1000.0
    return (intensity, volume) if math.isfinite(intensity) and math.isfinite(volume) else None


def _mean_var(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.var(ddof=1)) if values.size > 1 else 0.0


def release(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> Release:
    members: dict[str, list[int]] = {}
    stats: dict[int, tuple[float, float]] = {}
    for i, case in enumerate(cases):
        lesion = _lesion_stats(case)
        if lesion is not None:
            stats[i] = lesion
            members.setdefault(str(case["metadata"].get(params["group_by"], "unknown")), []).append(i)
    summary, cohorts = {}, []
    for key, group in sorted(members.items()):
        intensity_mean, intensity_var = _mean_var(np.array([stats[i][0] for i in group]))
        volume_mean, volume_var = _mean_var(np.array([stats[i][1] for i in group]))
        summary[key] = {
            "n": len(group),
            "lesion_intensity_mean": intensity_mean,
            "lesion_intensity_var": intensity_var,
            "lesion_ml_mean": volume_mean,
            "lesion_ml_var": volume_var,
        }
        cohorts += [Cohort((key,), LESION_MEAN_INTENSITY, tuple(group)), Cohort((key,), LESION_VOLUME, tuple(group))]
    return Release(summary, tuple(cohorts))


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, dict[str, float]]:
    return release(cases, params, site).result


TASK = SiteTask(
    name="cohort_summary",
    summary="per scanner group: cases with a lesion, their lesion intensity and lesion volume (aggregates only)",
    params={
        "group_by": Param(
            str, f"acquisition field to group by: one of {', '.join(GROUP_FIELDS)}",
            check=lambda v: None if v in GROUP_FIELDS else f"must be one of {', '.join(GROUP_FIELDS)}",
        )
    },
    run=run,
    release=release,
    contract=plain_aggregates,
)
