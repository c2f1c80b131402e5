"""FedMA's matched averaging: permuted sites are matched back, unmatched channels grow the model
up to the domain's cap, and the grown model still computes what the sites' models computed."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import nn

from analyses.federation.fedma import FedMA
from analyses.federation.strategy import SiteUpdate
from datasite_setup.model_weights import exchanged_weights, load_weights
from domains.channel_widths import ChannelGroup, width_problem


class TwoLayerNet(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, a, 3, padding=1)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1)
        self.head = nn.Conv2d(b, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class TinyWidthsDomain:
    """Two matchable groups: conv1's outputs ("a") feed conv2, whose outputs ("b") feed the head."""

    base_widths = {"a": 4, "b": 4}
    max_widths = {"a": 6, "b": 4}
    channel_groups = (ChannelGroup("a", (("conv1.weight", 0), ("conv1.bias", 0))),
                      ChannelGroup("b", (("conv2.weight", 0), ("conv2.bias", 0))))

    def build_model(self, widths: Mapping[str, int] | None = None) -> nn.Module:
        widths = widths or self.base_widths
        return TwoLayerNet(widths["a"], widths["b"])

    def channel_layout(self, widths: Mapping[str, int]) -> dict:
        a, b = (("a", widths["a"]),), (("b", widths["b"]),)
        return {"conv1.weight": {0: a}, "conv1.bias": {0: a}, "conv2.weight": {0: b, 1: a}, "conv2.bias": {0: b},
                "head.weight": {1: b}}


def _strategy(threshold: float = 0.3) -> FedMA:
    strategy = FedMA(match_threshold=threshold)
    strategy._domain = TinyWidthsDomain()
    return strategy


