"""What a site task is: named code the hospital installed, with a parameter schema and a contract.

A data scientist's request only names a task and passes parameters (see
`datasite_setup.thin_requests`); the site validates the parameters against `params` and its own
policy (`policy`, e.g. a minimum batch size), runs the task in isolation on its private cases, and
hands back the result only if it satisfies `contract` and the site's disclosure rules
(`datasite_setup.disclosure`). Those rules need to know which cases entered each part of the
result, so a task that aggregates over subsets of its cases says so in `release`: a `Release` is
the result plus, privately, one `Cohort` per part. A task without `release` aggregates over all
the cases it was given.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


SPLIT_PARAM = "split"
ALL_CASES = "all"
TRAIN_AND_UNLABELLED = "train+unlabelled"
# Every task takes an optional `split`: a fixed train / validation / test split of the site's
# labelled cases (see datasite_setup.case_splits), its unlabelled cases, the training split with
# the unlabelled cases (semi-supervised training), or all of them.
SPLIT_CHOICES = ("train", "validation", "test", "unlabelled", TRAIN_AND_UNLABELLED, ALL_CASES)


@dataclass(frozen=True)
class SiteFacts:
    """What a task may know about the site it runs at (from the site config, never from the request).

    `min_batch` is the fewest samples one training step may use; 1 (no rule) is for in-process
    simulation, a site passes its `[privacy] min_batch`. `sample_dp` is the site's
    `[privacy.sample_dp]` as (noise multiplier, max grad norm): training runs DP-SGD with them.
    """

    min_cohort: int
    min_batch: int = 1
    sample_dp: tuple[float, float] | None = None


class TaskRefusal(ValueError):
    """A task declines to compute because its result could single out cases (cases it would have to
    skip, a covariate level held by too few, too few samples per step); the message is for the
    site's audit log, never for the data scientist."""


@dataclass(frozen=True)
class Cohort:
    """Which of the run's cases (positions in its case list) entered one part of the result.

    `path` leads from the result's top to a group, or to a histogram and then a bin's index (as a
    string); `quantity` names the per-case value aggregated there (`feature_quantity`), never a
    group's level. A voxel histogram's bin sums voxels, not cases: its cohort (quantity None) only
    says which cases contributed, so that no bin rests on fewer than the minimum cohort. Never
    released: the site's release ledger keeps the cohorts of quantities (salted) instead.
    """

    path: tuple[str, ...]
    quantity: str | None
    cases: tuple[int, ...]


@dataclass(frozen=True)
class Release:
    """A task's result and, for the site's disclosure rules only, the cohorts of its parts."""

    result: Any
    cohorts: tuple[Cohort, ...]

    def for_parent(self, positions: list[int], task: str) -> dict[str, Any]:
        """The plain-data form that crosses to the site's parent process. The task saw the cases at
        `positions` of the site's case list, and its cohorts count in that order; they are mapped
        back to the site's positions here. The whole run's cases (every case the task was given) are
        always one cohort, of the task's own quantity."""
        order = np.asarray(positions, np.int64)
        cohorts = (Cohort((), task, tuple(range(len(positions)))), *self.cohorts)
        return {"result": self.result,
                "cohorts": [[list(c.path), c.quantity, order[np.asarray(c.cases, np.int64)]] for c in cohorts]}


# Per-case values that two tasks compute alike share one quantity, so a release of one task
# cannot be differenced against a release of the other unnoticed.
LESION_MEAN_INTENSITY = "lesion_mean_intensity"
LESION_VOLUME = "lesion_volume"
_SHARED_QUANTITIES = {"original_firstorder_Mean": LESION_MEAN_INTENSITY, "original_shape_VoxelVolume": LESION_VOLUME}


def feature_quantity(name: str) -> str:
    """The ledger's name for a pyradiomics feature's per-case values."""
    return _SHARED_QUANTITIES.get(name, f"radiomics_feature/{name}")


@dataclass(frozen=True)
class Param:
    kind: type | tuple[type, ...]
    doc: str
    required: bool = True
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None


@dataclass(frozen=True)
class ParentFacts:
    """What a task answered by the site's parent process knows: who asks, and the site's keys."""

    who: str
    keys: Any  # datasite_setup.secure_aggregation.keys.SiteKeys


@dataclass(frozen=True)
class SiteTask:
    name: str
    summary: str
    params: dict[str, Param]
    run: Callable[[list[dict[str, Any]], dict[str, Any], SiteFacts], Any] | None
    contract: Callable[[dict[str, Any], SiteFacts], Any] | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    release: Callable[[list[dict[str, Any]], dict[str, Any], SiteFacts], Release] | None = None
    policy: Callable[[dict[str, Any], SiteFacts], str | None] | None = None  # what the site's rules refuse
    default_split: str = ALL_CASES  # the cases a request that names no `split` runs on
    # A task that reads no case and needs the site's secrets (a key) is answered by the site's
    # parent process instead of an isolated child: `at_parent(params, facts)`, and `run` is None.
    at_parent: Callable[[dict[str, Any], ParentFacts], Any] | None = None

    def problems(self, params: Any, site: SiteFacts | None = None) -> list[str]:
        """What is wrong with the request's parameters (empty when they are valid); with `site`,
        also what that site's policy refuses in them."""
        if not isinstance(params, dict):
            return [f"params must be a dict, got {type(params).__name__}"]
        found = [f"unknown parameter '{k}'" for k in params if k not in self.params and k != SPLIT_PARAM]
        if SPLIT_PARAM in params and params[SPLIT_PARAM] not in SPLIT_CHOICES:
            found.append(f"parameter '{SPLIT_PARAM}' must be one of {', '.join(SPLIT_CHOICES)}, got {params[SPLIT_PARAM]!r}")
        for key, spec in self.params.items():
            if key not in params:
                if spec.required:
                    found.append(f"missing parameter '{key}' ({spec.doc})")
                continue
            value = params[key]
            if isinstance(value, bool) and bool not in (spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)):
                found.append(f"parameter '{key}' must be {_kind_name(spec.kind)}, got bool")
            elif not isinstance(value, spec.kind):
                found.append(f"parameter '{key}' must be {_kind_name(spec.kind)}, got {type(value).__name__}")
            elif spec.check is not None and (issue := spec.check(value)):
                found.append(f"parameter '{key}': {issue}")
        if not found and site is not None and self.policy is not None and (issue := self.policy(params, site)):
            found.append(issue)
        return found

    def run_with_cohorts(self, cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> Release:
        """The result with its cohorts (a task without `release` reports only the whole run's)."""
        if self.release is not None:
            return self.release(cases, params, site)
        return Release(self.run(cases, params, site), ())

    def source_hash(self) -> str:
        """SHA-256 of the module that implements the task: what the admin reads and approves."""
        return hashlib.sha256(self.source().encode()).hexdigest()

    def source(self) -> str:
        return inspect.getsource(inspect.getmodule(self.run or self.at_parent))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def plain_aggregates(params: dict[str, Any], site: SiteFacts) -> Any:
    """The contract of a task that returns named numbers only (no arrays), each over at least the
    site's minimum cohort."""
    from datasite_setup.output_contracts import AggregatesContract

    return AggregatesContract(min_cohort=site.min_cohort, max_array_len=0)


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


def known_domain(name: str) -> str | None:
    from domains import DOMAINS

    return None if name in DOMAINS else f"unknown domain; known: {', '.join(DOMAINS)}"
