"""Site task `intensity_landmarks`: the site's mean and variance of its images' intensity percentiles.

The first step of federated Nyul standardization (`analyses.harmonization.nyul`): each image's
foreground percentiles ("landmarks") are computed here, and only their count, mean and variance
across the site's cases leave. The centre averages the sites' means into one standard scale, which
`radiomics_aggregates` then applies to each image at the site (`harmonization` parameter).

The foreground is the whole image's bright part (voxels above the image mean), not the lesion
mask, so the scale describes the scanner's rendering of tissue in general and every case counts,
lesion or not. `radiomics_aggregates` computes each image's landmarks the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datasite_setup.site_tasks.task import Param, SiteFacts, SiteTask

MAX_LANDMARKS = 101


def percentiles_problems(percentiles: list[Any]) -> str | None:
    """Percentiles must be 2 to MAX_LANDMARKS strictly increasing numbers in [0, 100]."""
    if not 2 <= len(percentiles) <= MAX_LANDMARKS:
        return f"must list 2 to {MAX_LANDMARKS} percentiles"
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 100 for p in percentiles):
        return "percentiles must be numbers in [0, 100]"
    if any(b <= a for a, b in zip(percentiles, percentiles[1:])):
        return "percentiles must be strictly increasing"
    return None


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    from datasite_setup.harmonization.nyul import DEFAULT_PERCENTILES, case_landmarks, site_landmark_summary

    percentiles = params.get("percentiles", DEFAULT_PERCENTILES)
    summary = site_landmark_summary([case_landmarks(case["image"], None, percentiles) for case in cases])
    return {"n": int(summary["n"]), "mean": np.asarray(summary["mean"], float), "var": np.asarray(summary["var"], float)}


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.output_contracts import AggregatesContract

    return AggregatesContract(min_cohort=site.min_cohort, max_array_len=MAX_LANDMARKS)


TASK = SiteTask(
    name="intensity_landmarks",
    summary="n, mean and variance over the cases of each image's foreground intensity percentiles (Nyul landmarks)",
    params={
        "percentiles": Param(list, "foreground percentiles to use as landmarks (default 1, 10, ..., 90, 99)",
                             required=False, check=percentiles_problems),
    },
    run=run,
    contract=contract,
)
