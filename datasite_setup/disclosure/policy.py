"""A site's disclosure policy: which filters its `[privacy]` table chooses, applied in one fixed order.

1. `min_count`: groups of fewer than `min_cohort` values are removed (`min_count.py`);
2. `noise`: differential privacy for a request whose params carry `dp` (`noise.py`), charged to the
   data scientist's budget before the run (`budget.py`); a site without it refuses such requests;
3. `histogram_bins`: bins resting on fewer than `min_cohort` cases are zeroed (`histogram_bins.py`);
4. `release_ledger`: a release that together with earlier ones would single out fewer than
   `min_cohort` cases is refused as a whole (`ledger.py`, `differencing.py`).

The order matters: noise is added to what the min-count rule kept, bins are zeroed after the noise,
and the ledger sees exactly what would leave. The output contract's full check runs between 3 and 4
(`site_execution.run_request`), so the ledger records only releases that do leave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasite_setup.disclosure.cohorts import CohortRecord, is_released
from datasite_setup.disclosure.histogram_bins import zero_small_bins
from datasite_setup.disclosure.ledger import ReleaseLedger
from datasite_setup.disclosure.min_count import drop_small_groups, too_small
from datasite_setup.disclosure.noise import add_noise
from datasite_setup.disclosure.released import Released

FILTERS = ("min_count", "noise", "histogram_bins", "release_ledger")


def protect(result: Any, params: dict[str, Any], min_cohort: int, rng: np.random.Generator | None = None,
            filters: Iterable[str] = FILTERS, cohorts: Iterable[CohortRecord] = ()) -> tuple[Any, Released]:
    """The releasable part of an aggregates result (already shape-checked) and what was done to it.

    If the top level is itself a group, the counts of suppressed groups and zeroed bins are added
    to it, so the data scientist sees that something was held back.
    """
    filters = set(filters)
    released = Released()
    if "min_count" in filters:
        if too_small(result, min_cohort):
            released.suppressed_groups = 1
            return {}, released
        result = drop_small_groups(result, min_cohort, released)
    if "dp" in params:
        result = add_noise(result, params["dp"], rng or np.random.default_rng(), released)
    if "histogram_bins" in filters:
        zero_small_bins(result, min_cohort, released, cohorts)
    if "n" in result:
        result["suppressed_groups"] = released.suppressed_groups
        result["zeroed_bins"] = released.zeroed_bins
    return result, released


@dataclass(frozen=True)
class Policy:
    """The filters one site applies, with its thresholds and, if it keeps one, its release ledger."""

    min_cohort: int
    filters: tuple[str, ...] = FILTERS
    ledger: ReleaseLedger | None = None

    @classmethod
    def for_site(cls, min_cohort: int, filters: Iterable[str], data_dir: Path) -> Policy:
        filters = tuple(f for f in FILTERS if f in set(filters))
        return cls(min_cohort, filters, ReleaseLedger.at_site(data_dir) if "release_ledger" in filters else None)

    @property
    def offers_noise(self) -> bool:
        return "noise" in self.filters

    def protect(self, result: Any, params: dict[str, Any], cohorts: Iterable[CohortRecord]) -> tuple[Any, Released]:
        return protect(result, params, self.min_cohort, filters=self.filters, cohorts=cohorts)

    def record(self, who: str, result: Any, cohorts: Iterable[CohortRecord], released: Released) -> None:
        """Check and record, in the ledger, the cohorts of the parts of `result` that are released;
        raise LedgerRefused if they would single out cases together with earlier releases."""
        leaving = [record for record in cohorts if record.quantity is not None and is_released(result, record.path)]
        if self.ledger is not None and leaving:
            released.ledger_new_cohorts = self.ledger.record(who, leaving, self.min_cohort)
