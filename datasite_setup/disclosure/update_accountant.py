"""The update accountant: the privacy loss of every model update this site released to each data scientist.

Model updates are many uses of the Gaussian mechanism; adding up their epsilons (as the budget does
for aggregates) would overstate the loss many times over, so they are composed by Opacus' RDP
accountant (Mironov 2017). Each use is (noise multiplier, sample rate, count): a noised update
(`update_noise.py`) is one use at sample rate 1 (it depends on the whole training split), a DP-SGD
run (`site_tasks/dp_sgd.py`) is `steps` uses at its Poisson sampling rate. Per data scientist the
site keeps that history in `update_accountant.json` under the data dir, so a restart keeps it. The
increase of the composed epsilon that new uses bring is charged to the data scientist's epsilon
budget (`budget.py`) under this file's lock (before a noised update's run; after a DP-SGD run,
whose sampling rate only the run knows, and before anything leaves), so the budget holds the
updates' composed epsilon plus the aggregates' epsilons (basic composition between the two)::

    {"format": 1, "delta": 1e-05, "history": {"<data scientist>": [[noise multiplier, sample rate, uses], ...]}}
"""

from __future__ import annotations

import warnings
from pathlib import Path

from datasite_setup.disclosure import locked_json
from datasite_setup.disclosure.budget import PrivacyBudget

FORMAT = 1
ACCOUNTANT_FILE = "update_accountant.json"


Use = tuple[float, float, int]  # noise multiplier, sample rate, count


def composed_epsilon(history: list[Use], delta: float) -> float:
    """Epsilon at `delta` of the uses in `history`, composed in RDP."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(multiplier, rate, count) for multiplier, rate, count in history]
    with warnings.catch_warnings():  # at tiny multipliers the best order is the smallest: the bound holds, loosely
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta))


def _appended(history: list[Use], new: list[Use]) -> list[Use]:
    out = list(history)
    for multiplier, rate, count in new:
        if out and out[-1][:2] == (multiplier, rate):
            out[-1] = (multiplier, rate, out[-1][2] + count)
        else:
            out.append((multiplier, rate, count))
    return out


class UpdateAccountant:
    """The composed privacy loss of the model updates each data scientist has had from this site."""

    def __init__(self, path: Path, delta: float) -> None:
        self.path = Path(path)
        self.delta = float(delta)

    @classmethod
    def at_site(cls, data_dir: Path, delta: float) -> UpdateAccountant:
        return cls(data_dir / ACCOUNTANT_FILE, delta)

    def history(self, who: str) -> list[Use]:
        content = locked_json.read(self.path) or {}
        return [(float(m), float(q), int(n)) for m, q, n in content.get("history", {}).get(who, [])]

    def epsilon(self, who: str) -> float:
        return composed_epsilon(self.history(who), self.delta)

    def charge(self, who: str, uses: list[Use], budget: PrivacyBudget) -> float:
        """Charge `uses` to `who`'s budget and record them; return the epsilon charged. Raises
        BudgetExhausted (nothing recorded) when it does not fit."""
        with locked_json.exclusive(self.path):
            content = locked_json.read(self.path) or {"format": FORMAT, "history": {}}
            before = [(float(m), float(q), int(n)) for m, q, n in content["history"].get(who, [])]
            after = _appended(before, uses)
            increase = composed_epsilon(after, self.delta) - composed_epsilon(before, self.delta)
            budget.charge(who, increase)
            content["history"][who] = [list(entry) for entry in after]
            content["delta"] = self.delta
            locked_json.write(self.path, content)
        return increase
