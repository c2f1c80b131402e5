"""Adaptive server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAdagrad,
FedAdam and FedYogi.

FedAvg replaces the global model by the sites' average, so a round in which sites pull in different
directions (different scanners) swings the model. These strategies instead treat the averaged
change as a pseudo-gradient and take an adaptive step with it on the server:

    delta_t = sum_i (n_i / n) (w_i - w_t)                       sample-weighted, as FedAvg
    m_t     = beta_1 m_{t-1} + (1 - beta_1) delta_t
    v_t     = v_{t-1} + delta_t^2                                FedAdagrad
            = beta_2 v_{t-1} + (1 - beta_2) delta_t^2            FedAdam
            = v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2)   FedYogi
    w_{t+1} = w_t + eta_t m_t / (sqrt(v_t) + tau)

with a server learning rate eta_t = server_lr * server_lr_decay^(t-1) (an exponential schedule; 1.0
keeps it constant). v starts at tau^2, as in the paper's experiments. Sites train exactly as for
FedAvg; only the server's update differs, so nothing changes at a hospital. All arithmetic is float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analyses.federation.strategy import SiteUpdate, Strategy, Weights, weighted_average

_STEP = "server/step"


class FedOpt(Strategy):
    """The shared server update; subclasses say how the second moment `v` is accumulated."""

    sums_only = True

    def __init__(self, server_lr: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 server_lr_decay: float = 1.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"{self.name} needs server_lr > 0, got {server_lr}")
        if not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1:
            raise ValueError(f"{self.name} needs 0 <= beta_1, beta_2 < 1, got {beta_1}, {beta_2}")
        if tau <= 0:
            raise ValueError(f"{self.name} needs tau > 0 (it keeps the step finite), got {tau}")
        if not 0 < server_lr_decay <= 1:
            raise ValueError(f"{self.name} needs 0 < server_lr_decay <= 1, got {server_lr_decay}")
        self.server_lr, self.beta_1, self.beta_2, self.tau = float(server_lr), float(beta_1), float(beta_2), float(tau)
        self.server_lr_decay = float(server_lr_decay)
        self.global_weights: Weights = {}
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def options(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau,
                "server_lr_decay": self.server_lr_decay}

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        self.global_weights = {k: v.copy() for k, v in weights.items()}
        self.m = {k: np.zeros(v.shape, np.float64) for k, v in weights.items()}
        self.v = {k: np.full(v.shape, self.tau**2, np.float64) for k, v in weights.items()}
        self.steps = 0

    def weights_for(self, site: str) -> Weights:
        return self.global_weights

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def server_lr_at(self, step: int) -> float:
        """The server learning rate of aggregation `step` (1 for the first round)."""
        return self.server_lr * self.server_lr_decay ** (step - 1)

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        averaged = weighted_average(updates, list(self.global_weights))
        self.steps += 1
        eta = self.server_lr_at(self.steps)
        for name, current in self.global_weights.items():
            delta = averaged[name].astype(np.float64) - current.astype(np.float64)
            self.m[name] = self.beta_1 * self.m[name] + (1 - self.beta_1) * delta
            self.v[name] = self.second_moment(self.v[name], delta)
            step = eta * self.m[name] / (np.sqrt(self.v[name]) + self.tau)
            self.global_weights[name] = (current.astype(np.float64) + step).astype(current.dtype)

    def state(self) -> dict[str, Weights]:
        return {"global": self.global_weights, "server/m": dict(self.m), "server/v": dict(self.v),
                _STEP: {"steps": np.array([self.steps], np.int64)}}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.global_weights = state["global"]
        self.m = {k: np.asarray(v, np.float64) for k, v in state["server/m"].items()}
        self.v = {k: np.asarray(v, np.float64) for k, v in state["server/v"].items()}
        self.steps = int(state[_STEP]["steps"][0])


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta**2


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1 - self.beta_2) * squared * np.sign(v - squared)
