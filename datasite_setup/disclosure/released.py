"""What the filters did to one result, in counts only: for the result itself and the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Released:
    """Counts of what was removed or altered; never which group, bin or case."""

    suppressed_groups: int = 0
    zeroed_bins: int = 0
    withheld_sections: int = 0
    dp_epsilon: float | None = None
    ledger_new_cohorts: int | None = None

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"suppressed_groups": self.suppressed_groups, "zeroed_bins": self.zeroed_bins}
        if self.dp_epsilon is not None:
            fields.update(dp_epsilon=self.dp_epsilon, withheld_sections=self.withheld_sections)
        if self.ledger_new_cohorts is not None:
            fields["ledger_new_cohorts"] = self.ledger_new_cohorts
        return fields
