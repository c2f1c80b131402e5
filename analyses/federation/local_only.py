"""Local-only baseline: each site trains its own model from the same start and never shares.

Run through the same orchestrator (each site's model lives in the strategy state), so it costs
and is measured exactly like the federated runs; only aggregation is missing. Each site's model is
scored on its own site's test split and, as a second table, on the other sites' (`site_models`):
how far a model trained at one hospital carries to another is what federation is meant to fix.

Every site's model starts from the run's one initial model, whose output prior is pooled over the
sites (`orchestrator`), not from a prior of its own site's data: the baseline then differs from
the federated methods in training alone, and no site's model starts nearer its own test cases."""

from __future__ import annotations

from analyses.federation.strategy import SiteUpdate, Strategy, Weights


class LocalOnly(Strategy):
    name = "local"
    site_models = True

    def __init__(self) -> None:
        self.models: dict[str, Weights] = {}

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        self.models = {site: {k: v.copy() for k, v in weights.items()} for site in sites}

    def weights_for(self, site: str) -> Weights:
        return self.models[site]

    def required_updates(self, participants: int, min_sites: int) -> int:
        """Nothing is combined, so a round never waits for a quorum."""
        return 0

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        for update in updates:
            self.models[update.site] = update.weights

    def state(self) -> dict[str, Weights]:
        return {f"site/{s}": w for s, w in self.models.items()}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.models = {key.split("/", 1)[1]: w for key, w in state.items() if key.startswith("site/")}
