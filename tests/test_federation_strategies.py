"""Strategies, update checks, checkpoints and the orchestrator's round logic, in one process.

The sites here are simulated (`SimulatedSite`: the real site-task code and split selection on
phantom cases in this process) or scripted (`ScriptedSite`: weights and metrics chosen so a
round's selection can be checked exactly); the live-datasite tests (test_federated_training.py)
run the same orchestrator against real servers. These tests pin down the arithmetic, the
validation-selected round, the held-out test scores and the fault handling exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from analyses.federation import FedAvg, FedBN, FedProx, LocalOnly, SiteUpdate, make_strategy
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.fedbn import is_normalisation
from analyses.federation.orchestrator import Orchestrator, PlanMismatch, RoundFailed, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite, with_splits
from analyses.federation.update_checks import RejectedUpdate, check_update
from datasite_setup.model_weights import declared_shapes, exchanged_weights
from datasite_setup.site_tasks import local_train
from datasite_setup.site_tasks.task import SiteFacts
from domains import get_domain
from domains.brain_mr_segmentation import PROFILES, generate_case


def phantom_cases(profile: str, n: int, seed: int, slices: int = 6, matrix: int = 32) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    small = PROFILES[profile].with_size(matrix=matrix, n_slices=slices)
    return [generate_case(small, rng).as_record(f"{profile}-{i}") for i in range(n)]


@dataclass
class FaultySite(SimulatedSite):
    """A simulated site whose answers go wrong on purpose: broken updates or lost connections."""

    corrupt: str = ""  # "nan" or "shape"
    fail_calls: set[int] = field(default_factory=set)
    calls: int = 0
    evaluations: int = 0

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        self.evaluations += 1
        return super().evaluate(params)

    def train(self, params: dict[str, Any]) -> Any:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise ConnectionError(f"{self.name} is unreachable")
        result = super().train(params)
        name = next(iter(result["weights"]))
        if self.corrupt == "nan":
            result["weights"][name] = np.full_like(result["weights"][name], np.nan)
        elif self.corrupt == "shape":
            result["weights"][name] = result["weights"][name][..., :1]
        return result


def update(site: str, n: float, **arrays: np.ndarray) -> SiteUpdate:
    return SiteUpdate(site=site, weights=arrays, n_samples=n, train_loss=0.0)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    strategy = FedAvg()
    strategy.initialize({"w": np.zeros(3, np.float32)}, ["a", "b"])
    strategy.aggregate([update("a", 1, w=np.array([1, 2, 3], np.float32)), update("b", 3, w=np.array([5, 6, 7], np.float32))])
    assert strategy.weights_for("a") is strategy.weights_for("b")
    np.testing.assert_allclose(strategy.weights_for("a")["w"], [4.0, 5.0, 6.0])


def test_fedprox_sends_mu_and_refuses_zero() -> None:
    assert FedProx(mu=0.1).train_params("a") == {"mu": 0.1}
    assert FedAvg().train_params("a") == {}
    with pytest.raises(ValueError, match="mu > 0"):
        FedProx(mu=0.0)


def test_fedbn_keeps_normalisation_layers_per_site() -> None:
    model = get_domain("brain_mr_segmentation").build_model()
    weights = exchanged_weights(model)
    norm = [k for k in weights if is_normalisation(k)]
    assert norm and all("bn" in k for k in norm)
    assert not any(is_normalisation(k) for k in weights if "conv" in k.rsplit(".", 1)[0].split(".")[-1])
    strategy = FedBN()
    strategy.initialize(weights, ["a", "b"])
    new_a = {k: v + 1 for k, v in weights.items()}
    new_b = {k: v + 3 for k, v in weights.items()}
    strategy.aggregate([update("a", 1, **new_a), update("b", 1, **new_b)])
    for key in weights:
        if key in norm:
            np.testing.assert_allclose(strategy.weights_for("a")[key], new_a[key])
            np.testing.assert_allclose(strategy.weights_for("b")[key], new_b[key])
        else:
            np.testing.assert_allclose(strategy.weights_for("a")[key], weights[key] + 2, rtol=1e-6)
    restored = FedBN()
    restored.load_state(strategy.state())
    np.testing.assert_array_equal(restored.weights_for("b")[norm[0]], strategy.weights_for("b")[norm[0]])
    with pytest.raises(ValueError, match="normalisation"):
        FedBN().initialize(exchanged_weights(get_domain("brain_mr_tumour_burden").build_model()), ["a"])


def test_local_only_never_mixes_sites() -> None:
    strategy = LocalOnly()
    strategy.initialize({"w": np.zeros(2, np.float32)}, ["a", "b"])
    strategy.aggregate([update("a", 10, w=np.ones(2, np.float32))])
    np.testing.assert_array_equal(strategy.weights_for("a")["w"], [1, 1])
    np.testing.assert_array_equal(strategy.weights_for("b")["w"], [0, 0])
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("scaffoldish")


def test_update_checks_reject_nan_shape_names_and_counts() -> None:
    expected = {"w": (2,), "b": (1,)}
    good = {"weights": {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, "scalars": {"n_samples": 4.0, "train_loss": 0.5}}
    assert check_update("a", good, expected).n_samples == 4.0
    cases = {
        "NaN or Inf": {**good, "weights": {**good["weights"], "w": np.array([np.nan, 0], np.float32)}},
        "shape": {**good, "weights": {**good["weights"], "w": np.zeros(3, np.float32)}},
        "names differ": {**good, "weights": {"w": np.zeros(2, np.float32)}},
        "n_samples": {**good, "scalars": {"n_samples": 0.0, "train_loss": 0.5}},
        "not {": {"pixels": np.zeros((4, 4))},
    }
    for why, result in cases.items():
        with pytest.raises(RejectedUpdate, match=why):
            check_update("a", result, expected)


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    state = {"global": {"w": np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)}, "site/a": {"bn.w": np.ones(2, np.float32)}}
    save_checkpoint(tmp_path, Checkpoint(2, {"strategy": "fedbn"}, [{"round": 0}], state))
    save_checkpoint(tmp_path, Checkpoint(3, {"strategy": "fedbn"}, [{"round": 0}, {"round": 3}], state))
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 3 and [p.name for p in tmp_path.glob("state-*.npz")] == ["state-3.npz"]
    np.testing.assert_array_equal(loaded.state["global"]["w"], state["global"]["w"])
    assert load_checkpoint(tmp_path / "none") is None


@pytest.fixture(scope="module")
def three_sites() -> dict[str, list[dict[str, Any]]]:
    """Four tiny phantom cases per site: two train, one validation, one test (`with_splits`)."""
    return {name: with_splits(phantom_cases(name, 4, seed)) for seed, name in enumerate(("hospital-a", "hospital-b", "hospital-c"))}


def test_fedavg_one_full_batch_step_equals_centralized_gradient_descent(three_sites) -> None:
    """One SGD step on each site's full batch, averaged by sample count, is one gradient step on
    the pooled data: the loss is a mean over slices and the model has no batch statistics."""
    domain = get_domain("brain_mr_tumour_burden")
    torch.manual_seed(0)
    initial = exchanged_weights(domain.build_model())
    params = {"domain": domain.name, "weights": initial, "epochs": 1, "batch_size": 4096, "lr": 0.05,
              "optimizer": "sgd", "seed": 0, "max_steps": 1}
    facts = SiteFacts(min_cohort=1)
    strategy = FedAvg()
    strategy.initialize(initial, sorted(three_sites))
    updates = []
    for site, cases in three_sites.items():
        result = local_train.run(cases, params, facts)
        updates.append(check_update(site, result, declared_shapes(domain.build_model())))
    strategy.aggregate(updates)
    pooled = [c for site in sorted(three_sites) for c in three_sites[site]]
    central = local_train.run(pooled, params, facts)["weights"]
    moved = max(float(np.abs(central[k] - initial[k]).max()) for k in initial)
    assert moved > 1e-3  # the step is not trivially zero
    for key in initial:
        np.testing.assert_allclose(strategy.weights_for("hospital-a")[key], central[key], rtol=1e-5, atol=1e-6)


def test_orchestrator_rejects_bad_updates_skips_down_sites_and_resumes(three_sites, tmp_path) -> None:
    links = [
        FaultySite("hospital-a", three_sites["hospital-a"]),
        FaultySite("hospital-b", three_sites["hospital-b"], corrupt="nan"),
        FaultySite("hospital-c", three_sites["hospital-c"], fail_calls={2}),
    ]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=2, batch_size=8, lr=1e-3, min_sites=1)
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert [r["round"] for r in report.history] == [0, 1, 2]
    assert "NaN" in report.history[1]["rejected"]["hospital-b"]
    assert report.history[1]["aggregated"] == ["hospital-a", "hospital-c"]
    assert "unreachable" in report.history[2]["missed"]["hospital-c"]
    assert report.missed() == {"hospital-b": [1, 2], "hospital-c": [2]}
    assert all(np.isfinite(w).all() for w in report.final_state["global"].values())

    longer = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=3, batch_size=8, lr=1e-3, min_sites=1)
    with pytest.raises(PlanMismatch):
        Orchestrator(longer, links, tmp_path, progress=False).run()
    calls = [(link.calls, link.evaluations) for link in links]
    again = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert again.resumed_from == 2 and len(again.history) == 3
    assert [(link.calls, link.evaluations) for link in links] == calls  # finished and scored: reopening calls no site
    assert again.test == report.test and again.selection == report.selection


def test_round_fails_below_min_sites_and_keeps_the_checkpoint(three_sites, tmp_path) -> None:
    links = [FaultySite(n, c, corrupt="shape") for n, c in three_sites.items()]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=1, min_sites=2)
    with pytest.raises(RoundFailed, match="0 of 3 sites"):
        Orchestrator(plan, links, tmp_path, progress=False).run()
    assert load_checkpoint(tmp_path / "checkpoint").round == 0


def test_fleet_splits_are_fixed_non_empty_and_kept() -> None:
    cases = [{"case_id": f"c{i}"} for i in range(10)]
    first, again = with_splits(cases), with_splits(cases)
    assert [c["split"] for c in first] == [c["split"] for c in again]
    assert sorted(c["split"] for c in first) == ["test"] * 2 + ["train"] * 7 + ["validation"]
    for n in (3, 4, 5):
        assert {c["split"] for c in with_splits(cases[:n])} == {"train", "validation", "test"}
    assert [c["split"] for c in with_splits(cases[:1])] == ["train"]
    kept = with_splits([{"split": "test"}, *cases[:3]])
    assert kept[0]["split"] == "test" and "split" not in cases[0]
    with pytest.raises(ValueError, match="with_splits"):
        SimulatedSite("a", cases)


def test_a_simulated_site_selects_splits_as_a_datasite_does(three_sites) -> None:
    site = SimulatedSite("hospital-a", three_sites["hospital-a"])
    assert site.split_sizes() == {"train": 2, "validation": 1, "test": 1}
    torch.manual_seed(0)
    weights = exchanged_weights(get_domain("brain_mr_tumour_burden").build_model())
    train = site.train({"domain": "brain_mr_tumour_burden", "weights": weights, "epochs": 1, "batch_size": 4096,
                        "lr": 1e-3, "optimizer": "sgd", "seed": 0, "max_steps": 1})
    train_slices = sum(len(c["image"]) for c in site.cases if c["split"] == "train")
    assert train["scalars"]["n_samples"] == train_slices  # the train split only
    assert site.evaluate({"domain": "brain_mr_tumour_burden", "weights": weights})["n_cases"] == 1  # test by default
    assert site.evaluate({"domain": "brain_mr_tumour_burden", "weights": weights, "split": "all"})["n_cases"] == 4
    small = SimulatedSite("tiny", three_sites["hospital-b"][:2], min_cohort=5)
    with pytest.raises(Exception, match="below the site's minimum cohort of 5"):
        small.evaluate({"domain": "brain_mr_tumour_burden", "weights": weights, "split": "all"})


@dataclass
class ScriptedSite:
    """A site whose numbers are chosen: training adds `step` to every weight, so the round of the
    weights it is sent can be read from them; validation scores round k with `validation[k]` (as
    RMSE), test scores round k with 10 + k, so a test score says which round's weights it saw."""

    name: str
    validation: list[float]
    step: float = 1.0
    refuse_test: bool = False
    base: float | None = None

    def _round(self, weights: dict[str, np.ndarray]) -> int:
        value = float(np.asarray(weights["head.bias"]).ravel()[0])
        if self.base is None:
            self.base = value  # the first evaluation is the initial model's
        return int(round((value - self.base) / self.step))

    def train(self, params: dict[str, Any]) -> Any:
        weights = {k: (v + np.float32(self.step)).astype(v.dtype) for k, v in params["weights"].items()}
        return {"weights": weights, "scalars": {"n_samples": 4.0, "train_loss": 0.1}}

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        k = self._round(params["weights"])
        if params["split"] == "test" and self.refuse_test:
            raise RuntimeError("0 cases in split 'test' is below the site's minimum cohort of 1")
        rmse = self.validation[k] if params["split"] == "validation" else 10.0 + k
        return {"n_slices": 1.0, "abs_error_micro": rmse * 1e6, "sq_error_micro": rmse**2 * 1e6, "mae_cm2": rmse,
                "rmse_cm2": rmse, "n_cases": 1.0}


