"""What a federated strategy is: one small class the orchestrator drives, nothing else.

The strategy first says whether it can serve the plan (`check_plan`), then the orchestrator tells
it the plan's local optimiser (`configure`). Each round it asks the strategy for each site's
`training_instruction` (the weights to train from and any extra parameters), checks every answer
against the strategy's `expected_update`, and hands the accepted ones to `aggregate`. Evaluation
uses `weights_for`. Everything a strategy must remember between rounds lives in `state()` so a
checkpoint can restore it exactly. A new strategy (SCAFFOLD, FedAdam, ...) is a new small class
with its own options; the orchestrator, the command line and the report do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from analyses.federation.orchestrator import TrainingPlan

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """What one site returned from `local_train`: its new weights, how many samples it saw, its
    training loss (None from a site that noises its updates and withholds it), and the optimiser
    steps and training seconds it reports (0 when it reports none)."""

    site: str
    weights: Weights
    n_samples: float
    train_loss: float | None
    steps: float = 0.0
    compute_seconds: float = 0.0
    privacy: dict[str, float] = field(default_factory=dict)  # what a site that noises updates says it did (dp_*)


@dataclass(frozen=True)
class TrainInstruction:
    """The strategy's message to one site for one round: the weights it trains from and the extra
    `local_train` parameters it needs (e.g. FedProx's mu). The orchestrator adds the plan's
    schedule (epochs, batch size, learning rate, seed) and sends both."""

    weights: Weights
    params: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base of every strategy: the orchestrator calls only these methods.

    A strategy owns its options (constructor keywords, reported by `options()` so they are part of
    a run's identity), the plans it refuses (`check_plan`), its messages (`training_instruction`),
    what it accepts back (`expected_update`, names and shapes checked before `aggregate`) and how
    many answers a round needs (`required_updates`).
    """

    name: ClassVar[str]
    # True when every site ends with a model of its own (local-only): the held-out evaluation then
    # also scores each site's model at the other sites, which says how far it carries.
    site_models: ClassVar[bool] = False
    # True when `aggregate` needs only the sample-weighted mean of the updates: all that secure
    # aggregation gives (`secure_sum`).
    sums_only: ClassVar[bool] = False

    def options(self) -> dict[str, Any]:
        """The options this strategy was built with (empty when it has none)."""
        return {}

    def check_plan(self, plan: TrainingPlan) -> None:
        """Raise ValueError, saying what to change, for a plan this strategy cannot serve (SCAFFOLD:
        an optimiser other than SGD). `experiment.submit` asks before it sends any request, so no
        admin approves requests for a run that would be refused, and the orchestrator asks before
        it runs. Most strategies serve every plan."""

    def configure(self, lr: float, optimizer: str, trainable: frozenset[str]) -> None:
        """The plan's local learning rate and optimiser, and which weights are trainable parameters
        (the rest are buffers), from the orchestrator once the plan is checked (`check_plan`): a
        strategy whose server maths depends on how sites step (SCAFFOLD) reads them here, so the
        user gives the learning rate once. Most strategies need none."""

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        """Start from the initial model for these sites."""
        raise NotImplementedError

    def weights_for(self, site: str) -> Weights:
        """The weights `site` trains from (and is evaluated with) this round."""
        raise NotImplementedError

    def train_params(self, site: str) -> dict[str, Any]:
        """Extra `local_train` parameters for `site`."""
        return {}

    def model_params(self, site: str) -> dict[str, Any]:
        """Parameters every call that builds `site`'s model needs besides its weights, training and
        evaluation alike (FedMA: the widths the global model has grown to)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the round's record keeps about the strategy's state besides weights (FedMA: widths)."""
        return {}

    def training_instruction(self, site: str) -> TrainInstruction:
        return TrainInstruction(weights=self.weights_for(site), params=self.train_params(site))

    def expected_update(self, site: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the weights `site` must send back (by default those it was sent)."""
        return {name: tuple(np.shape(value)) for name, value in self.weights_for(site).items()}

    def required_updates(self, participants: int, min_sites: int) -> int:
        """Accepted updates a round needs before it aggregates; fewer fails the round."""
        return min(min_sites, participants)

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        """Fold the round's accepted updates into the strategy's state."""
        raise NotImplementedError

    def state(self) -> dict[str, Weights]:
        """Everything needed to resume: named weight sets ("global", "site/<name>", ...)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, Weights]) -> None:
        """Restore what `state()` returned."""
        raise NotImplementedError


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