def _permuted(weights: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
    """The same function with group "a"'s channels reordered."""
    out = {k: v.copy() for k, v in weights.items()}
    out["conv1.weight"], out["conv1.bias"] = weights["conv1.weight"][order], weights["conv1.bias"][order]
    out["conv2.weight"] = weights["conv2.weight"][:, order]
    return out


def _output(domain: TinyWidthsDomain, widths: Mapping[str, int], weights: dict[str, np.ndarray], x: torch.Tensor) -> np.ndarray:
    model = domain.build_model(widths)
    load_weights(model, weights)
    with torch.no_grad():
        return model(x).numpy()


def test_permuted_sites_are_matched_back_where_fedavg_mixes_unrelated_filters() -> None:
    torch.manual_seed(0)
    domain = TinyWidthsDomain()
    start = exchanged_weights(domain.build_model())
    strategy = _strategy()
    strategy.initialize(start, ["a", "b"])
    order = np.array([2, 0, 3, 1])
    updates = [SiteUpdate("site-a", start, 10, 0.0), SiteUpdate("site-b", _permuted(start, order), 10, 0.0)]
    strategy.aggregate(updates)
    assert strategy.widths == {"a": 4, "b": 4}
    for name, value in start.items():
        np.testing.assert_allclose(strategy.global_weights[name], value, atol=1e-6)
    naive = {name: (start[name] + _permuted(start, order)[name]) / 2 for name in start}
    x = torch.randn(2, 1, 8, 8)
    reference = _output(domain, domain.base_widths, start, x)
    assert np.abs(_output(domain, domain.base_widths, naive, x) - reference).max() > 1e-3
    np.testing.assert_allclose(_output(domain, strategy.widths, strategy.global_weights, x), reference, atol=1e-5)


def test_an_unmatched_channel_grows_the_group_up_to_its_cap_and_the_grown_model_loads() -> None:
    torch.manual_seed(1)
    domain = TinyWidthsDomain()
    start = exchanged_weights(domain.build_model())
    other = {k: v.copy() for k, v in start.items()}
    other["conv1.weight"][1] = -start["conv1.weight"][1]  # opposite filter: cosine distance ~2, matches nothing
    other["conv1.bias"][1] = -start["conv1.bias"][1]
    strategy = _strategy(threshold=0.5)
    strategy.initialize(start, ["a", "b"])
    strategy.aggregate([SiteUpdate("site-a", start, 10, 0.0), SiteUpdate("site-b", other, 30, 0.0)])
    assert strategy.widths == {"a": 5, "b": 4}
    grown = strategy.global_weights
    assert grown["conv1.weight"].shape == (5, 1, 3, 3) and grown["conv2.weight"].shape == (4, 5, 3, 3)
    np.testing.assert_allclose(grown["conv1.weight"][4], other["conv1.weight"][1])  # the new channel: site-b's alone
    np.testing.assert_allclose(grown["conv1.weight"][1], start["conv1.weight"][1])  # site-a's alone matched it
    np.testing.assert_allclose(grown["conv1.weight"][0], start["conv1.weight"][0], atol=1e-6)
    load_weights(domain.build_model(strategy.widths), grown)
    assert width_problem(domain, strategy.widths) is None

    capped = _strategy(threshold=0.5)
    capped._domain.max_widths = {"a": 4, "b": 4}
    capped.initialize(start, ["a", "b"])
    capped.aggregate([SiteUpdate("site-a", start, 10, 0.0), SiteUpdate("site-b", other, 30, 0.0)])
    assert capped.widths == {"a": 4, "b": 4}  # at the cap a poor match is forced rather than grown


def test_widths_travel_in_the_state_and_out_of_range_widths_are_refused() -> None:
    domain = TinyWidthsDomain()
    strategy = _strategy()
    strategy.initialize(exchanged_weights(domain.build_model()), ["a"])
    strategy.widths = {"a": 5, "b": 4}
    restored = _strategy()
    restored.load_state(strategy.state())
    assert restored.widths == {"a": 5, "b": 4}
    assert restored.model_params("site-a") == {"widths": {"a": 5, "b": 4}}
    assert "outside 4-6" in width_problem(domain, {"a": 7, "b": 4})
    assert "exactly the groups" in width_problem(domain, {"a": 4})
    assert "integer" in width_problem(domain, {"a": 4.0, "b": 4})
    with pytest.raises(ValueError, match="does not declare its model's channel groups"):
        FedMA().check_plan(type("Plan", (), {"domain": "brain_mr_tumour_burden"})())


# ---- on the translation domain, through the installed site tasks --------------------------------------------


@pytest.fixture(scope="module")
def translation_fleet() -> dict[str, list[dict]]:
    from analyses.federation.simulated_site import with_splits
    from domains.mr_translation import PROFILES, phantom_records

    return {site: with_splits(phantom_records(PROFILES[site], 4, seed, matrix=32, n_slices=4))
            for seed, site in enumerate(("hospital-a", "hospital-b"))}


def test_fedma_runs_the_translation_domain_and_every_call_builds_the_round_s_widths(translation_fleet, tmp_path) -> None:
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite

    plan = TrainingPlan(domain="mr_translation", strategy="fedma", strategy_options={"match_threshold": 0.001}, rounds=2,
                        epochs=1, batch_size=4, lr=3e-3, min_sites=2)
    links = [SimulatedSite(site, cases) for site, cases in translation_fleet.items()]
    report = Orchestrator(plan, links, tmp_path / "run", progress=False).run()
    widths = [record["strategy"]["widths"] for record in report.history]
    assert widths[0] == {"enc1": 8, "enc2": 16, "bottleneck": 32, "dec2": 16, "dec1": 8}
    assert any(w != widths[0] for w in widths[1:])  # a tight threshold makes unmatched channels: the model grew
    assert all(widths[0][g] <= w[g] <= round(1.5 * widths[0][g]) for w in widths for g in w)
    assert report.final_state["global"]["enc1.conv.weight"].shape[0] == widths[-1]["enc1"]
    assert np.isfinite(report.test["final"]["pooled"]["psnr"]) and report.test["final"]["pooled"]["ssim"] > 0
    resumed = Orchestrator(plan, links, tmp_path / "run", progress=False).run()  # from the checkpoint: same widths
    assert resumed.history[-1]["strategy"]["widths"] == widths[-1] and resumed.resumed_from == 2


def test_the_site_releases_weights_of_the_requested_widths_only_within_the_domain_s_range(translation_fleet) -> None:
    from datasite_setup.site_tasks import TASKS, SiteFacts, run_installed_task
    from domains import get_domain

    domain = get_domain("mr_translation")
    grown = {**domain.base_widths, "enc1": 10, "bottleneck": 40}
    torch.manual_seed(0)
    params = {"domain": "mr_translation", "weights": exchanged_weights(domain.build_model(grown)), "epochs": 1,
              "batch_size": 4, "lr": 1e-3, "optimizer": "adam", "seed": 0, "max_steps": 1, "widths": grown, "split": "all"}
    result = run_installed_task("local_train", translation_fleet["hospital-a"], params, min_cohort=1)
    assert result["weights"]["enc1.conv.weight"].shape == (10, 1, 3, 3)
    assert result["weights"]["enc2.conv.weight"].shape == (16, 10, 3, 3)
    assert result["weights"]["dec2.conv.weight"].shape == (40, 16, 3, 3)
    site = SiteFacts(min_cohort=1, min_batch=1, sample_dp=None)
    for bad, why in (({**grown, "enc1": 13}, "outside 8-12"), ({"enc1": 8}, "exactly the groups")):
        assert any(why in problem for problem in TASKS["local_train"].problems({**params, "widths": bad}, site))
        assert any(why in problem for problem in TASKS["evaluate"].problems(
            {"domain": "mr_translation", "weights": params["weights"], "widths": bad}, site))
    assert TASKS["evaluate"].problems({"domain": "brain_mr_tumour_burden", "weights": {}, "widths": grown}, site) == [
        "domain brain_mr_tumour_burden has a fixed model; it takes no widths"]
    assert TASKS["local_train"].problems(params, site) == []
