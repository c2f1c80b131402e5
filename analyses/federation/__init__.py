"""Federated training across datasites: strategies behind one protocol, and the orchestrator.

`strategy.py` says what a strategy is; `fedavg.py`, `fedprox.py`, `fedbn.py` and
`local_only.py` are one small class each; `orchestrator.py` runs rounds against live sites
(`site_link.py`), checks updates (`update_checks.py`) and checkpoints (`checkpoint.py`).
"""

from analyses.federation.fedavg import FedAvg
from analyses.federation.fedbn import FedBN
from analyses.federation.fedprox import FedProx
from analyses.federation.local_only import LocalOnly
from analyses.federation.strategy import SiteUpdate, Strategy, Weights

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedbn": FedBN, "local": LocalOnly}

__all__ = ["STRATEGIES", "FedAvg", "FedBN", "FedProx", "LocalOnly", "SiteUpdate", "Strategy", "Weights", "make_strategy"]


def make_strategy(name: str, **options: float) -> Strategy:
    """A strategy by name (`fedavg`, `fedprox`, `fedbn`, `local`) with its options (e.g. mu)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**options)
