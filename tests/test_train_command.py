"""`federate train` end to end over simulated sites: what it prints and writes about held-out scores
and about a site it had to leave out.

Only the federation's transport is replaced (conftest's `federate_in_process`: `experiment.submit`
and `experiment.train` reach `SimulatedSite`s instead of datasites); the command's own code, the
orchestrator, the outputs and the comparison run as they do against live sites
(tests/test_federated_training.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from analyses.federation import experiment
from analyses.federation.orchestrator import TrainingPlan
from analyses.federation.simulated_site import SimulatedSite, with_splits
from tests.test_federation_strategies import phantom_cases

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture
def simulated_federation(federate_in_process) -> dict[str, SimulatedSite]:
    """Three sites, hospital-c holding fewer cases than its minimum cohort: it refuses every call."""
    links = {name: SimulatedSite(name, with_splits(phantom_cases(name, 4, seed))) for seed, name in enumerate(SITES)}
    links["hospital-c"] = SimulatedSite("hospital-c", links["hospital-c"].cases[:2], min_cohort=5)
    federate_in_process(list(links.values()))
    return links


def test_train_reports_test_scores_of_the_selected_round_and_the_left_out_site(simulated_federation, tmp_path, capsys) -> None:
    from analyses import cli

    out = tmp_path / "run"
    code = cli.main(["train", "federation.toml", "--domain", "brain_mr_tumour_burden", "--strategy", "fedavg",
                     "--rounds", "2", "--batch-size", "8", "--lr", "0.001", "--baselines", "--out", str(out), "--json",
                     "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["split"] == "test" and set(summary["final"]) == set(summary["best"]) == {"fedavg", "local"}
    assert set(summary["final"]["fedavg"]) == {"hospital-a", "hospital-b", "pooled"}  # hospital-c refused every call
    assert set(summary["left_out"]) == {"fedavg", "local"}
    reasons = {e["reason"] for e in summary["left_out"]["fedavg"]["hospital-c"]}
    assert all("below the site's minimum cohort of 5" in why for why in reasons)
    assert set(summary["cross_site"]["local"]["best"]) == {"hospital-a", "hospital-b"}
    assert summary["initial_model"] == {"fedavg": None, "local": None}  # regression has no output prior to ask for

    metrics = json.loads((out / "fedavg" / "metrics.json").read_text())
    assert metrics["selection"]["split"] == "validation" and metrics["best"]["round"] == metrics["selection"]["best_round"]
    assert metrics["final"]["split"] == "test" and metrics["final"]["round"] == 2
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["final"] == summary["final"] and comparison["best_round"] == summary["best_round"]
    for name in ("comparison.png", "comparison.csv", "comparison_cross_site.csv", "fedavg/best_weights.npz",
                 "local/training_curves.png"):
        assert (out / name).is_file(), name

    capsys.readouterr()
    assert cli.main(["train", "federation.toml", "--domain", "brain_mr_tumour_burden", "--strategy", "fedavg",
                     "--rounds", "2", "--out", str(tmp_path / "strict"), "--min-sites", "3", "--json", "--quiet"]) == 1
    failed = json.loads(capsys.readouterr().out)
    assert failed["status"] == "failed" and "min_sites is 3" in failed["error"] and "hospital-c" in failed["error"]


def test_the_report_shows_the_test_tables(simulated_federation, tmp_path, capsys) -> None:
    from analyses import cli
    from analyses.report import ReportInputs, _training_section

    out = tmp_path / "run"
    assert cli.main(["train", "federation.toml", "--domain", "brain_mr_tumour_burden", "--strategy", "fedavg",
                     "--rounds", "1", "--baselines", "--out", str(out), "--json", "--quiet"]) == 0
    summary: dict[str, Any] = {}
    inputs = ReportInputs(title="t", sites={}, radiomics_raw=tmp_path, radiomics_harmonized=tmp_path, training=out)
    (tmp_path / "report").mkdir()
    page = _training_section(inputs, tmp_path / "report", summary)
    assert "test rmse_cm2" in page and "selected on validation" in page and "Sites left out" in page
    assert summary["training"]["split"] == "test" and summary["training"]["best_round"]


class FakeDatasiteLink:
    """A datasite link as `experiment.train` sees it: request statuses, then the site's tasks."""

    def __init__(self, site: SimulatedSite, status: str | None = "approved", down: bool = False) -> None:
        self.site, self.status, self.down = site, status, down
        self.name = site.name

    def statuses(self, tasks: list[str]) -> dict[str, str | None]:
        if self.down:
            raise ConnectionError(f"{self.name}: connection refused")
        return {task: self.status for task in tasks}

    def train(self, params: dict[str, Any]) -> Any:
        if self.down:
            raise ConnectionError(f"{self.name}: connection refused")
        return self.site.train(params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        if self.down:
            raise ConnectionError(f"{self.name}: connection refused")
        return self.site.evaluate(params)


def test_a_denied_or_unreachable_site_is_left_out_while_min_sites_take_part(monkeypatch, tmp_path) -> None:
    sites = [SimulatedSite(name, with_splits(phantom_cases(name, 3, seed))) for seed, name in enumerate(SITES)]
    links = [FakeDatasiteLink(sites[0]), FakeDatasiteLink(sites[1], status="rejected"), FakeDatasiteLink(sites[2], down=True)]
    monkeypatch.setattr(experiment, "links_for", lambda federation, plan: links)
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=1, min_sites=1)
    report = experiment.train(None, plan, tmp_path / "run", progress=False)
    left = report.left_out()
    assert {e["reason"] for e in left["hospital-b"]} == {"the site's admin denied the request (local_train, evaluate)"}
    assert {e["reason"] for e in left["hospital-c"]} == {"hospital-c: connection refused"}
    assert report.history[1]["aggregated"] == ["hospital-a"]

    strict = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=1, min_sites=2)
    with pytest.raises(RuntimeError, match="only 1 of 3 sites can take part; min_sites is 2") as failed:
        experiment.train(None, strict, tmp_path / "strict", progress=False)
    assert "denied" in str(failed.value) and "unreachable" in str(failed.value)

    links[1].status = "pending"
    with pytest.raises(experiment.AwaitingApproval, match="hospital-b"):
        experiment.train(None, plan, tmp_path / "pending", progress=False)
