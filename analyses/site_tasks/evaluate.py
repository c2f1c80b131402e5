"""Site task `evaluate`: the global model's segmentation quality at this site, pooled over cases.

Returns the voxel confusion counts summed over all the site's cases and the metrics computed
from them (Dice, sensitivity, specificity, F1). Counts are additive, so the orchestrator can pool
sites exactly; nothing per case is returned.
"""

from __future__ import annotations

from typing import Any

from analyses.site_tasks.task import Param, SiteFacts, SiteTask, known_domain

SCALARS = frozenset({"tp", "fp", "tn", "fn", "dice", "sensitivity", "specificity", "f1", "n_cases"})


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, float]:
    from analyses.model_weights import load_weights
    from domains import get_domain

    domain = get_domain(params["domain"])
    model = domain.build_model()
    load_weights(model, params["weights"])
    counts = domain.confusion_counts(model, cases)
    metrics = domain.metrics_from_counts(counts)
    return {**{k: float(v) for k, v in counts.items()}, **{k: float(v) for k, v in metrics.items()}, "n_cases": float(len(cases))}


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.output_contracts import ScalarsContract

    return ScalarsContract(names=SCALARS)


TASK = SiteTask(
    name="evaluate",
    summary="Dice, sensitivity, specificity and F1 of the given weights on all local cases (pooled counts)",
    params={
        "domain": Param(str, "the learning task (e.g. brain_mr_segmentation)", check=known_domain),
        "weights": Param(dict, "weights to evaluate: {state name: float array}"),
    },
    run=run,
    contract=contract,
)