def test_the_round_is_selected_on_pooled_validation_and_scored_on_test(tmp_path) -> None:
    from analyses.federation.run_outputs import write_run

    script = [5.0, 3.0, 1.0, 2.0, 4.0]  # round 2 is best on validation (RMSE: lower is better)
    links = [ScriptedSite("a", script), ScriptedSite("b", script)]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=4, min_sites=2)
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert all(r["eval_split"] == "validation" for r in report.history)
    assert [round(r["pooled"]["rmse_cm2"], 6) for r in report.history] == script
    assert report.selection["best_round"] == 2 and report.selection["validation_value"] == pytest.approx(1.0)
    assert report.test["best"]["round"] == 2 and report.test["best"]["split"] == "test"
    assert report.test["best"]["pooled"]["rmse_cm2"] == pytest.approx(12.0)  # round 2's weights, on test
    assert report.test["final"]["round"] == 4 and report.test["final"]["pooled"]["rmse_cm2"] == pytest.approx(14.0)
    assert set(report.test["best"]["site_metrics"]) == {"a", "b"}
    np.testing.assert_allclose(report.best_state["global"]["head.bias"] - report.final_state["global"]["head.bias"], -2.0)

    files = write_run(report, tmp_path / "out", "rmse_cm2")
    saved = json.loads(files["metrics_json"].read_text())
    assert saved["selection"]["best_round"] == 2 and saved["best"]["pooled"]["rmse_cm2"] == pytest.approx(12.0)
    assert saved["final"]["split"] == "test" and saved["left_out"] == {}
    csv_text = files["metrics_csv"].read_text()
    assert csv_text.startswith("strategy,round,site,status,train_loss,split") and "test (best, round 2)" in csv_text
    with np.load(files["best_weights"]) as best:
        np.testing.assert_array_equal(best["global::head.bias"], report.best_state["global"]["head.bias"])


