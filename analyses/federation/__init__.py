"""Federated training across datasites: strategies behind one protocol, and the orchestrator.

`strategy.py` says what a strategy is; `fedavg.py`, `fedprox.py`, `fedbn.py`, `fedma.py` (matched averaging), `fedopt.py` (FedAdam,
FedYogi, FedAdagrad), `scaffold.py` (SCAFFOLD's control variates) and `local_only.py` are one small
class each; `orchestrator.py` runs rounds against live sites (`site_link.py`), checks updates
(`update_checks.py`) and checkpoints (`checkpoint.py`).
"""

import inspect
from typing import Any

from analyses.federation.fedavg import FedAvg
from analyses.federation.fedbn import FedBN
from analyses.federation.fedma import FedMA
from analyses.federation.fedopt import FedAdagrad, FedAdam, FedYogi
from analyses.federation.fedprox import FedProx
from analyses.federation.local_only import LocalOnly
from analyses.federation.scaffold import Scaffold
from analyses.federation.strategy import SiteUpdate, Strategy, TrainInstruction, Weights

STRATEGIES = {
    strategy.name: strategy
    for strategy in (FedAvg, FedProx, FedBN, FedMA, FedAdam, FedYogi, FedAdagrad, Scaffold, LocalOnly)
}

__all__ = [
    "STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedBN", "FedMA", "FedProx", "FedYogi", "LocalOnly", "Scaffold",
    "SiteUpdate", "Strategy", "TrainInstruction", "Weights", "make_strategy", "options_for", "parse_strategy_options",
]


def make_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by name with its options (each strategy's constructor keywords, e.g. FedProx's mu)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    accepted = option_names(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"strategy {name!r} has no option {', '.join(unknown)}; "
                         f"its options: {', '.join(accepted) or 'none'}")
    return STRATEGIES[name](**options)


def option_names(name: str) -> list[str]:
    """The constructor keywords of the named strategy: the options it owns."""
    return [p for p in inspect.signature(STRATEGIES[name]).parameters if p != "self"]


def options_for(names: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each strategy's share of the options given once for several strategies; an option that no
    listed strategy has is an error rather than silently unused."""
    unused = sorted(k for k in options if not any(k in option_names(n) for n in names))
    if unused:
        owners = "; ".join(f"{n}: {', '.join(option_names(n)) or 'none'}" for n in names)
        raise ValueError(f"no chosen strategy has option {', '.join(unused)} ({owners})")
    return {name: {k: v for k, v in options.items() if k in option_names(name)} for name in names}


def parse_strategy_options(items: list[str]) -> dict[str, Any]:
    """`["mu=0.01", "server_lr=1"]` -> {"mu": 0.01, "server_lr": 1}; numbers become numbers."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"strategy option {item!r} is not NAME=VALUE (e.g. mu=0.01)")
        try:
            value: Any = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        options[key.strip()] = value
    return options
