"""SCAFFOLD: the server's control-variate arithmetic against the paper written out in numpy, drift
correction on a quadratic toy, the site's corrected SGD step and its refusals, checkpoints, the
plan's optimiser, and a run through the orchestrator and `federate train`."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import torch

from analyses.federation import FedAvg, Scaffold, SiteUpdate, experiment, make_strategy
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.orchestrator import Orchestrator, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite
from datasite_setup.model_weights import exchanged_weights, trainable_shapes
from datasite_setup.site_tasks import TASKS, local_train
from datasite_setup.site_tasks.task import SiteFacts
from domains import get_domain
from tests.test_federation_strategies import phantom_cases
from tests.test_train_command import simulated_federation  # noqa: F401  (a fixture)

DOMAIN = "brain_mr_tumour_burden"
SEND_REQUESTS = experiment.submit  # the real one, which the `simulated_federation` fixture replaces


def configured(server_lr: float = 1.0, lr: float = 0.1, trainable: tuple[str, ...] = ("w", "b")) -> Scaffold:
    strategy = Scaffold(server_lr=server_lr)
    strategy.configure(lr, "sgd", frozenset(trainable))
    return strategy


def answer(site: str, n: float, steps: float, **arrays: np.ndarray) -> SiteUpdate:
    return SiteUpdate(site=site, weights={k: np.asarray(v, np.float32) for k, v in arrays.items()}, n_samples=n,
                      train_loss=0.0, steps=steps)


def reference(x: dict[str, np.ndarray], rounds: list[list[tuple[str, float, float, dict[str, np.ndarray]]]],
              sites: list[str], lr: float, server_lr: float, trainable: list[str]) -> tuple[Any, Any, Any]:
    """Algorithm 1 of Karimireddy et al. (option II), written out once more: (x, c, {site: c_i})."""
    x = {k: v.astype(np.float64) for k, v in x.items()}
    c = {k: np.zeros_like(x[k]) for k in trainable}
    ci = {s: {k: np.zeros_like(x[k]) for k in trainable} for s in sites}
    for answers in rounds:
        total = sum(n for _, n, _, _ in answers)
        dx = {k: sum(n / total * (y[k].astype(np.float32).astype(np.float64) - x[k]) for _, n, _, y in answers) for k in x}
        dc = {k: np.zeros_like(c[k]) for k in trainable}
        for site, _, steps, y in answers:
            new = {k: ci[site][k] - c[k] + (x[k] - y[k].astype(np.float32)) / (steps * lr) for k in trainable}
            for k in trainable:
                dc[k] += new[k] - ci[site][k]
            ci[site] = new
        c = {k: c[k] + dc[k] / len(sites) for k in trainable}
        x = {k: x[k] + server_lr * dx[k] for k in x}
    return x, c, ci


def test_two_rounds_follow_the_paper_exactly() -> None:
    """Two sites, the second round answered by one of them (|S| = 1 of N = 2), and a buffer that
    is averaged but carries no control variate."""
    rng = np.random.default_rng(3)
    x0 = {"w": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=2).astype(np.float32),
          "norm.running_mean": np.zeros(2, np.float32)}
    strategy = configured(server_lr=0.7, lr=0.05)
    strategy.initialize(x0, ["a", "b"])
    assert set(strategy.train_params("a")["control"]) == {"w", "b"}
    assert all(not v.any() for v in strategy.train_params("a")["control"].values())  # zero at the start

    first = [("a", 1.0, 4.0, {k: v + rng.normal(size=v.shape) for k, v in x0.items()}),
             ("b", 3.0, 2.0, {k: v + rng.normal(size=v.shape) for k, v in x0.items()})]
    strategy.aggregate([answer(s, n, k, **y) for s, n, k, y in first])
    x1 = strategy.weights_for("a")
    second = [("b", 2.0, 5.0, {k: v + rng.normal(size=v.shape) for k, v in x1.items()})]
    strategy.aggregate([answer(s, n, k, **y) for s, n, k, y in second])

    x, c, ci = reference(x0, [first, second], ["a", "b"], 0.05, 0.7, ["w", "b"])
    for k in x0:
        np.testing.assert_allclose(strategy.weights_for("b")[k], x[k], rtol=1e-5, atol=1e-6)
    for k in ("w", "b"):
        np.testing.assert_allclose(strategy.control[k], c[k], rtol=1e-5, atol=1e-5)
        for site in ("a", "b"):
            np.testing.assert_allclose(strategy.site_controls[site][k], ci[site][k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(strategy.train_params(site)["control"][k], c[k] - ci[site][k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c[k], (ci["a"][k] + ci["b"][k]) / 2, atol=1e-9)  # c is the mean of the c_i
    assert strategy.train_params("a")["control"]["w"].dtype == np.float32


def test_buffers_are_exchanged_but_are_not_trainable() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert {"1.running_mean", "1.running_var"} <= set(exchanged_weights(model))
    assert trainable_shapes(model) == {"0.weight": (2, 2), "0.bias": (2,), "1.weight": (2,), "1.bias": (2,)}


def test_the_first_round_is_fedavg_and_sites_must_report_their_steps() -> None:
    x0 = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    scaffold, fedavg = configured(), FedAvg()
    answers = [answer("a", 1, 3, w=[1, 2], b=[3]), answer("b", 3, 1, w=[5, 6], b=[7])]
    for strategy in (scaffold, fedavg):
        strategy.initialize(x0, ["a", "b"])
        strategy.aggregate(answers)
    for k in x0:
        np.testing.assert_array_equal(scaffold.weights_for("a")[k], fedavg.weights_for("a")[k])
    with pytest.raises(ValueError, match="local steps each site took; a reported none"):
        scaffold.aggregate([answer("a", 1, 0, w=[1, 2], b=[3])])
    with pytest.raises(ValueError, match="server_lr > 0"):
        Scaffold(server_lr=0)


def quadratic_run(strategy: Any, a: np.ndarray, b: np.ndarray, lr: float, steps: int, rounds: int) -> np.ndarray:
    """Sites i minimise 0.5 (w - b_i)^T diag(a_i) (w - b_i) with `steps` full-gradient steps a round,
    their gradient corrected by the strategy's `control` when it sends one."""
    sites = [f"s{i}" for i in range(len(a))]
    strategy.initialize({"w": np.zeros(a.shape[1], np.float32)}, sites)
    for _ in range(rounds):
        answers = []
        for i, site in enumerate(sites):
            instruction = strategy.training_instruction(site)
            control = instruction.params.get("control", {}).get("w", 0.0)
            y = instruction.weights["w"].astype(np.float64)
            for _ in range(steps):
                y = y - lr * (a[i] * (y - b[i]) + control)
            answers.append(answer(site, 1.0, steps, w=y))
        strategy.aggregate(answers)
    return strategy.weights_for("s0")["w"].astype(np.float64)


