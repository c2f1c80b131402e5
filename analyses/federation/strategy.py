"""What a federated strategy is: one protocol the orchestrator drives, nothing else.

Each round the orchestrator asks the strategy which weights to send to each site
(`weights_for`) and which extra training parameters that site gets (`train_params`), collects the
sites' updates, and hands the accepted ones to `aggregate`. Everything a strategy must remember
between rounds lives in `state()` so a checkpoint can restore it exactly. A new strategy
(SCAFFOLD, FedAdam, ...) is a new small class; the orchestrator does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """What one site returned from `local_train`: its new weights and how many samples it saw."""

    site: str
    weights: Weights
    n_samples: float
    train_loss: float


@runtime_checkable
class Strategy(Protocol):
    name: str

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        """Start from the initial model for these sites."""

    def weights_for(self, site: str) -> Weights:
        """The weights `site` trains from (and is evaluated with) this round."""

    def train_params(self, site: str) -> dict[str, Any]:
        """Extra `local_train` parameters for `site` (e.g. FedProx's mu)."""

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        """Fold the round's accepted updates into the strategy's state."""

    def state(self) -> dict[str, Weights]:
        """Everything needed to resume: named weight sets ("global", "site/<name>", ...)."""

    def load_state(self, state: dict[str, Weights]) -> None:
        """Restore what `state()` returned."""


def weighted_average(updates: list[SiteUpdate], names: list[str]) -> Weights:
    """Sample-weighted mean of the named arrays over updates (FedAvg's rule), in float64 then
    cast back, so the order sites answered in does not change the result."""
    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(u.n_samples for u in updates))
    if total <= 0:
        raise ValueError("updates report no training samples; cannot weight them")
    averaged: Weights = {}
    for name in names:
        acc = np.zeros(np.shape(updates[0].weights[name]), dtype=np.float64)
        for update in sorted(updates, key=lambda u: u.site):
            acc += (update.n_samples / total) * np.asarray(update.weights[name], dtype=np.float64)
        averaged[name] = acc.astype(np.float32)
    return averaged
