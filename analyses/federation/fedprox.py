"""FedProx (Li et al. 2020): FedAvg whose sites add mu/2 * ||w - w_global||^2 to their loss,
which keeps a site's update near the global model when sites' data differ. The proximal term is
computed at the site (`local_train`'s `mu`); aggregation is FedAvg's."""

from __future__ import annotations

from typing import Any

from analyses.federation.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if mu <= 0:
            raise ValueError(f"FedProx needs mu > 0 (mu = 0 is FedAvg), got {mu}")
        self.mu = float(mu)

    def options(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def train_params(self, site: str) -> dict[str, Any]:
        return {"mu": self.mu}
