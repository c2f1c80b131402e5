"""A site simulated in this process - for benchmarks and tests of the orchestrator, never for
hospitals' data: it runs the installed site tasks (`local_train`, `evaluate`, `foreground_share`,
`intensity_landmarks`) on cases held here.

The datasite path runs the very same task code in an isolated child at the site, and both go
through `datasite_setup.site_tasks.run_installed_task`, so the split a call names (`train` by
default for training, `test` for evaluation, or the `split` parameter) selects the same cases and
a split below the site's `min_cohort` is refused the same way. What a simulation does not measure
is transport and isolation cost, which benchmarks/federated_round_overhead.py does.

A real site fixes each case's split with a keyed hash of its patient under a secret key
(`datasite_setup.case_splits`). A simulated fleet has no secret and usually a handful of cases, so
`with_splits` assigns splits itself: the same on every run, in the site's proportions, and with
every split non-empty from three cases on (a hash alone would leave a 4-case site without
validation cases two times in three).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasite_setup.case_splits import DEFAULT_FRACTIONS, SPLITS, check_fractions
from datasite_setup.disclosure import SampleNoise, UpdateNoise
from datasite_setup.disclosure.update_accountant import composed_epsilon
from datasite_setup.secure_aggregation.keys import SiteKeys
from datasite_setup.secure_aggregation.release import SESSION_PARAM, masked_update, session_problem
from datasite_setup.secure_aggregation.sessions import SessionLedger
from datasite_setup.site_config import SecureAggregationSettings

# Public on purpose: a simulation has nothing to hide, and everybody must get the same fleet splits.
SIMULATION_KEY = b"medfed-simulation-splits"
SIMULATION_USER = "simulation"  # the one data scientist of a simulated fleet


def with_splits(cases: list[dict[str, Any]], fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> list[dict[str, Any]]:
    """Shallow copies of `cases`, each with a `split`; a case that already has one keeps it.

    The others are ranked by a public hash of their position (so the split is the same on every
    run and does not follow generation order) and dealt out: at least one validation and one test
    case when three or more need a split, the rest in proportion, training taking what remains.
    Positions rather than case ids, because ids read from DICOM exports are pseudonyms that change
    with every read."""
    values = check_fractions(fractions)
    out = [dict(case) for case in cases]
    todo = [i for i, case in enumerate(out) if not case.get("split")]
    n = len(todo)
    held_out = {name: (max(1, round(values[name] * n)) if n >= 3 and values[name] > 0 else 0) for name in SPLITS[1:]}
    if n < 3:
        held_out = {"validation": 0, "test": 1 if n == 2 and values["test"] > 0 else 0}
    ranked = sorted(todo, key=lambda i: hmac.new(SIMULATION_KEY, str(i).encode(), hashlib.sha256).digest())
    order = [name for name in ("test", "validation") for _ in range(held_out[name])]
    for rank, index in enumerate(ranked):
        out[index]["split"] = order[rank] if rank < len(order) else "train"
    return out


@dataclass
class SimulatedSite:
    """One simulated site: its cases (every one with a `split`) and its minimum cohort.

    `min_cohort` is 1 by default so tiny phantom fleets train; a test sets it higher to play a
    site whose cohort is too small, which then refuses exactly as a datasite would. With
    `update_dp` it noises every update as a datasite with that `[privacy.update_dp]` does (the same
    filter) and reports the epsilon composed over its releases, without a budget to refuse at; with
    `sample_dp` it trains with DP-SGD as such a datasite does and reports the same. With
    `secure_aggregation` (see `pin_each_other`) it masks its updates in a session as a datasite
    with `[secure_aggregation]` does (the same checks and masks, its session ledger in a temporary
    folder)."""

    name: str
    cases: list[dict[str, Any]]
    min_cohort: int = 1
    update_dp: UpdateNoise | None = None
    sample_dp: SampleNoise | None = None
    uses: list[tuple[float, float, int]] = field(default_factory=list)
    secure_aggregation: SecureAggregationSettings | None = None
    seed: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def __post_init__(self) -> None:
        missing = [i for i, case in enumerate(self.cases) if not case.get("split")]
        if missing:
            raise ValueError(f"{self.name}: cases {missing} have no 'split'; give the fleet splits with with_splits()")
        self.keys = SiteKeys(self.name, self.seed)

    @functools.cached_property
    def _ledger_dir(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix=f"medfed-sim-{self.name}-", ignore_cleanup_errors=True)

    @functools.cached_property
    def sessions(self) -> SessionLedger:
        """The site's session ledger, in a temporary folder made on first use and removed with the
        site (or at exit)."""
        return SessionLedger.at_site(Path(self._ledger_dir.name))

    @classmethod
    def from_cases(cls, name: str, cases: list[dict[str, Any]], min_cohort: int = 1) -> SimulatedSite:
        """A site holding `cases`, those without a split given one by `with_splits`."""
        return cls(name, with_splits(cases), min_cohort)

    def split_sizes(self) -> dict[str, int]:
        """How many cases each split holds (what a site's admin would see in its case store)."""
        sizes = {name: 0 for name in SPLITS}
        for case in self.cases:
            sizes[case["split"]] = sizes.get(case["split"], 0) + 1
        return sizes

    def train(self, params: dict[str, Any]) -> Any:
        session = params.get(SESSION_PARAM)
        if session is not None:
            if self.secure_aggregation is None:
                raise ValueError(f"{self.name} takes no part in secure aggregation")
            if issue := session_problem(session, self.secure_aggregation, self.keys, SIMULATION_USER, params["weights"], self.sessions):
                raise ValueError(issue)
        result = self._trained(params)
        if session is not None:
            result = masked_update(result, params["weights"], session, self.secure_aggregation, self.keys, SIMULATION_USER,
                                   self.sessions)
        return result

    def session_key(self, params: dict[str, Any]) -> dict[str, str]:
        if self.secure_aggregation is None:
            raise ValueError(f"{self.name} takes no part in secure aggregation")
        return self.keys.session_key(SIMULATION_USER, params["session"])

    def _trained(self, params: dict[str, Any]) -> Any:
        from datasite_setup.site_tasks import run_installed_task

        sample_dp = None if self.sample_dp is None else tuple(self.sample_dp.for_task())
        result = run_installed_task("local_train", self.cases, params, min_cohort=self.min_cohort, sample_dp=sample_dp)
        if self.update_dp is not None:
            result = self.update_dp.protect(result, params["weights"], float(params.get("dp_clip", self.update_dp.clip_norm)))
            self.uses.append((self.update_dp.release_multiplier(), 1.0, 1))
            delta = self.update_dp.delta
        elif self.sample_dp is not None:
            self.uses.extend(self.sample_dp.uses(result["scalars"]))
            result = self.sample_dp.released(result)
            delta = self.sample_dp.delta
        else:
            return result
        result["scalars"]["dp_epsilon_spent"] = composed_epsilon(self.uses, delta)
        return result

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        from datasite_setup.site_tasks import run_installed_task

        return run_installed_task("evaluate", self.cases, params, min_cohort=self.min_cohort)

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        from datasite_setup.site_tasks import run_installed_task

        return run_installed_task("intensity_landmarks", self.cases, params, min_cohort=self.min_cohort)

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        from datasite_setup.site_tasks import run_installed_task

        return run_installed_task("foreground_share", self.cases, params, min_cohort=self.min_cohort)


def pin_each_other(sites: list[SimulatedSite], min_participants: int = 3) -> list[SimulatedSite]:
    """The sites, each pinning every other's identity for secure aggregation, as their admins would."""
    identities = {site.name: site.keys.identity_public() for site in sites}
    for site in sites:
        peers = {name: key for name, key in identities.items() if name != site.name}
        site.secure_aggregation = SecureAggregationSettings(peers=peers, min_participants=min_participants)
    return sites
