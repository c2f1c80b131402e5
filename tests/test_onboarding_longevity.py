"""Sites that join late or leave early, and where a round's time goes, in one process.

A clinic onboarded at round K (`join_at`) trains from K on but is scored on validation from round
0; a site that leaves after round L (`leave_after`) has the federation's weights scored on its test
split from L on (longevity); every training call is timed. The sites are `SimulatedSite`s (the real
site-task code on phantom cases), so the run takes seconds and needs no datasite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from analyses.federation.orchestrator import Orchestrator, RunReport, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite, with_splits
from tests.test_federation_strategies import phantom_cases

SITES = ("hospital-a", "hospital-b", "hospital-c")
DOMAIN = "brain_mr_tumour_burden"
METRIC = "rmse_cm2"


@dataclass
class CountingSite(SimulatedSite):
    """A simulated site that counts its evaluations and refuses the test evaluations listed in
    `refuse_tests` (1 = its first test evaluation), as a site that is down for one call would."""

    refuse_tests: frozenset[int] = frozenset()
    evaluations: int = 0
    tests: int = 0

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        self.evaluations += 1
        if params.get("split") == "test":
            self.tests += 1
            if self.tests in self.refuse_tests:
                raise ConnectionError(f"{self.name} is unreachable")
        return super().evaluate(params)


@pytest.fixture(scope="module")
def fleet_cases() -> dict[str, list[dict[str, Any]]]:
    return {name: with_splits(phantom_cases(name, 4, seed)) for seed, name in enumerate(SITES)}


@pytest.fixture(scope="module")
def run(fleet_cases, tmp_path_factory) -> tuple[RunReport, dict[str, CountingSite], TrainingPlan, Path]:
    """Three rounds: hospital-b joins at round 2, hospital-c leaves after round 1 and misses its
    second longevity evaluation (round 2)."""
    links = {name: CountingSite(name, cases) for name, cases in fleet_cases.items()}
    links["hospital-c"].refuse_tests = frozenset({2})
    plan = TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3, batch_size=8, lr=1e-3, min_sites=2,
                        join_at={"hospital-b": 2}, leave_after={"hospital-c": 1})
    out = tmp_path_factory.mktemp("run")
    report = Orchestrator(plan, list(links.values()), out, progress=False).run()
    return report, links, plan, out


def test_a_joining_site_trains_from_its_round_and_is_evaluated_before(run) -> None:
    report, _, plan, _ = run
    assert [r["participants"] for r in report.history[1:]] == [["hospital-a", "hospital-c"],
                                                              ["hospital-a", "hospital-b"], ["hospital-a", "hospital-b"]]
    assert [r["aggregated"] for r in report.history[1:]] == [r["participants"] for r in report.history[1:]]
    assert all("hospital-b" in r["site_metrics"] for r in report.history)  # scored on validation from round 0
    assert report.missed() == {}  # neither joining late nor leaving early counts as missing a round
    assert [plan.trains_in("hospital-b", k) for k in (1, 2, 3)] == [False, True, True]


def test_the_onboarding_summary_compares_the_joiner_with_the_founding_sites(run) -> None:
    report, _, _, _ = run
    for record in report.history:  # founding sites: those that train from round 1 (a and c)
        founding = {s: m for s, m in record["site_metrics"].items() if s != "hospital-b"}
        assert record["pooled_founding"]["n_cases"] == sum(m["n_cases"] for m in founding.values())
    summary = report.onboarding()
    assert set(summary) == {"hospital-b"}
    b = summary["hospital-b"]
    assert b["joins_at"] == 2 and b["rounds"] == [0, 1, 2, 3] and b["split"] == "validation"
    assert b["site"] == [r["site_metrics"]["hospital-b"][METRIC] for r in report.history]
    assert b["founding_pooled"] == [r["pooled_founding"][METRIC] for r in report.history]
    reached = next((k for k, v, ref in zip(b["rounds"], b["site"], b["founding_pooled"])
                    if k >= 2 and v <= ref * (1 + b["tolerance"])), None)  # RMSE: lower is better
    assert b["reached_round"] == reached
    assert b["rounds_to_reach"] == (None if reached is None else reached - 1)


def test_a_departed_site_scores_the_weights_on_its_test_split_after_leaving(run, fleet_cases) -> None:
    report, links, plan, _ = run
    assert [("longevity" in r, "longevity_missed" in r) for r in report.history] == [(False, False)] + [(True, True)] * 3
    assert [sorted(r["longevity"]) for r in report.history[1:]] == [["hospital-c"], [], ["hospital-c"]]
    assert "unreachable" in report.history[2]["longevity_missed"]["hospital-c"]
    final_at_c = SimulatedSite("hospital-c", fleet_cases["hospital-c"]).evaluate(
        {"domain": DOMAIN, "weights": report.final_state["global"], "split": "test"})
    assert report.history[3]["longevity"]["hospital-c"] == pytest.approx(final_at_c)  # the live weights, on test
    c = report.longevity()["hospital-c"]
    assert c["leaves_after"] == 1 and c["rounds"] == [1, 3] and c["split"] == "test"
    assert c["departure_value"] == report.history[1]["longevity"]["hospital-c"][METRIC]
    faded = 3 if c["test"][1] > c["departure_value"] * (1 + c["tolerance"]) else None
    assert c["faded_round"] == faded and c["rounds_until_faded"] == (None if faded is None else 2)
    assert c["missed"] == [{"round": 2, "reason": report.history[2]["longevity_missed"]["hospital-c"]}]
    assert {"round": 2, "phase": "test (longevity)", "reason": "hospital-c is unreachable"} in report.left_out()["hospital-c"]
    assert report.selection["best_round"] in (0, 1, 2, 3)  # selection reads validation only

    budget = plan.budgets(len(SITES))["evaluate"]
    assert budget == 3 + 1 + 2 + 3 + plan.spare_runs  # validations, tests, longevity (rounds 1-3), spare
    assert links["hospital-c"].evaluations <= budget - plan.spare_runs  # a run without redo needs no spare
    assert TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3).budgets(3)["evaluate"] == budget - 3


def test_each_training_call_is_timed_and_sums_up(run) -> None:
    report, _, _, _ = run
    for record in report.history[1:]:
        calls = record["train_calls"]
        assert set(calls) == set(record["aggregated"])
        for timing in calls.values():
            assert 0 < timing["compute_seconds"] <= timing["wall_seconds"]
            assert timing["other_seconds"] == pytest.approx(timing["wall_seconds"] - timing["compute_seconds"], abs=2e-3)
            assert timing["other_seconds"] >= 0 and timing["bytes_sent"] > 0 and timing["bytes_received"] > 0
        assert record["site_compute_seconds"] == pytest.approx(sum(c["compute_seconds"] for c in calls.values()), abs=2e-3)
        assert record["train_seconds"] <= record["seconds"]
    timing = report.timing()
    assert [r["round"] for r in timing["rounds"]] == [1, 2, 3]
    assert timing["wall_seconds"] >= timing["train_wall_seconds"] > 0 and timing["site_compute_seconds"] > 0
    assert timing["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in report.history), abs=2e-3)
    assert timing["bytes_received"] == sum(c["bytes_received"] for r in report.history[1:] for c in r["train_calls"].values())


def test_the_run_writes_the_summaries_and_the_plots(run) -> None:
    from analyses.federation.run_outputs import write_run

    report, _, _, out = run
    files = write_run(report, out / "outputs", METRIC)
    for kind in ("curves_png", "time_png", "longevity_png", "onboarding_png"):
        assert files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
    saved = json.loads(files["metrics_json"].read_text())
    assert saved["plan"]["join_at"] == {"hospital-b": 2}
    assert saved["onboarding"]["hospital-b"]["joins_at"] == 2 and saved["longevity"]["hospital-c"]["rounds"] == [1, 3]
    assert saved["timing"]["rounds"][0]["round"] == 1
    csv_text = files["metrics_csv"].read_text()
    assert "longevity (left after round 1)" in csv_text and "compute_seconds" in csv_text.splitlines()[0]


def test_a_plan_refuses_a_schedule_no_site_can_follow() -> None:
    with pytest.raises(ValueError, match="join_at must name rounds 1 to 3"):
        TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3, join_at={"hospital-b": 4})
    with pytest.raises(ValueError, match="leave_after must name rounds 1 to 3"):
        TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3, leave_after={"hospital-b": 0})
    with pytest.raises(ValueError, match="cannot join after it has left"):
        TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3, join_at={"hospital-b": 3}, leave_after={"hospital-b": 2})
    plan = TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3, join_at={"hospital-b": 2})
    assert plan.label != TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=3).label  # another plan, other requests


@pytest.fixture
def simulated_federation(fleet_cases, federate_in_process) -> dict[str, SimulatedSite]:
    """`federate train` reaching in-process sites instead of datasites."""
    links = {name: SimulatedSite(name, cases) for name, cases in fleet_cases.items()}
    federate_in_process(list(links.values()))
    return links


@pytest.mark.parametrize(("flags", "words"), [
    (["--join-at", "hospital-z=2"], "--join-at names sites not in the federation file: ['hospital-z']"),
    (["--join-at", "hospital-b"], "--join-at expects SITE=ROUND"),
    (["--join-at", "hospital-b=2", "--leave-after", "hospital-b=1"], "cannot join after it has left"),
    (["--join-at", "hospital-b=3"], "join_at must name rounds 1 to 2"),
])
def test_the_command_refuses_a_bad_join(simulated_federation, tmp_path, capsys, flags, words) -> None:
    from analyses import cli
    from analyses.commands import EXIT_BAD_INPUT

    code = cli.main(["train", "federation.toml", "--domain", DOMAIN, "--rounds", "2", *flags,
                     "--out", str(tmp_path / "run"), "--json", "--quiet"])
    failed = json.loads(capsys.readouterr().out)
    assert code == EXIT_BAD_INPUT and failed["status"] == "bad-input" and words in failed["error"], failed


def test_the_command_runs_every_method_on_the_same_schedule(simulated_federation, tmp_path, capsys) -> None:
    from analyses import cli

    out = tmp_path / "run"
    code = cli.main(["train", "federation.toml", "--domain", DOMAIN, "--strategy", "fedavg", "--rounds", "2",
                     "--lr", "0.001", "--join-at", "hospital-b=2", "--leave-after", "hospital-c=1", "--baselines",
                     "--out", str(out), "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert set(summary["onboarding"]) == set(summary["longevity"]) == {"fedavg", "local"}
    assert summary["onboarding"]["fedavg"]["hospital-b"]["joins_at"] == 2
    assert summary["longevity"]["local"]["hospital-c"]["rounds"] == [1, 2]
    assert set(summary["time"]) == {"fedavg", "local"} and summary["time"]["fedavg"]["wall_seconds"] > 0
    for method in ("fedavg", "local"):
        plan = json.loads((out / method / "metrics.json").read_text())["plan"]
        assert plan["join_at"] == {"hospital-b": 2} and plan["leave_after"] == {"hospital-c": 1}
        assert (out / method / "onboarding.png").is_file() and (out / method / "longevity.png").is_file()
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["longevity"] == summary["longevity"] and comparison["onboarding"] == summary["onboarding"]

    from analyses.report import ReportInputs, _training_section

    report_dir, page_numbers = tmp_path / "report", {}
    report_dir.mkdir()
    inputs = ReportInputs(title="t", sites={}, radiomics_raw=tmp_path, radiomics_harmonized=tmp_path, training=out)
    page = _training_section(inputs, report_dir, page_numbers)
    assert "Onboarding: a clinic joining mid-run" in page and "Longevity: a site that left" in page
    assert "Time and traffic" in page and page_numbers["training"]["longevity"] == summary["longevity"]
    for name in ("longevity.png", "onboarding.png", "time_fedavg.png", "time_local.png"):
        assert f'src="{name}"' in page and (report_dir / name).read_bytes()[:4] == b"\x89PNG", name


def test_a_held_out_site_never_trains_or_selects_and_is_scored_as_unseen(fleet_cases, tmp_path) -> None:
    from analyses.federation.centralized import train_centralized
    from analyses.federation.experiment import comparison_tables
    from analyses.federation.orchestrator import initial_weights
    from domains import get_domain

    links = {name: CountingSite(name, cases) for name, cases in fleet_cases.items()}
    plan = TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=2, batch_size=8, lr=1e-3, min_sites=2,
                        held_out=("hospital-c",))
    report = Orchestrator(plan, list(links.values()), tmp_path, progress=False).run()
    assert all(r["participants"] == ["hospital-a", "hospital-b"] for r in report.history[1:])
    for record in report.history:  # scored every round, pooled apart and never in the selecting pool
        trained = {s: m for s, m in record["site_metrics"].items() if s != "hospital-c"}
        assert record["pooled"]["n_cases"] == sum(m["n_cases"] for m in trained.values())
        assert record["pooled_held_out"]["n_cases"] == record["site_metrics"]["hospital-c"]["n_cases"]
    final = report.test["final"]
    assert final["pooled_held_out"][METRIC] == pytest.approx(final["site_metrics"]["hospital-c"][METRIC])
    central = train_centralized(plan, fleet_cases, initial_weights(get_domain(DOMAIN), plan.seed), progress=False)
    assert central["final"]["pooled_held_out"][METRIC] == pytest.approx(central["final"]["site_metrics"]["hospital-c"][METRIC])
    assert central["final"]["pooled"]["n_cases"] == sum(
        central["final"]["site_metrics"][s]["n_cases"] for s in ("hospital-a", "hospital-b"))
    table = comparison_tables({"fedavg": report}, METRIC, central)["final"]
    assert set(table["fedavg"]) == {*SITES, "pooled", "pooled (held-out sites)"}
    with pytest.raises(ValueError, match="cannot join or leave"):
        TrainingPlan(domain=DOMAIN, strategy="fedavg", rounds=2, held_out=("hospital-c",), join_at={"hospital-c": 2})