@dataclass
class TeachingSite(ScriptedSite):
    """A scripted site that records, per training call, the round of the weights it was sent and of
    the teacher beside them (None without one) and the split it was asked to train on."""

    calls: list[tuple[int, int | None, str]] = field(default_factory=list)

    def train(self, params: dict[str, Any]) -> Any:
        teacher = self._round(params["teacher"]) if "teacher" in params else None
        self.calls.append((self._round(params["weights"]), teacher, params.get("split", "train")))
        return super().train(params)


def test_teacher_student_rounds_are_taught_by_the_best_round_so_far_held_fixed(tmp_path) -> None:
    """From `semi_supervised_from` each site gets, beside the weights, the teacher: the round
    selected on validation so far, which changes only when a round validates better; the round
    record says which round taught. A resumed run picks up the same teacher."""
    script = [5.0, 3.0, 1.0, 2.0, 4.0, 6.0]  # RMSE per round: round 2 stays best from round 2 on
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=5, min_sites=1, semi_supervised_from=2)
    site = TeachingSite("a", script)
    report = Orchestrator(plan, [site], tmp_path, progress=False).run()
    assert site.calls == [(0, None, "train"), (1, 1, "train+unlabelled"), (2, 2, "train+unlabelled"),
                          (3, 2, "train+unlabelled"), (4, 2, "train+unlabelled")]
    assert [r.get("teacher_round") for r in report.history] == [None, None, 1, 2, 2, 2]

    checkpoint = load_checkpoint(tmp_path / "checkpoint")
    save_checkpoint(tmp_path / "resumed" / "checkpoint", Checkpoint(3, checkpoint.plan, checkpoint.history[:4],
                                                                    {"global": {k: v - 2 for k, v in checkpoint.state["global"].items()}},
                                                                    2, {"global": {k: v - 3 for k, v in checkpoint.state["global"].items()}}))
    again = TeachingSite("a", script, base=site.base)
    Orchestrator(plan, [again], tmp_path / "resumed", progress=False).run()
    assert again.calls == [(3, 2, "train+unlabelled"), (4, 2, "train+unlabelled")]
    with pytest.raises(ValueError, match="FedMA"):
        TrainingPlan(domain="brain_mr_segmentation", strategy="fedma", rounds=3, semi_supervised_from=2)


