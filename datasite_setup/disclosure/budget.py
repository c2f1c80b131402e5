"""The privacy budget: the epsilon each data scientist has spent on differentially private releases.

A request that asks for noise (`noise.py`) is charged before it runs, and never refunded: a failed
run has seen the data too. The ledger is one JSON file under the site's data dir, so a restart keeps it.
"""

from __future__ import annotations

from pathlib import Path

from datasite_setup.disclosure import locked_json


class BudgetExhausted(Exception):
    """A request whose epsilon exceeds what its data scientist has left; the message is safe to show."""


class PrivacyBudget:
    """The epsilon each data scientist has spent at this site, kept in `path` (JSON) across restarts."""

    def __init__(self, path: Path, limit: float) -> None:
        self.path = Path(path)
        self.limit = float(limit)

    def spent(self, who: str) -> float:
        return float(self._spent().get(who, 0.0))

    def charge(self, who: str, epsilon: float) -> float:
        """Record `epsilon` against `who`; return what remains, or raise BudgetExhausted."""
        with locked_json.exclusive(self.path):
            ledger = self._spent()
            spent = float(ledger.get(who, 0.0))
            remaining = self.limit - spent
            if epsilon > remaining + 1e-12:
                raise BudgetExhausted(
                    f"differential-privacy budget exhausted: this request needs epsilon {epsilon:g}, "
                    f"{max(remaining, 0.0):g} of this site's budget of {self.limit:g} remain for {who}"
                )
            ledger[who] = spent + epsilon
            locked_json.write(self.path, {"limit": self.limit, "spent": ledger})
        return remaining - epsilon

    def _spent(self) -> dict[str, float]:
        content = locked_json.read(self.path)
        return {} if content is None else dict(content["spent"])
