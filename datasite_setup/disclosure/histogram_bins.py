"""The histogram-bins cleanser: no released bin may rest on fewer than `min_cohort` cases.

A 1-D integer array inside a group is a histogram of counts. A bin holding from 1 to
`min_cohort - 1` counts is set to 0. Where the task recorded which cases contributed to a bin (a
cohort whose path ends in the bin's index), a bin with fewer than `min_cohort` contributing cases
is set to 0 too, whatever its count: in a histogram of voxels one case adds many counts, so the
count alone would let one case's voxels through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from datasite_setup.disclosure.cohorts import CohortRecord
from datasite_setup.disclosure.released import Released


def zero_small_bins(result: dict[str, Any], min_cohort: int, released: Released,
                    cohorts: Iterable[CohortRecord] = ()) -> None:
    _zero_small_counts(result, min_cohort, released)
    for record in cohorts:
        if len(record.case_ids) < min_cohort:
            _zero_bin(result, record.path, released)


def _zero_small_counts(node: dict[str, Any], min_cohort: int, released: Released) -> None:
    for child in node.values():
        if isinstance(child, dict):
            _zero_small_counts(child, min_cohort, released)
        elif isinstance(child, np.ndarray) and child.ndim == 1 and child.dtype.kind in "iu" and "n" in node:
            small = (child > 0) & (child < min_cohort)
            released.zeroed_bins += int(small.sum())
            child[small] = 0


def _zero_bin(result: dict[str, Any], path: tuple[str, ...], released: Released) -> None:
    """Set the bin at `path` (keys to a histogram, then the bin's index) to 0 if it is one."""
    if not path or not path[-1].isdigit():
        return
    node: Any = result
    for key in path[:-1]:
        if not (isinstance(node, dict) and key in node):
            return
        node = node[key]
    index = int(path[-1])
    if isinstance(node, np.ndarray) and node.ndim == 1 and node.dtype.kind in "iu" and index < node.size and node[index]:
        node[index] = 0
        released.zeroed_bins += 1
