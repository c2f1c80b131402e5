"""The initial model's output prior: the `foreground_share` site task, and the orchestrator pooling it.

Simulated sites on tiny phantom fleets whose tumours are all small or all large: the initial
model's output bias must follow the fleet's pooled tumour share (logit of it, within the domain's
clipping), a site that refuses is left out of it with its reason, too few answers fall back to the
domain's default, and a resumed run does not ask again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from analyses.federation import experiment
from analyses.federation.orchestrator import Orchestrator, TrainingPlan
from analyses.federation.run_outputs import write_run
from analyses.federation.simulated_site import SimulatedSite, with_splits
from datasite_setup.output_contracts import ContractViolation
from datasite_setup.site_tasks import TASKS, run_for_parent, run_installed_task
from datasite_setup.site_tasks.task import SiteFacts
from domains.brain_mr_segmentation import DOMAIN, PRIOR_RANGE, PROFILES, generate_case

SITES = ("hospital-a", "hospital-b", "hospital-c")
TASK = TASKS["foreground_share"]


def fleet(radius_mm: tuple[float, float], n: int = 4) -> dict[str, list[dict[str, Any]]]:
    """Every site's tiny phantom cases, each with a tumour of the given radius range."""
    out = {}
    for seed, name in enumerate(SITES):
        profile = replace(PROFILES[name].with_size(matrix=32, n_slices=6), tumour_prevalence=1.0, tumour_radius_mm=radius_mm)
        rng = np.random.default_rng(seed)
        out[name] = with_splits([generate_case(profile, rng).as_record(f"{name}-{i}") for i in range(n)])
    return out


@pytest.fixture(scope="module")
def small_tumours() -> dict[str, list[dict[str, Any]]]:
    return fleet((10.0, 12.0))


@pytest.fixture(scope="module")
def large_tumours() -> dict[str, list[dict[str, Any]]]:
    return fleet((28.0, 32.0))


def train_share(cases_by_site: dict[str, list[dict[str, Any]]], sites: tuple[str, ...] = SITES) -> float:
    """The tumour share of voxels over the sites' train splits, computed here from the cases."""
    counts = [DOMAIN.foreground_counts([c for c in cases_by_site[s] if c["split"] == "train"]) for s in sites]
    return DOMAIN.prior_from_counts({key: sum(c[key] for c in counts) for key in counts[0]})


def logit_within_clipping(share: float) -> float:
    share = min(max(share, PRIOR_RANGE[0]), PRIOR_RANGE[1])
    return math.log(share / (1 - share))