def test_scaffold_corrects_client_drift_on_heterogeneous_quadratics() -> None:
    a = np.array([[1.0, 4.0], [4.0, 0.5], [0.5, 2.0]])
    b = np.array([[3.0, -1.0], [-2.0, 2.0], [1.0, 4.0]])
    optimum = (a * b).sum(axis=0) / a.sum(axis=0)  # the minimiser of the sites' mean objective
    lr, steps, rounds = 0.1, 10, 60
    fedavg = np.linalg.norm(quadratic_run(FedAvg(), a, b, lr, steps, rounds) - optimum)
    scaffold = np.linalg.norm(quadratic_run(configured(lr=lr, trainable=("w",)), a, b, lr, steps, rounds) - optimum)
    assert fedavg > 1.0  # FedAvg settles where the sites' drift balances, away from the optimum
    assert scaffold < 1e-5


@pytest.fixture(scope="module")
def one_site() -> dict[str, Any]:
    """A site's training cases and the request every `local_train` test below varies."""
    torch.manual_seed(0)
    model = get_domain(DOMAIN).build_model()
    params = {"domain": DOMAIN, "weights": exchanged_weights(model), "epochs": 1, "batch_size": 4096, "lr": 0.05,
              "optimizer": "sgd", "seed": 0, "max_steps": 1}
    return {"cases": phantom_cases("hospital-a", 2, 0), "params": params, "shapes": trainable_shapes(model)}


def test_control_corrects_every_sgd_step_at_the_site(one_site) -> None:
    cases, params, shapes = one_site["cases"], one_site["params"], one_site["shapes"]
    facts = SiteFacts(min_cohort=1)
    plain = local_train.run(cases, params, facts)
    zero = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    unchanged = local_train.run(cases, {**params, "control": zero}, facts)
    rng = np.random.default_rng(1)
    control = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    corrected = local_train.run(cases, {**params, "control": control}, facts)
    assert corrected["scalars"]["steps"] == 1.0
    for k in plain["weights"]:
        np.testing.assert_array_equal(unchanged["weights"][k], plain["weights"][k])
        # one step: y = x - lr (g + control) = plain SGD's y - lr * control
        np.testing.assert_allclose(corrected["weights"][k], plain["weights"][k] - 0.05 * control[k], rtol=1e-5, atol=1e-6)
    assert TASKS["local_train"].problems({**params, "control": control}, SiteFacts(min_cohort=1, min_batch=1)) == []


