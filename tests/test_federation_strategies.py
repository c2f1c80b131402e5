"""Strategies, update checks, checkpoints and the orchestrator's round logic, in one process.

The sites here are simulated (`SimulatedSite`: the real site-task code on phantom cases in this
process); the live-datasite tests (test_federated_training.py) run the same orchestrator
against real servers. These tests pin down the arithmetic and the fault handling exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from analyses.federation import FedAvg, FedBN, FedProx, LocalOnly, SiteUpdate, make_strategy
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.fedbn import is_normalisation
from analyses.federation.simulated_site import SimulatedSite
from analyses.federation.orchestrator import Orchestrator, PlanMismatch, RoundFailed, TrainingPlan
from analyses.federation.update_checks import RejectedUpdate, check_update
from datasite_setup.model_weights import declared_shapes, exchanged_weights
from datasite_setup.site_tasks import evaluate, local_train
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
    return {name: phantom_cases(name, 2, seed) for seed, name in enumerate(("hospital-a", "hospital-b", "hospital-c"))}


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
    again = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert again.resumed_from == 2 and len(again.history) == 3


def test_round_fails_below_min_sites_and_keeps_the_checkpoint(three_sites, tmp_path) -> None:
    links = [FaultySite(n, c, corrupt="shape") for n, c in three_sites.items()]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=1, min_sites=2)
    with pytest.raises(RoundFailed, match="0 of 3 sites"):
        Orchestrator(plan, links, tmp_path, progress=False).run()
    assert load_checkpoint(tmp_path / "checkpoint").round == 0
