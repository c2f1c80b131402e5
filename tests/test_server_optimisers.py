"""FedAdagrad / FedAdam / FedYogi: the server update of Reddi et al. (2021) step by step, checkpoints,
options through the command-line vocabulary, and a run through the orchestrator."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.federation import (
    FedAdagrad, FedAdam, FedYogi, SiteUpdate, make_strategy, options_for, parse_strategy_options,
)
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.orchestrator import Orchestrator, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite
from tests.test_federation_strategies import phantom_cases


def update(site: str, n: float, w: list[float]) -> SiteUpdate:
    return SiteUpdate(site=site, weights={"w": np.array(w, np.float32)}, n_samples=n, train_loss=0.0)


def reference(kind: str, deltas: list[np.ndarray], eta: float, b1: float, b2: float, tau: float, decay: float) -> np.ndarray:
    """The paper's Algorithm 2 written out once more, independently, for two rounds."""
    w, m, v = np.zeros(2), np.zeros(2), np.full(2, tau**2)
    for t, delta in enumerate(deltas, start=1):
        m = b1 * m + (1 - b1) * delta
        if kind == "fedadagrad":
            v = v + delta**2
        elif kind == "fedadam":
            v = b2 * v + (1 - b2) * delta**2
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        w = w + eta * decay ** (t - 1) * m / (np.sqrt(v) + tau)
    return w


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_two_rounds_follow_the_paper_exactly(cls) -> None:
    options = {"server_lr": 0.5, "beta_1": 0.8, "beta_2": 0.9, "tau": 0.01, "server_lr_decay": 0.5}
    strategy = cls(**options)
    strategy.initialize({"w": np.zeros(2, np.float32)}, ["a", "b"])
    strategy.aggregate([update("a", 1, [1.0, -2.0]), update("b", 3, [3.0, 2.0])])
    first = strategy.weights_for("a")["w"].astype(np.float64)
    strategy.aggregate([update("a", 2, [first[0] + 1, first[1]]), update("b", 2, [first[0] - 3, first[1] + 4])])
    deltas = [np.array([2.5, 1.0]), np.array([-1.0, 2.0])]
    expected = reference(cls.name, deltas, 0.5, 0.8, 0.9, 0.01, 0.5)
    np.testing.assert_allclose(strategy.weights_for("b")["w"], expected, rtol=1e-5)
    assert strategy.server_lr_at(2) == 0.25


def test_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    strategy = FedYogi(server_lr=0.3)
    strategy.initialize({"w": np.zeros(2, np.float32)}, ["a"])
    strategy.aggregate([update("a", 1, [1.0, 2.0])])
    save_checkpoint(tmp_path, Checkpoint(1, {"strategy": "fedyogi"}, [{"round": 1}], strategy.state()))
    restored = FedYogi(server_lr=0.3)
    restored.load_state(load_checkpoint(tmp_path).state)
    for s in (strategy, restored):
        s.aggregate([update("a", 1, [0.5, 0.5])])
    np.testing.assert_array_equal(strategy.weights_for("a")["w"], restored.weights_for("a")["w"])
    assert restored.steps == 2


def test_options_are_the_strategies_own_and_checked() -> None:
    assert parse_strategy_options(["mu=0.1", "server_lr=1", "name=x"]) == {"mu": 0.1, "server_lr": 1, "name": "x"}
    assert options_for(["fedprox", "fedadam"], {"mu": 0.1, "server_lr": 0.2}) == {
        "fedprox": {"mu": 0.1}, "fedadam": {"server_lr": 0.2}}
    with pytest.raises(ValueError, match="no chosen strategy has option beta_1"):
        options_for(["fedavg", "fedprox"], {"beta_1": 0.9})
    with pytest.raises(ValueError, match="strategy 'fedavg' has no option mu"):
        make_strategy("fedavg", mu=0.1)
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        parse_strategy_options(["mu"])
    with pytest.raises(ValueError, match="server_lr > 0"):
        FedAdam(server_lr=0)
    assert make_strategy("fedadam", server_lr=0.05).options()["server_lr"] == 0.05


def test_fedadam_runs_through_the_orchestrator_and_resumes(tmp_path) -> None:
    links = [SimulatedSite.from_cases(name, phantom_cases(name, 3, seed)) for seed, name in enumerate(("hospital-a", "hospital-b"))]
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedadam", rounds=2, batch_size=8, lr=1e-3,
                        strategy_options={"server_lr": 0.01})
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert [r["aggregated"] for r in report.history[1:]] == [["hospital-a", "hospital-b"]] * 2
    assert int(report.final_state["server/step"]["steps"][0]) == 2
    again = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert again.resumed_from == 2