def test_the_selected_weights_survive_a_resume(tmp_path) -> None:
    script = [5.0, 1.0, 3.0, 4.0]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=3, min_sites=1)
    first = [ScriptedSite("a", script, refuse_test=True)]
    with pytest.raises(RoundFailed, match="test evaluation of the final weights: 0 of 1 sites"):
        Orchestrator(plan, first, tmp_path, progress=False).run()
    assert load_checkpoint(tmp_path / "checkpoint").round == 3  # the training is kept; only scoring is retried
    again = Orchestrator(plan, [ScriptedSite("a", script, base=first[0].base)], tmp_path, progress=False).run()
    assert again.resumed_from == 3 and again.selection["best_round"] == 1
    assert again.test["best"]["pooled"]["rmse_cm2"] == pytest.approx(11.0)


def test_a_site_below_min_cohort_is_left_out_with_its_reason_and_the_run_goes_on(three_sites, tmp_path) -> None:
    from analyses.federation.run_outputs import write_run

    links = [SimulatedSite("hospital-a", three_sites["hospital-a"]), SimulatedSite("hospital-b", three_sites["hospital-b"]),
             SimulatedSite("hospital-c", three_sites["hospital-c"][:2], min_cohort=5)]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=2, batch_size=8, lr=1e-3, min_sites=2)
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert [r["aggregated"] for r in report.history[1:]] == [["hospital-a", "hospital-b"]] * 2
    left = report.left_out()
    assert set(left) == {"hospital-c"}
    assert {e["phase"] for e in left["hospital-c"]} == {"train", "validation", "test (best weights)", "test (final weights)"}
    assert all("below the site's minimum cohort of 5" in e["reason"] for e in left["hospital-c"])
    assert set(report.test["final"]["site_metrics"]) == {"hospital-a", "hospital-b"}
    assert report.test["final"]["pooled"]["n_cases"] == 2.0  # one test case at each answering site
    saved = json.loads(write_run(report, tmp_path / "out", "rmse_cm2")["metrics_json"].read_text())
    assert saved["left_out"]["hospital-c"][0] == {
        "round": 0, "phase": "validation", "reason": "1 cases in split 'validation' is below the site's minimum cohort of 5"}


