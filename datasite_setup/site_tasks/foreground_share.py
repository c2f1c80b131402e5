"""Site task `foreground_share`: how many of the site's voxels are tumour, summed over its cases.

The federation starts its model's output bias at the tumour share of voxels pooled over the sites
(the "prior"): a model that starts far from it predicts no tumour anywhere for the first rounds.
This task returns the two sums behind that share, over the cases of one split (default `train`,
the cases the model is trained on), after the domain's own preprocessing: the number of tumour
voxels, the number of all voxels and the number n of cases. Nothing per case leaves; the site's
min-count rule applies to n, and the whole run's cases are its one cohort.
"""

from __future__ import annotations

from typing import Any

from datasite_setup.site_tasks.task import Param, SiteFacts, SiteTask, known_domain, plain_aggregates


def prior_domain(name: str) -> str | None:
    """A known domain that estimates an output prior (not every learning task has one)."""
    from domains import get_domain

    problem = known_domain(name)
    if problem is None and not hasattr(get_domain(name), "foreground_counts"):
        problem = "this domain has no output prior (no foreground_counts)"
    return problem


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    from domains import get_domain

    counts = get_domain(params["domain"]).foreground_counts(cases)
    return {"n": len(cases), "tumour_voxels": float(counts["tumour_voxels"]), "voxels": float(counts["voxels"])}


TASK = SiteTask(
    name="foreground_share",
    summary="tumour voxels and all voxels summed over one split's cases, and their number (aggregates only; default the train split)",
    params={
        "domain": Param(str, "the learning task (e.g. brain_mr_segmentation); it must have an output prior", check=prior_domain),
    },
    run=run,
    contract=plain_aggregates,
    default_split="train",
)
