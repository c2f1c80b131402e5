"""The site tasks this installation provides, and the one entry point that runs them at a site.

`run_site_task` is what executes inside the isolated child process: it refuses cohorts smaller
than the site's minimum before any task sees a case (the one place this rule lives), then runs
the named task. The site's parent process checks the result against the task's output contract.
"""

from __future__ import annotations

from typing import Any

from analyses.site_tasks import (
    cohort_summary, combat_statistics, evaluate, intensity_landmarks, local_train, radiomics_aggregates,
)
from analyses.site_tasks.task import SiteFacts, SiteTask

TASKS: dict[str, SiteTask] = {
    task.name: task
    for task in (
        cohort_summary.TASK,
        local_train.TASK,
        evaluate.TASK,
        radiomics_aggregates.TASK,
        intensity_landmarks.TASK,
        combat_statistics.TASK,
    )
}

__all__ = ["TASKS", "SiteFacts", "SiteTask", "run_site_task"]


class CohortTooSmall(Exception):
    """The site holds fewer cases than its minimum cohort; nothing is computed."""


def run_site_task(name: str, cases: list[dict[str, Any]], params: dict[str, Any], min_cohort: int) -> Any:
    if len(cases) < min_cohort:
        raise CohortTooSmall(f"{len(cases)} cases is below the site's minimum cohort of {min_cohort}")
    return TASKS[name].run(cases, params, SiteFacts(min_cohort=min_cohort))