def test_the_run_stops_when_fewer_than_min_sites_answer(three_sites, tmp_path) -> None:
    links = [SimulatedSite("hospital-a", three_sites["hospital-a"]),
             SimulatedSite("hospital-b", three_sites["hospital-b"][:2], min_cohort=5),
             FaultySite("hospital-c", three_sites["hospital-c"], fail_calls={1})]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=1, min_sites=2)
    with pytest.raises(RoundFailed, match="1 of 3 sites") as failed:
        Orchestrator(plan, links, tmp_path, progress=False).run()
    assert "below the site's minimum cohort" in str(failed.value) and "unreachable" in str(failed.value)
    assert load_checkpoint(tmp_path / "checkpoint").round == 0


def test_local_only_is_scored_at_its_own_site_and_at_the_others(three_sites, tmp_path) -> None:
    links = [SimulatedSite(name, cases) for name, cases in three_sites.items()]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="local", rounds=1, batch_size=8, lr=1e-3)
    assert plan.budgets(3) == {"local_train": 3, "evaluate": 2 + 2 * 3 + 2}
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    final = report.test["final"]
    assert set(final["cross_site"]) == set(three_sites)
    assert all(set(at) == set(three_sites) - {model} for model, at in final["cross_site"].items())
    own_a = SimulatedSite("hospital-a", three_sites["hospital-a"]).evaluate(
        {"domain": plan.domain, "weights": report.final_state["site/hospital-a"]})
    at_b = SimulatedSite("hospital-b", three_sites["hospital-b"]).evaluate(
        {"domain": plan.domain, "weights": report.final_state["site/hospital-a"]})
    assert final["site_metrics"]["hospital-a"] == pytest.approx(own_a)
    assert final["cross_site"]["hospital-a"]["hospital-b"] == pytest.approx(at_b)
    assert final["cross_site_pooled"]["hospital-a"]["n_cases"] == 2.0


