"""Centralized baseline - SIMULATION ONLY: the same model trained on all sites' cases pooled.

A real federation can never do this (the point is that the images never leave the hospitals).
It exists to measure what federation costs, on phantom fleets whose DICOM the data scientist
generated herself. It runs the very site-task code the sites run (`local_train`, `evaluate`)
in this process, on the pooled cases, with the same plan: each "round" is the plan's epochs over
the pool (step cap scaled by the number of sites, so compute matches a federated round).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from analyses.federation.orchestrator import TrainingPlan
from analyses.federation.strategy import Weights

SIMULATION_LABEL = "centralized (simulation only: pooled data)"


def read_site_exports(exports: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Cases of each site read straight from its DICOM export folder (phantom fleets only)."""
    from datasite_setup.ingest import read_cases

    secret = os.urandom(32)
    cases = {}
    for site, folder in exports.items():
        result = read_cases(Path(folder), None, secret, progress=False)
        if not result.cases:
            raise ValueError(f"{site}: no readable cases under {folder}")
        cases[site] = result.cases
    return cases


def evaluate_at_sites(domain: str, weights: Weights, cases_by_site: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-site and pooled metrics, computed exactly as the sites' `evaluate` task would."""
    from datasite_setup.site_tasks import evaluate
    from datasite_setup.site_tasks.task import SiteFacts
    from domains import get_domain

    facts = SiteFacts(min_cohort=1)
    per_site = {site: evaluate.run(cases, {"domain": domain, "weights": weights}, facts) for site, cases in cases_by_site.items()}
    counts = {key: sum(m[key] for m in per_site.values()) for key in next(iter(per_site.values()))}
    pooled = dict(get_domain(domain).metrics_from_counts(counts))
    pooled["n_cases"] = counts["n_cases"]
    return per_site, pooled


def train_centralized(plan: TrainingPlan, cases_by_site: dict[str, list[dict[str, Any]]], initial: Weights,
                      progress: bool = True,
                      eval_cases_by_site: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """History (round 0 = initial model) of centralized training under `plan`, scored on
    `eval_cases_by_site` (held-out cases) when given, else on the training cases as the sites'
    own `evaluate` would be."""
    from datasite_setup.site_tasks import local_train
    from datasite_setup.site_tasks.task import SiteFacts

    pooled_cases = [case for site in sorted(cases_by_site) for case in cases_by_site[site]]
    facts = SiteFacts(min_cohort=1)
    scored = eval_cases_by_site or cases_by_site
    weights = initial
    per_site, pooled = evaluate_at_sites(plan.domain, weights, scored)
    history = [{"round": 0, "site_metrics": per_site, "pooled": pooled}]
    for round_no in tqdm(range(1, plan.rounds + 1), desc="centralized rounds", unit="round", disable=not progress):
        params = {
            "domain": plan.domain, "weights": weights, "epochs": plan.epochs, "batch_size": plan.batch_size,
            "lr": float(plan.lr), "optimizer": plan.optimizer, "seed": plan.seed * 100_003 + round_no * 101,
            "max_steps": plan.max_steps * len(cases_by_site),
        }
        result = local_train.run(pooled_cases, params, facts)
        weights = result["weights"]
        per_site, pooled = evaluate_at_sites(plan.domain, weights, scored)
        history.append({"round": round_no, "site_metrics": per_site, "pooled": pooled,
                        "train_loss": {"pooled": result["scalars"]["train_loss"]}})
    return history
