"""Site task `cohort_summary`: how many cases per scanner group, and their intensity and lesion size.

Returns, per group of the chosen acquisition field (e.g. Manufacturer), the case count and the
mean and variance across cases of (a) the mean image intensity inside the lesion mask and
(b) the lesion volume in millilitres. Groups smaller than the site's minimum cohort are left out
entirely; no per-case value is returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyses.site_tasks.task import Param, SiteFacts, SiteTask

GROUP_FIELDS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "SliceThickness")


def _lesion_stats(case: dict[str, Any]) -> tuple[float, float]:
    mask = case["mask"] > 0
    voxel_ml = float(np.prod(case["spacing"])) / 1000.0
    intensity = float(case["image"][mask].mean()) if mask.any() else float("nan")
    return intensity, float(mask.sum()) * voxel_ml


def _mean_var(values: list[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.mean()), float(finite.var(ddof=1)) if finite.size > 1 else 0.0


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, dict[str, float]]:
    groups: dict[str, list[tuple[float, float]]] = {}
    for case in cases:
        key = str(case["metadata"].get(params["group_by"], "unknown"))
        groups.setdefault(key, []).append(_lesion_stats(case))
    summary = {}
    for key, stats in sorted(groups.items()):
        if len(stats) < site.min_cohort:
            continue
        intensity_mean, intensity_var = _mean_var([s[0] for s in stats])
        volume_mean, volume_var = _mean_var([s[1] for s in stats])
        summary[key] = {
            "n": len(stats),
            "lesion_intensity_mean": intensity_mean,
            "lesion_intensity_var": intensity_var,
            "lesion_ml_mean": volume_mean,
            "lesion_ml_var": volume_var,
        }
    return summary


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.output_contracts import AggregatesContract

    return AggregatesContract(min_cohort=site.min_cohort, max_array_len=0)


TASK = SiteTask(
    name="cohort_summary",
    summary="case counts, lesion intensity and lesion volume per scanner group (aggregates only)",
    params={
        "group_by": Param(
            str, f"acquisition field to group by: one of {', '.join(GROUP_FIELDS)}",
            check=lambda v: None if v in GROUP_FIELDS else f"must be one of {', '.join(GROUP_FIELDS)}",
        )
    },
    run=run,
    contract=contract,
)