def test_compare_reports_test_scores_of_the_selected_and_final_rounds(three_sites, tmp_path) -> None:
    from analyses.federation.centralized import train_centralized
    from analyses.federation.experiment import compare

    links = [SimulatedSite(name, cases) for name, cases in three_sites.items()]
    reports = {}
    for strategy in ("fedavg", "local"):
        plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy=strategy, rounds=1, batch_size=8, lr=1e-3)
        reports[strategy] = Orchestrator(plan, links, tmp_path / strategy, progress=False).run()
    torch.manual_seed(0)
    initial = exchanged_weights(get_domain(plan.domain).build_model())
    central = train_centralized(plan, three_sites, initial, progress=False)
    assert central["history"][0]["eval_split"] == "validation" and central["final"]["split"] == "test"
    assert central["final"]["pooled"]["n_cases"] == 3.0  # each site's one test case
    tables = compare(reports, tmp_path / "cmp", "rmse_cm2", central)
    assert tables["split"] == "test" and set(tables["best"]) == {"fedavg", "local", "centralized (simulation)"}
    assert tables["final"]["fedavg"]["pooled"] == pytest.approx(reports["fedavg"].test["final"]["pooled"]["rmse_cm2"])
    assert set(tables["cross_site"]) == {"local"}
    assert all(t["site_compute_seconds"] > 0 for t in tables["time"].values())  # one key, federated or not
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["best_round"] == tables["best_round"] and (tmp_path / "cmp" / "comparison_cross_site.csv").is_file()
