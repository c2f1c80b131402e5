"""Execution budgets hold under simultaneous calls: the site reserves a run under a lock before it
starts, so N calls at once against a budget of 1 run exactly once, and a run that fails counts."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from analyses.site_requests import call_site_task, request_site_task
from datasite_setup import review
from datasite_setup.execution_limits import reserve_run, runs_started, set_cap
from tests.conftest import LiveSite
from tests.test_datasite_server import asset_of, upload_small_dataset

CALLERS = 4


def _reserve_in_process(data_dir: str, granted: multiprocessing.Queue) -> None:
    granted.put(reserve_run(Path(data_dir), "code-a", limit=5).granted)


def test_reservations_from_many_processes_and_threads_never_exceed_the_budget(tmp_path: Path) -> None:
    set_cap(tmp_path, "code-a", 3)
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    workers = [multiprocessing.get_context("fork").Process(target=_reserve_in_process, args=(str(tmp_path), queue))
               for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    from_processes = [queue.get(timeout=10) for _ in workers]
    with ThreadPoolExecutor(6) as pool:
        from_threads = list(pool.map(lambda _: reserve_run(tmp_path, "code-a", limit=5).granted, range(6)))
    assert sum(from_processes) + sum(from_threads) == 3
    assert runs_started(tmp_path, "code-a") == 3
    assert runs_started(tmp_path, "code-a", stored_outputs=4) == 4  # code that ran before the ledger existed
    assert reserve_run(tmp_path, "code-b", limit=None).granted  # no limit: counted, never refused
    assert runs_started(tmp_path, "code-b") == 1


def test_simultaneous_calls_against_a_budget_of_one_run_once(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "race-target")
    ds = shared_site.ds_client()
    request_site_task(ds, asset_of(ds, "race-target"), "cohort_summary", "race", max_runs=5)
    pending = review.list_requests(shared_site.config, shared_site.admin_client(), status="pending")
    request_id = next(r.id for r in pending if r.function == "cohort_summary_race")
    shared_site.admin("approve", request_id, "--max-runs", "1")

    callers = [shared_site.ds_client() for _ in range(CALLERS)]
    assets = [asset_of(client, "race-target") for client in callers]
    start = threading.Barrier(CALLERS)

    def call(i: int):
        start.wait()
        try:
            return call_site_task(callers[i], assets[i], "cohort_summary", "race", {"group_by": "Manufacturer"})
        except Exception as exc:  # the refusal the data scientist sees
            return exc

    with ThreadPoolExecutor(CALLERS) as pool:
        outcomes = list(pool.map(call, range(CALLERS)))
    released = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [str(o) for o in outcomes if isinstance(o, Exception)]
    assert len(released) == 1 and released[0]["unknown"]["n"] == 3, outcomes
    assert len(refused) == CALLERS - 1 and all("1 of 1 runs" in message for message in refused), refused

    shown = review.show_request(shared_site.config, shared_site.admin_client(), request_id)
    assert (shown.summary.runs_used, shown.summary.runs_allowed) == (1, 1)
    assert sorted(run["action"] for run in shown.runs) == ["ran"] + ["refused-run-budget"] * (CALLERS - 1)


def always_fails(cases):
    raise ValueError("nothing to see")


def test_a_failed_run_counts_against_the_budget(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "failing-target")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "failing-target")
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=asset, client=ds), output_policy=OutputPolicyExecuteCount(limit=2)
    )(always_fails)
    ds.code.request_code_execution(code)
    config, admin = shared_site.config, shared_site.admin_client()
    request_id = next(r.id for r in review.list_requests(config, admin, status="pending") if r.function == "always_fails")
    review.approve(config, admin, request_id)
    messages = []
    for _ in range(3):
        try:
            result = ds.code.always_fails(cases=asset)
            messages.append(result.message if isinstance(result, sy.SyftError) else repr(result))
        except Exception as exc:
            messages.append(str(exc))
    assert all("did not complete at the site" in m for m in messages[:2]), messages
    assert "2 of 2 runs" in messages[2]
    summary = next(s for s in review.list_requests(config, admin) if s.id == request_id)
    assert (summary.runs_used, summary.runs_allowed) == (2, 2)
