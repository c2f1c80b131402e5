"""The site tasks this installation provides, and the entry points that run them at a site.

`run_for_parent` is what executes inside the isolated child process: it refuses cohorts smaller
than the site's minimum before any task sees a case (the one place this rule lives), runs the named
task, and hands the parent its result with the private record of which cases entered each part
(`task.Release`), or the reason the task declined. The parent applies the site's disclosure rules
and the task's output contract. `run_installed_task` is the same run for in-process callers
(tests, simulation), result only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasite_setup.site_tasks import (
    cohort_summary, combat_statistics, evaluate, foreground_share, intensity_landmarks, local_train, radiomics_aggregates,
    secure_aggregation_key,
)
from datasite_setup.site_tasks.case_selection import positions_in_split, take
from datasite_setup.site_tasks.task import SPLIT_PARAM, ParentFacts, Release, SiteFacts, SiteTask, TaskRefusal

TASKS: dict[str, SiteTask] = {
    task.name: task
    for task in (
        cohort_summary.TASK,
        local_train.TASK,
        evaluate.TASK,
        foreground_share.TASK,
        radiomics_aggregates.TASK,
        intensity_landmarks.TASK,
        combat_statistics.TASK,
        secure_aggregation_key.TASK,
    )
}

__all__ = ["TASKS", "ParentFacts", "SiteFacts", "SiteTask", "TaskRefusal", "run_for_parent", "run_installed_task"]


class CohortTooSmall(TaskRefusal):
    """The site holds fewer cases than its minimum cohort; nothing is computed."""


def _run(name: str, cases: Sequence[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> tuple[Release, list[int]]:
    """The task's release over the cases of the requested split, and those cases' positions in `cases`."""
    task = TASKS[name]
    if task.run is None:
        raise ValueError(f"site task '{name}' reads no case: the site's parent process answers it")
    split = params.get(SPLIT_PARAM, task.default_split)
    positions = positions_in_split(cases, split)
    if len(positions) < site.min_cohort:
        raise CohortTooSmall(f"{len(positions)} cases in split '{split}' is below the site's minimum cohort of {site.min_cohort}")
    task_params = {k: v for k, v in params.items() if k != SPLIT_PARAM}
    return task.run_with_cohorts(take(cases, positions), task_params, site), positions


def run_installed_task(name: str, cases: Sequence[dict[str, Any]], params: dict[str, Any], min_cohort: int,
                       min_batch: int = 1, sample_dp: tuple[float, float] | None = None) -> Any:
    return _run(name, cases, params, SiteFacts(min_cohort, min_batch, sample_dp))[0].result


def run_for_parent(name: str, cases: Sequence[dict[str, Any]], params: dict[str, Any], min_cohort: int,
                   min_batch: int, sample_dp: list[float] | None = None) -> dict[str, Any]:
    """`{"result", "cohorts"}` for the site's parent process (case positions in `cases`), or `{"refused": reason}`."""
    try:
        facts = SiteFacts(min_cohort, min_batch, None if sample_dp is None else (float(sample_dp[0]), float(sample_dp[1])))
        release, positions = _run(name, cases, params, facts)
    except TaskRefusal as refusal:
        return {"refused": str(refusal)}
    return release.for_parent(positions, name)