def test_a_control_that_does_not_fit_is_refused_naming_its_key(one_site) -> None:
    cases, params, shapes = one_site["cases"], one_site["params"], one_site["shapes"]
    name = next(iter(shapes))
    good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    nan = np.full(shapes[name], np.nan, np.float32)
    bad = {
        "['head.gain'] is not a trainable parameter": {**good, "head.gain": np.zeros(1, np.float32)},
        f"['{name}'] has shape": {**good, name: np.full((*shapes[name], 2), 12345.5, np.float32)},
        f"['{name}'] holds NaN or Inf": {**good, name: nan},
        f"['{name}'] must be a float array": {**good, name: np.zeros(shapes[name], np.int64)},
    }
    task, facts = TASKS["local_train"], SiteFacts(min_cohort=1, min_batch=1)
    for why, control in bad.items():
        problems = task.problems({**params, "control": control}, facts)
        assert len(problems) == 1 and why in problems[0] and "12345" not in problems[0]
        with pytest.raises(ValueError, match=re.escape(why)):
            local_train.run(cases, {**params, "control": control}, SiteFacts(min_cohort=1))
    adam = task.problems({**params, "optimizer": "adam", "control": good}, facts)
    assert adam == ["control (SCAFFOLD) corrects plain SGD steps; it is refused with optimizer adam"]
    with pytest.raises(ValueError, match="refused with optimizer adam"):
        local_train.run(cases, {**params, "optimizer": "adam", "control": good}, SiteFacts(min_cohort=1))
    assert "must be dict" in task.problems({**params, "control": [1.0]}, facts)[0]


def test_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    strategy = configured(server_lr=0.5)
    strategy.initialize({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, ["a", "b", "c"])
    strategy.aggregate([answer("a", 1, 2, w=[1, 2], b=[3]), answer("c", 2, 3, w=[-1, 0], b=[1])])
    assert set(strategy.state()) == {"global", "control", "control/site/a", "control/site/b", "control/site/c"}
    save_checkpoint(tmp_path, Checkpoint(1, {"strategy": "scaffold"}, [{"round": 1}], strategy.state()))
    restored = configured(server_lr=0.5)
    restored.load_state(load_checkpoint(tmp_path).state)
    for s in (strategy, restored):
        s.aggregate([answer("b", 1, 4, w=[0.5, 0.5], b=[0.25])])
    for group, weights in strategy.state().items():
        for k, v in weights.items():
            np.testing.assert_array_equal(restored.state()[group][k], v)
        assert {k: v.dtype for k, v in restored.state()[group].items()} == {k: v.dtype for k, v in weights.items()}


def test_a_plan_that_does_not_use_sgd_is_refused_naming_the_option(tmp_path) -> None:
    with pytest.raises(ValueError, match="optimizer 'adam' \\(run with --optimizer sgd\\)"):
        Orchestrator(TrainingPlan(domain=DOMAIN, strategy="scaffold", rounds=1, optimizer="adam"), [], tmp_path)
    with pytest.raises(ValueError, match="--optimizer sgd"):
        make_strategy("scaffold").check_plan(TrainingPlan(domain=DOMAIN, strategy="scaffold", rounds=1, optimizer="adam"))
    orchestrator = Orchestrator(TrainingPlan(domain=DOMAIN, strategy="scaffold", rounds=1, optimizer="sgd", lr=0.02),
                                [], tmp_path)
    model = get_domain(DOMAIN).build_model()
    assert orchestrator.strategy.local_lr == 0.02 and orchestrator.strategy.trainable == set(trainable_shapes(model))


def test_scaffold_runs_through_the_orchestrator_and_resumes(tmp_path) -> None:
    links = [SimulatedSite.from_cases(name, phantom_cases(name, 3, seed)) for seed, name in enumerate(("hospital-a", "hospital-b"))]
    plan = TrainingPlan(domain=DOMAIN, strategy="scaffold", rounds=2, batch_size=8, lr=1e-3, optimizer="sgd")
    report = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert [r["aggregated"] for r in report.history[1:]] == [["hospital-a", "hospital-b"]] * 2
    assert any(np.abs(v).max() > 0 for v in report.final_state["control/site/hospital-a"].values())
    again = Orchestrator(plan, links, tmp_path, progress=False).run()
    assert again.resumed_from == 2


def test_federate_train_runs_scaffold(simulated_federation, tmp_path, capsys) -> None:  # noqa: F811
    from analyses import cli

    out = tmp_path / "run"
    code = cli.main(["train", "federation.toml", "--domain", DOMAIN, "--strategy", "scaffold", "--optimizer", "sgd",
                     "--strategy-option", "server_lr=1", "--rounds", "1", "--batch-size", "8", "--lr", "0.001",
                     "--out", str(out), "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert set(summary["final"]["scaffold"]) == {"hospital-a", "hospital-b", "pooled"}


def test_federate_train_refuses_scaffold_with_adam_before_sending_requests(
        simulated_federation, monkeypatch, tmp_path, capsys) -> None:  # noqa: F811
    from analyses import cli

    monkeypatch.setattr(experiment, "submit", SEND_REQUESTS)  # refuses before it reaches any site
    code = cli.main(["train", "federation.toml", "--domain", DOMAIN, "--strategy", "scaffold", "--rounds", "1",
                     "--out", str(tmp_path / "run"), "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code != 0 and "optimizer 'adam' (run with --optimizer sgd)" in summary["error"]
    assert not (tmp_path / "run").exists()
