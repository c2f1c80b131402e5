"""When may the cohorts of one release follow earlier releases of the same quantity?

A released mean over n values is a released sum over a known set of cases, a histogram bin a count
over one; every statistic of one quantity is therefore a linear function of the per-case values of
the set of cases behind it. Two releases over sets A and B give the sum over their difference:
7 x mean(A) - 6 x mean(B) is one case's value when B is A without that case. So a new cohort N is
refused when, for an earlier cohort E of the same quantity (or another new one):

1. 0 < |N symmetric-difference E| < min_cohort (the few cases between them are given away), or
2. some set of fewer than `min_cohort` cases becomes determined by the releases together: the
   cases fall into classes by which releases they are in, and a class's sum is determined exactly
   when its indicator lies in the row space of the releases' membership matrix (this catches
   unions, e.g. Manufacturer groups GE and Philips released once, all cases once, and the one
   Toshiba case suppressed by the min-count rule being their difference).

Identical cohorts never conflict: an honest analysis repeated adds nothing. Rule 2 only looks at
the cohorts connected to the new ones through shared cases, because a class elsewhere cannot be
affected, and is decided for all new cohorts of one release at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TOLERANCE = 1e-8


def conflict(earlier: Sequence[frozenset[str]], new: Sequence[frozenset[str]], min_cohort: int) -> str | None:
    """Why releasing over the cohorts `new` after `earlier` would single out fewer than
    `min_cohort` cases, or None."""
    known = set(earlier)
    fresh = [cohort for cohort in dict.fromkeys(new) if cohort not in known]
    if not fresh:
        return None
    for i, cohort in enumerate(fresh):
        for other in (*earlier, *fresh[:i]):
            differing = len(cohort ^ other)
            if 0 < differing < min_cohort:
                return f"differs from an earlier release of it by {differing} case(s)"
    isolated = _newly_isolated(_connected(earlier, frozenset().union(*fresh)), fresh, min_cohort)
    if isolated:
        return f"with earlier releases of it, determines the values of a set of {isolated} case(s)"
    return None


def _connected(earlier: Sequence[frozenset[str]], new: frozenset[str]) -> list[frozenset[str]]:
    """The earlier cohorts linked to `new` by chains of shared cases."""
    holding: dict[str, list[int]] = {}
    for index, cohort in enumerate(earlier):
        for case in cohort:
            holding.setdefault(case, []).append(index)
    linked, seen, pending = set(), set(new), list(new)
    while pending:
        for index in holding.get(pending.pop(), ()):
            if index not in linked:
                linked.add(index)
                fresh = earlier[index] - seen
                seen |= fresh
                pending.extend(fresh)
    return [earlier[index] for index in sorted(linked)]


def _newly_isolated(earlier: list[frozenset[str]], fresh: list[frozenset[str]], min_cohort: int) -> int:
    """The size of a class of fewer than `min_cohort` cases determined with `fresh` but not without it (0: none)."""
    rows = [*earlier, *fresh]
    column = {case: j for j, case in enumerate(frozenset().union(*rows))}
    membership = np.zeros((len(rows), len(column)), bool)
    for r, cohort in enumerate(rows):
        membership[r, [column[case] for case in cohort]] = True
    classes, sizes = np.unique(membership, axis=1, return_counts=True)
    small = sizes < min_cohort
    if not small.any():
        return 0
    matrix = classes.astype(float)
    now, before = _determined(matrix), _determined(matrix[: len(earlier)])
    newly = small & now & ~before
    return int(sizes[newly][0]) if newly.any() else 0


def _determined(matrix: np.ndarray) -> np.ndarray:
    """Per column: whether its unit vector lies in the row space (its class's sum follows from the rows)."""
    if matrix.shape[0] == 0:
        return np.zeros(matrix.shape[1], bool)
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = int((singular > singular[0] * max(matrix.shape) * 1e-12).sum()) if singular[0] > 0 else 0
    return (vt[:rank] ** 2).sum(axis=0) > 1 - _TOLERANCE
