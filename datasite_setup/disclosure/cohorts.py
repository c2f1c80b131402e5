"""Which cases entered each released part of a site task's result: read in the parent, never released.

An installed task's run returns, next to its result, a private list of cohorts (see
`datasite_setup.site_tasks.task.Release`): for each part of the result (a group, or one bin of a
histogram) the quantity it aggregates (None for a voxel histogram's bin, which sums voxels) and the
positions, in the run's case list, of the cases whose values entered it. The parent turns positions into the cases' pseudonymous ids, uses them for the
histogram-bins cleanser and the release ledger, and strips them before anything else sees the result.
A task may instead decline to compute (`{"refused": reason}`); the reason is for the admin's audit log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from datasite_setup.output_contracts import ContractViolation

QUANTITY = re.compile(r"[A-Za-z0-9_.:/\-]{1,200}\Z")
MAX_PATH = 8
MAX_REASON = 500


class ReleaseRefused(Exception):
    """A release the site's disclosure rules refuse; `reason` is for the admin, never the data scientist."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TaskDeclined(ReleaseRefused):
    """The task itself declined (skipped cases, a small covariate level, too few samples per step)."""


class LedgerRefused(ReleaseRefused):
    """The release ledger refused: together with earlier releases this one would single out cases."""


@dataclass(frozen=True)
class CohortRecord:
    """The cases (pseudonymous ids) whose values entered the part of the result at `path`
    (`quantity` None: they contributed to a bin of voxels, which is no release of a case quantity)."""

    path: tuple[str, ...]
    quantity: str | None
    case_ids: frozenset[str]


def read_task_release(payload: Any, cases: list[dict[str, Any]]) -> tuple[Any, list[CohortRecord]]:
    """Split a task run's payload into its result and its cohorts; raise TaskDeclined if it declined.

    The payload came from the isolated child, so every field is checked; a malformed one is a
    ContractViolation whose message quotes nothing.
    """
    if isinstance(payload, dict) and set(payload) == {"refused"} and isinstance(payload["refused"], str):
        raise TaskDeclined(payload["refused"][:MAX_REASON])
    if not (isinstance(payload, dict) and set(payload) == {"result", "cohorts"} and isinstance(payload["cohorts"], list)):
        raise ContractViolation("the task's run did not return a result with its private cohort record")
    records = [_record(entry, cases) for entry in payload["cohorts"]]
    return payload["result"], records


def _record(entry: Any, cases: list[dict[str, Any]]) -> CohortRecord:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise ContractViolation("the task's cohort record has an entry of the wrong form")
    path, quantity, positions = entry
    if not (isinstance(path, list) and len(path) <= MAX_PATH and all(isinstance(k, str) for k in path)):
        raise ContractViolation("the task's cohort record has a malformed path")
    if not (quantity is None or isinstance(quantity, str) and QUANTITY.match(quantity)):
        raise ContractViolation("the task's cohort record names a quantity that is not a short identifier")
    if not (isinstance(positions, np.ndarray) and positions.ndim == 1 and positions.dtype.kind in "iu"):
        raise ContractViolation("the task's cohort record has case positions that are not an integer array")
    if positions.size and (positions.min() < 0 or positions.max() >= len(cases)):
        raise ContractViolation("the task's cohort record names a case position outside the run's cases")
    ids = [cases[int(i)].get("case_id") for i in positions]
    if any(not isinstance(case_id, str) or not case_id for case_id in ids):
        raise ReleaseRefused("a case has no case_id, so the release ledger cannot tell which cases a release covers")
    return CohortRecord(tuple(path), quantity, frozenset(ids))


def is_released(result: Any, path: tuple[str, ...]) -> bool:
    """Whether the part at `path` is still in the result: a non-empty dict or value, or a non-zero bin."""
    node = result
    for depth, key in enumerate(path):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, np.ndarray) and node.ndim == 1 and key.isdigit() and depth == len(path) - 1:
            return int(key) < node.size and node[int(key)] != 0
        else:
            return False
    return node != {}
