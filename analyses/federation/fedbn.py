"""FedBN (Li et al. 2021): normalisation layers stay local; everything else is averaged.

Sites differ most in intensity statistics (scanner, protocol), which is exactly what batch-norm
layers capture. Each site keeps its own normalisation weights and running statistics; only the
other parameters are averaged. Our sites keep no state between calls, so the orchestrator holds
each site's normalisation entries and sends them back to that site only; they are never mixed.
A state name is a normalisation entry when it belongs to a BatchNorm/GroupNorm/LayerNorm module
(`bn`/`norm` in its module path) - see `is_normalisation`.
"""

from __future__ import annotations

from analyses.federation.strategy import SiteUpdate, Strategy, Weights, weighted_average

_NORM_MARKERS = ("bn", "norm")


def is_normalisation(name: str) -> bool:
    module = name.rsplit(".", 1)[0].lower()
    return any(part.startswith(_NORM_MARKERS) for part in module.split("."))


class FedBN(Strategy):
    name = "fedbn"

    def __init__(self) -> None:
        self.global_weights: Weights = {}
        self.local: dict[str, Weights] = {}

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        shared = {k: v.copy() for k, v in weights.items() if not is_normalisation(k)}
        if len(shared) == len(weights):
            raise ValueError("FedBN needs a model with normalisation layers; this one has none (use fedavg)")
        self.global_weights = shared
        self.local = {site: {k: v.copy() for k, v in weights.items() if is_normalisation(k)} for site in sites}

    def weights_for(self, site: str) -> Weights:
        return {**self.global_weights, **self.local[site]}

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        self.global_weights = weighted_average(updates, list(self.global_weights))
        for update in updates:
            self.local[update.site] = {k: v for k, v in update.weights.items() if is_normalisation(k)}

    def state(self) -> dict[str, Weights]:
        return {"global": self.global_weights, **{f"site/{s}": w for s, w in self.local.items()}}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.global_weights = state["global"]
        self.local = {key.split("/", 1)[1]: w for key, w in state.items() if key.startswith("site/")}
