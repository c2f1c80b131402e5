"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"): FedAvg whose sites correct their steps with control variates.

When sites' data differ (scanners, protocols), K local steps pull each site towards its own optimum
and the average of those ends away from the joint one ("client drift"). SCAFFOLD keeps a server
control variate c and one per site, c_i (estimates of the joint and of site i's gradient), and every
local step uses the site's gradient corrected by c - c_i. With x the global model, eta_l the plan's
learning rate, N the number of sites in the run and S those whose update was accepted this round:

    site i, K_i steps from x:  y <- y - eta_l (g_i(y) + c - c_i)    (`local_train`'s `control`)
    here, each i in S:         c_i+ = c_i - c + (x - y_i) / (K_i eta_l)     (the paper's option II)
                               x <- x + server_lr * sum_S (n_i / n) (y_i - x)   sample-weighted, as FedAvg
                               c <- c + (1 / N) sum_S (c_i+ - c_i)              unweighted, as the paper

so c stays the plain mean of all N sites' c_i, and a site that misses a round keeps its c_i. All
control variates start at zero: the first round is FedAvg's (with server_lr 1). K_i is the `steps`
the site reports; eta_l and the optimiser come from the plan through `configure`, so the learning
rate is given once. The correction is defined for plain SGD steps (Adam would rescale it), so a
plan with another optimiser is refused (`check_plan`). Control variates exist for trainable
parameters only; buffers (batch-norm running statistics) are averaged as FedAvg would and carry
none. They are kept in float64; a site receives c - c_i as float32. Nothing new leaves a hospital:
c_i is computed here from the weights the site returns anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from analyses.federation.strategy import SiteUpdate, Strategy, Weights, weighted_average

if TYPE_CHECKING:
    from analyses.federation.orchestrator import TrainingPlan

_SITE = "control/site/"  # state group prefix of each site's control variate


class Scaffold(Strategy):
    name = "scaffold"

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"scaffold needs server_lr > 0, got {server_lr}")
        self.server_lr = float(server_lr)
        self.local_lr: float | None = None
        self.trainable: frozenset[str] = frozenset()
        self.global_weights: Weights = {}
        self.control: Weights = {}
        self.site_controls: dict[str, Weights] = {}

    def options(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr}

    def check_plan(self, plan: TrainingPlan) -> None:
        if plan.optimizer != "sgd":
            raise ValueError(f"scaffold corrects plain SGD steps; this plan uses optimizer {plan.optimizer!r} "
                             "(run with --optimizer sgd)")

    def configure(self, lr: float, optimizer: str, trainable: frozenset[str]) -> None:
        self.local_lr = float(lr)
        self.trainable = frozenset(trainable)

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        names = [name for name in weights if name in self.trainable]
        if not names:
            raise ValueError("scaffold needs the model's trainable parameters (the orchestrator's configure) "
                             "and found none among the weights")
        self.global_weights = {k: v.copy() for k, v in weights.items()}
        self.control = {k: np.zeros(weights[k].shape, np.float64) for k in names}
        self.site_controls = {site: {k: np.zeros_like(v) for k, v in self.control.items()} for site in sites}

    def weights_for(self, site: str) -> Weights:
        return self.global_weights

    def train_params(self, site: str) -> dict[str, Any]:
        mine = self.site_controls[site]
        return {"control": {k: (c - mine[k]).astype(np.float32) for k, c in self.control.items()}}

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        if self.local_lr is None:
            raise ValueError("scaffold needs the plan's learning rate (the orchestrator's configure) to aggregate")
        silent = sorted(u.site for u in updates if u.steps < 1)
        if silent:
            raise ValueError(f"scaffold needs the local steps each site took; {', '.join(silent)} reported none")
        averaged = weighted_average(updates, list(self.global_weights))
        x = {k: v.astype(np.float64) for k, v in self.global_weights.items()}
        new_controls = {}
        for update in sorted(updates, key=lambda u: u.site):
            scale = 1.0 / (update.steps * self.local_lr)
            mine = self.site_controls[update.site]
            new_controls[update.site] = {
                k: mine[k] - c + (x[k] - np.asarray(update.weights[k], np.float64)) * scale
                for k, c in self.control.items()}
        n_sites = len(self.site_controls)
        self.control = {k: c + sum(new[k] - self.site_controls[s][k] for s, new in new_controls.items()) / n_sites
                        for k, c in self.control.items()}
        self.site_controls.update(new_controls)
        self.global_weights = {
            k: (x[k] + self.server_lr * (averaged[k].astype(np.float64) - x[k])).astype(v.dtype)
            for k, v in self.global_weights.items()}

    def state(self) -> dict[str, Weights]:
        return {"global": self.global_weights, "control": self.control,
                **{f"{_SITE}{site}": control for site, control in self.site_controls.items()}}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.global_weights = state["global"]
        self.control = {k: np.asarray(v, np.float64) for k, v in state["control"].items()}
        self.site_controls = {group.removeprefix(_SITE): {k: np.asarray(v, np.float64) for k, v in weights.items()}
                              for group, weights in state.items() if group.startswith(_SITE)}
