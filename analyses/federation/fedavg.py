"""FedAvg (McMahan et al. 2017): every site trains from the global model; the new global model
is the sample-weighted mean of their weights."""

from __future__ import annotations

from analyses.federation.strategy import SiteUpdate, Strategy, Weights, weighted_average


class FedAvg(Strategy):
    name = "fedavg"
    sums_only = True

    def __init__(self) -> None:
        self.global_weights: Weights = {}

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        self.global_weights = {k: v.copy() for k, v in weights.items()}

    def weights_for(self, site: str) -> Weights:
        return self.global_weights

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        self.global_weights = weighted_average(updates, list(self.global_weights))

    def state(self) -> dict[str, Weights]:
        return {"global": self.global_weights}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.global_weights = state["global"]
