"""A site simulated in this process - for benchmarks and tests of the orchestrator, never for
hospitals' data: it runs the installed site tasks (`local_train`, `evaluate`) on cases held here.

The datasite path runs the very same task code in an isolated child at the site, so training
results are identical (tests/test_federated_training.py checks an exact case); what a simulation
does not measure is transport and isolation cost, which benchmarks/federated_round_overhead.py does.
Separate evaluation cases let a benchmark score on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimulatedSite:
    name: str
    train_cases: list[dict[str, Any]]
    eval_cases: list[dict[str, Any]] = field(default_factory=list)

    def train(self, params: dict[str, Any]) -> Any:
        from datasite_setup.site_tasks import local_train
        from datasite_setup.site_tasks.task import SiteFacts

        return local_train.run(self.train_cases, params, SiteFacts(min_cohort=1))

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        from datasite_setup.site_tasks import evaluate
        from datasite_setup.site_tasks.task import SiteFacts

        return evaluate.run(self.eval_cases or self.train_cases, params, SiteFacts(min_cohort=1))