@dataclass
class WatchedSite(SimulatedSite):
    """A simulated site that remembers the initial model's output bias (the first weights it
    evaluates) and counts its foreground calls; with `refuse_prior`, it refuses them."""

    refuse_prior: bool = False
    foreground_calls: int = 0
    initial_bias: float | None = None

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        self.foreground_calls += 1
        if self.refuse_prior:
            raise RuntimeError("the site refused foreground_share")
        return super().foreground(params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        if self.initial_bias is None:
            self.initial_bias = float(np.asarray(params["weights"]["head.bias"]).ravel()[0])
        return super().evaluate(params)


def plan(**changes: Any) -> TrainingPlan:
    return TrainingPlan(**{"domain": "brain_mr_segmentation", "strategy": "fedavg", "rounds": 1, "batch_size": 8,
                           "max_steps": 1, **changes})


def run(cases_by_site: dict[str, list[dict[str, Any]]], out, refusing: tuple[str, ...] = (), **changes: Any):
    links = [WatchedSite(name, cases, refuse_prior=name in refusing) for name, cases in cases_by_site.items()]
    return Orchestrator(plan(**changes), links, out, progress=False).run(), links


def test_the_task_sums_the_train_split_and_meets_its_contract(small_tumours) -> None:
    cases = small_tumours["hospital-a"]
    result = run_installed_task("foreground_share", cases, {"domain": DOMAIN.name}, min_cohort=1)
    train = [c for c in cases if c["split"] == "train"]
    counts = DOMAIN.foreground_counts(train)
    assert result == {"n": len(train), "tumour_voxels": float(counts["tumour_voxels"]), "voxels": float(counts["voxels"])}
    assert 0 < result["tumour_voxels"] < result["voxels"]
    everything = run_installed_task("foreground_share", cases, {"domain": DOMAIN.name, "split": "all"}, min_cohort=1)
    assert everything["n"] == len(cases) and everything["voxels"] > result["voxels"]

    TASK.contract({"domain": DOMAIN.name}, SiteFacts(min_cohort=2)).check(result)
    with pytest.raises(ContractViolation, match="smaller than the minimum cohort of 3"):
        TASK.contract({"domain": DOMAIN.name}, SiteFacts(min_cohort=3)).check(result)
    with pytest.raises(ContractViolation):
        TASK.contract({"domain": DOMAIN.name}, SiteFacts(min_cohort=1)).check({**result, "per_case": [1.0, 2.0]})

    parent = run_for_parent("foreground_share", cases, {"domain": DOMAIN.name}, min_cohort=1, min_batch=1)
    (path, quantity, positions), = parent["cohorts"]  # the whole run's cases, one cohort
    assert path == [] and quantity == "foreground_share"
    assert sorted(positions.tolist()) == [i for i, c in enumerate(cases) if c["split"] == "train"]
    assert "below the site's minimum cohort of 9" in run_for_parent(
        "foreground_share", cases, {"domain": DOMAIN.name}, min_cohort=9, min_batch=1)["refused"]


def test_the_task_reads_the_case_store_as_it_reads_cases_in_memory(small_tumours, tmp_path) -> None:
    from datasite_setup.case_store import CaseSource, CaseStore

    cases = small_tumours["hospital-b"]
    store = CaseStore(tmp_path / "site-data")
    version = store.new_version()
    for i, case in enumerate(cases):
        store.put(case, patient=f"p{i}", split=case["split"], version=version)
    lazy = CaseSource(store.root, [e.to_dict() for e in store.manifest()])
    for params in ({"domain": DOMAIN.name}, {"domain": DOMAIN.name, "split": "all"}):
        assert run_installed_task("foreground_share", lazy, params, min_cohort=1) == run_installed_task(
            "foreground_share", cases, params, min_cohort=1)


def test_the_task_checks_its_parameters() -> None:
    assert TASK.problems({"domain": DOMAIN.name}) == []
    assert TASK.problems({"domain": DOMAIN.name, "split": "test"}) == []
    assert TASK.problems({"domain": DOMAIN.name, "weights": {}}) == ["unknown parameter 'weights'"]
    assert TASK.problems({}) and "missing parameter 'domain'" in TASK.problems({})[0]
    assert "no output prior" in TASK.problems({"domain": "brain_mr_tumour_burden"})[0]
    assert "unknown domain" in TASK.problems({"domain": "brain_ct"})[0]
    assert "must be one of" in TASK.problems({"domain": DOMAIN.name, "split": "holdout"})[0]
    assert TASK.default_split == "train"


def test_the_initial_output_bias_follows_the_fleets_pooled_tumour_share(small_tumours, large_tumours, tmp_path) -> None:
    biases = {}
    for name, cases in (("small", small_tumours), ("large", large_tumours)):
        report, links = run(cases, tmp_path / name)
        prior = report.initial_model
        share = train_share(cases)
        assert prior["source"] == "pooled foreground_share" and prior["sites"] == list(SITES) and prior["left_out"] == {}
        assert prior["foreground_fraction"] == pytest.approx(share)
        assert prior["pooled"]["n"] == sum(c["split"] == "train" for site in cases.values() for c in site)
        assert all(link.initial_bias == pytest.approx(logit_within_clipping(share), abs=1e-5) for link in links)
        biases[name] = links[0].initial_bias
        saved = json.loads(write_run(report, tmp_path / f"{name}-out", "dice")["metrics_json"].read_text())
        assert saved["initial_model"] == prior and saved["history"][0]["initial_model"] == prior
    assert biases["large"] > biases["small"] + 1.0


def test_a_site_refusing_its_share_is_left_out_of_the_prior(small_tumours, tmp_path) -> None:
    report, links = run(small_tumours, tmp_path / "two", refusing=("hospital-b",), min_sites=2)
    prior = report.initial_model
    assert prior["sites"] == ["hospital-a", "hospital-c"]
    assert prior["left_out"] == {"hospital-b": "the site refused foreground_share"}
    assert prior["foreground_fraction"] == pytest.approx(train_share(small_tumours, ("hospital-a", "hospital-c")))
    assert report.left_out()["hospital-b"] == [{"round": 0, "phase": "output prior", "reason": "the site refused foreground_share"}]
    assert report.history[1]["aggregated"] == list(SITES)  # it still trains

    report, links = run(small_tumours, tmp_path / "all", refusing=("hospital-b",), min_sites=3)
    prior = report.initial_model
    assert prior["source"] == "domain default" and prior["foreground_fraction"] == pytest.approx(0.1)
    assert "2 of 3 sites" in prior["reason"] and "min_sites is 3" in prior["reason"]
    assert links[0].initial_bias == pytest.approx(logit_within_clipping(0.1), abs=1e-5)


def test_a_resumed_run_does_not_ask_again(small_tumours, tmp_path) -> None:
    first, links = run(small_tumours, tmp_path)
    assert [link.foreground_calls for link in links] == [1, 1, 1]
    again = Orchestrator(plan(), links, tmp_path, progress=False).run()
    assert again.resumed_from == 1 and [link.foreground_calls for link in links] == [1, 1, 1]
    assert again.initial_model == first.initial_model


def test_a_domain_without_a_prior_is_never_asked(small_tumours, tmp_path) -> None:
    report, links = run(small_tumours, tmp_path, domain="brain_mr_tumour_burden")
    assert report.initial_model is None and all(link.foreground_calls == 0 for link in links)
    assert "foreground_share" not in plan(domain="brain_mr_tumour_burden").budgets(3)
    spare = plan().spare_runs
    assert plan().budgets(3)["foreground_share"] == 1 + spare  # once per run, plus the spare runs of a redo


class StatusLink:
    """A datasite link as `experiment.train` sees it, with one status per task."""

    def __init__(self, site: WatchedSite, statuses: dict[str, str]) -> None:
        self.site, self.name, self.by_task = site, site.name, statuses

    def statuses(self, tasks: list[str]) -> dict[str, str | None]:
        return {task: self.by_task.get(task, "approved") for task in tasks}

    def train(self, params: dict[str, Any]) -> Any:
        return self.site.train(params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        return self.site.evaluate(params)

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.site.foreground(params)


def test_a_site_whose_admin_denied_only_the_prior_still_trains(small_tumours, monkeypatch, tmp_path) -> None:
    sites = [WatchedSite(name, cases) for name, cases in small_tumours.items()]
    links = [StatusLink(sites[0], {}), StatusLink(sites[1], {"foreground_share": "rejected"}),
             StatusLink(sites[2], {"foreground_share": "pending"})]
    monkeypatch.setattr(experiment, "links_for", lambda federation, p: links)
    with pytest.raises(experiment.AwaitingApproval, match="hospital-c: foreground_share pending"):
        experiment.train(None, plan(), tmp_path / "pending", progress=False)
    links[2].by_task = {}
    report = experiment.train(None, plan(), tmp_path / "run", progress=False)
    assert report.initial_model["left_out"] == {"hospital-b": "the site's admin denied the request (foreground_share)"}
    assert sites[1].foreground_calls == 0 and report.history[1]["aggregated"] == list(SITES)
