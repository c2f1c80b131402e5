"""Harmonization before segmentation: `federate train --harmonize nyul` fits a Nyul scale across the
sites, and every training and evaluation call maps its images onto it at the site."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyses.federation.orchestrator import Orchestrator, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite, with_splits
from analyses.harmonization.nyul import fit_standard_scale
from datasite_setup.site_tasks import TASKS, run_installed_task
from datasite_setup.site_tasks.harmonized_cases import HarmonizedCases, standardized
from datasite_setup.harmonization.nyul import StandardScale
from tests.test_federation_strategies import phantom_cases

SITES = ("hospital-a", "hospital-b", "hospital-c")


@dataclass
class RecordingSite(SimulatedSite):
    """A simulated site that keeps the parameters of every call it answers."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def train(self, params: dict[str, Any]) -> Any:
        self.calls.append(("train", params))
        return super().train(params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        self.calls.append(("evaluate", params))
        return super().evaluate(params)

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("landmarks", params))
        return super().landmarks(params)


def fleet() -> list[RecordingSite]:
    return [RecordingSite(name, with_splits(phantom_cases(name, 4, seed, slices=4, matrix=16))) for seed, name in enumerate(SITES)]


def test_the_federation_fits_one_nyul_scale_and_every_site_call_carries_it(tmp_path: Path) -> None:
    plan = TrainingPlan(domain="brain_mr_segmentation", strategy="fedavg", rounds=1, max_steps=1, harmonize="nyul",
                        no_augmentation=True, min_sites=3)
    assert plan.budgets(3)["intensity_landmarks"] == 1 + plan.spare_runs
    sites = fleet()
    report = Orchestrator(plan, sites, tmp_path / "run", progress=False).run()
    record = report.history[0]["harmonization"]
    train_summaries = {s.name: run_installed_task("intensity_landmarks", s.cases, {"split": "train"}, min_cohort=1) for s in sites}
    assert record["fitted"] == "federated" and record["sites"] == list(SITES)
    assert record["scale"]["landmarks"] == pytest.approx(fit_standard_scale(train_summaries).landmarks, rel=1e-12)
    for site in sites:
        kinds = [kind for kind, _ in site.calls]
        assert kinds[0] == "landmarks" and site.calls[0][1] == {"split": "train"}
        for kind, params in site.calls[1:]:
            assert params["harmonization"] == {"nyul": record["scale"]}, kind
        assert all(params.get("augment") is False for kind, params in site.calls if kind == "train")

    given = TrainingPlan(**{**plan.__dict__, "nyul_scale": record["scale"]})
    assert "intensity_landmarks" not in given.budgets(3)
    again = Orchestrator(given, fleet(), tmp_path / "given", progress=False).run()
    assert again.history[0]["harmonization"] == {"method": "nyul", "fitted": "given", "scale": record["scale"]}
    with pytest.raises(ValueError, match="harmonize must be 'nyul'"):
        TrainingPlan(domain="brain_mr_segmentation", strategy="fedavg", rounds=1, harmonize="zscore")


def test_harmonized_cases_are_standardized_one_at_a_time_and_evaluation_scores_them() -> None:
    cases = phantom_cases("hospital-b", 3, 1, slices=4, matrix=16)
    landmarks = run_installed_task("intensity_landmarks", cases, {}, min_cohort=1)
    scale = fit_standard_scale({"only": landmarks})
    lazy = HarmonizedCases(cases, scale)
    assert len(lazy) == 3 and np.array_equal(lazy[1]["image"], standardized(cases[1], scale)["image"])
    assert not np.array_equal(lazy[1]["image"], cases[1]["image"]) and np.array_equal(lazy[1]["mask"], cases[1]["mask"])
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    weights = exchanged_weights(get_domain("brain_mr_segmentation").build_model())
    params = {"domain": "brain_mr_segmentation", "weights": weights, "split": "all"}
    scored = run_installed_task("evaluate", cases, {**params, "harmonization": {"nyul": scale.to_params()}}, min_cohort=1)
    assert scored == run_installed_task("evaluate", [standardized(c, scale) for c in cases], params, min_cohort=1)
    bad = TASKS["local_train"].problems({"domain": "brain_mr_segmentation", "weights": weights, "epochs": 1, "batch_size": 8,
                                         "lr": 1e-3, "optimizer": "adam", "seed": 0, "harmonization": {"zscore": {}}})
    assert bad == ["parameter 'harmonization': must be {'nyul': <StandardScale.to_params()>}"]
    assert StandardScale.from_params(scale.to_params()) == scale
