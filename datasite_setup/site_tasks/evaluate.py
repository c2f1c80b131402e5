"""Site task `evaluate`: the global model's segmentation quality at this site, pooled over cases.

Returns the domain's additive evaluation counts summed over all the site's cases (for
segmentation: voxel confusion counts) and the metrics computed from them (Dice, sensitivity,
specificity, F1). Counts are additive, so the orchestrator can pool sites exactly; nothing per
case is returned. The result may carry every scalar the domain declares (a 3-D domain reports
counts per structure, per-patient sums and detection counts), and nothing else.

An evaluation covers every case of one split (`split`, default `test`: the site's held-out cases,
which no `local_train` run uses by default), at least the site's minimum cohort. Two evaluations of
different weights over the same cases are two questions about one cohort, which the site allows;
an evaluation over a case set differing from an earlier one by a few cases (a data set re-uploaded
with one case more) would give that case's counts, and the site's release ledger refuses it.
With `harmonization` the images are first mapped onto the Nyul standard scale training used; with
`widths` (FedMA) the model is built at those widths (`model_widths.py`).
"""

from __future__ import annotations

from typing import Any

from datasite_setup.site_tasks.harmonized_cases import HARMONIZATION_PARAM, harmonized
from datasite_setup.site_tasks.model_widths import WIDTHS_PARAM, built_model, widths_problem
from datasite_setup.site_tasks.task import Param, SiteFacts, SiteTask, known_domain


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, float]:
    from datasite_setup.model_weights import load_weights
    from domains import get_domain

    domain = get_domain(params["domain"])
    model = built_model(domain, params)
    load_weights(model, params["weights"])
    counts = domain.evaluation_counts(model, harmonized(cases, params))
    metrics = domain.metrics_from_counts(counts)
    return {**{k: float(v) for k, v in counts.items()}, **{k: float(v) for k, v in metrics.items()}, "n_cases": float(len(cases))}


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.output_contracts import ScalarsContract
    from domains import get_domain

    names = get_domain(params["domain"]).evaluation_scalars | {"n_cases"}
    return ScalarsContract(names=names, max_items=len(names))


def site_policy(params: dict[str, Any], site: SiteFacts) -> str | None:
    """What the site refuses before the run: widths its domain's model cannot have."""
    return widths_problem(params)


TASK = SiteTask(
    name="evaluate",
    summary="the domain's metrics (e.g. Dice, sensitivity, specificity, F1) of the given weights on one split of the local cases (pooled counts; default the test split)",
    params={
        "domain": Param(str, "the learning task (e.g. brain_mr_segmentation)", check=known_domain),
        "weights": Param(dict, "weights to evaluate: {state name: float array}"),
        "harmonization": HARMONIZATION_PARAM,
        "widths": WIDTHS_PARAM,
    },
    run=run,
    contract=contract,
    policy=site_policy,
    default_split="test",
)
