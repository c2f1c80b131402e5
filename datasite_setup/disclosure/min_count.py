"""The min-count cleanser: a group of fewer than `min_cohort` values is removed with everything beneath it.

A group is a dict with an "n": the number of values that entered its statistics (the site tasks
report that n, not the number of cases they were given). Removal is not an error: the rest is
released, and only the number of groups removed is counted, never which.
"""

from __future__ import annotations

from typing import Any

from datasite_setup.disclosure.released import Released


def too_small(node: Any, min_cohort: int) -> bool:
    return isinstance(node, dict) and "n" in node and node["n"] < min_cohort


def drop_small_groups(node: dict[str, Any], min_cohort: int, released: Released) -> dict[str, Any]:
    kept = {}
    for key, child in node.items():
        if too_small(child, min_cohort):
            released.suppressed_groups += 1
        elif isinstance(child, dict):
            kept[key] = drop_small_groups(child, min_cohort, released)
        else:
            kept[key] = child
    return kept
