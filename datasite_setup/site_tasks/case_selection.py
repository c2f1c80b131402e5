"""Which of a site's cases a task run uses: the split its request names, or the task's default.

Cases come either from the case store (a `CaseSource`, whose manifest entries say each case's split
without reading a voxel) or as a list of case records carrying a `split` key. A record without a
split belongs to no split, only to `all`: evaluating on cases whose split nobody fixed would score a
model on cases it may have trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasite_setup.case_store import CaseSource
from datasite_setup.site_tasks.task import ALL_CASES, TRAIN_AND_UNLABELLED


def _split_and_labelled(cases: Sequence[dict[str, Any]], index: int) -> tuple[str | None, bool]:
    if isinstance(cases, CaseSource):
        entry = cases.entries[index]
        return entry.split, entry.labelled
    case = cases[index]
    return case.get("split"), bool(case.get("labelled", True))


def positions_in_split(cases: Sequence[dict[str, Any]], split: str) -> list[int]:
    """Positions (in `cases`) of the cases in `split`; `all` is every case, `train+unlabelled` the
    labelled training cases and every unlabelled case."""
    if split == ALL_CASES:
        return list(range(len(cases)))
    labelled_split = "train" if split == TRAIN_AND_UNLABELLED else split
    chosen = []
    for index in range(len(cases)):
        case_split, labelled = _split_and_labelled(cases, index)
        if not labelled and split in ("unlabelled", TRAIN_AND_UNLABELLED):
            chosen.append(index)
        elif labelled and case_split == labelled_split:
            chosen.append(index)
    return chosen


def labelled_flags(cases: Sequence[dict[str, Any]]) -> list[bool]:
    """Whether each case is labelled, read from the manifest (no voxel is loaded) or the record."""
    return [_split_and_labelled(cases, index)[1] for index in range(len(cases))]


def take(cases: Sequence[dict[str, Any]], positions: list[int]) -> Sequence[dict[str, Any]]:
    """The cases at `positions`, of the same kind as `cases` (a case source stays lazy)."""
    if isinstance(cases, CaseSource):
        return CaseSource(cases.store_root, [cases.entries[i] for i in positions])
    return [cases[i] for i in positions]
