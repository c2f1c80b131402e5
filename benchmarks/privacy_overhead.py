"""Per-call cost of the privacy machinery: the server's door and the release ledger, against today's call.

The target: each adds at most 5% to a call (ratio <= 1.05). Both sides of every ratio are
measured in this run, in this process, interleaved call by call (every variant once per round, the
order reversed every other round), because the 2-core machine's load changes faster than a batch.

(1) The door (`datasite_setup.server_door`). One datasite is built in this process with the site's
    own `build_datasite` (door, execution budgets and isolated execution installed, as `serve` does;
    no HTTP, so the door's share is the largest it can be). The data scientist's client calls:
    `user.get_current_user` and `dataset.get_all` (on the allow-list without an argument check),
    `action.get` of her own upload (a permission lookup) and `action.set` of a small object (four
    checks: type, no overwrite, no link, blob ownership). Each call runs either through the door or
    through syft's original handler and role lookup (the door's `__wrapped__`, i.e. the server
    without the door). Reported per call kind: median of all calls each way, their ratio (the
    headline), the median paired difference, and the medians of each repetition.

(2) The release ledger (`datasite_setup.disclosure`). A `radiomics_aggregates` result (the example
    MR parameter file: 56 features, each with a 10-bin histogram, plus a 40-bin voxel histogram and
    acquisition counts) is computed once per size (8 and 32 phantom cases) by the site task in this
    process, in the form the isolated child hands to the parent. It then goes through the site's
    own `site_execution.run_request` with the child replaced by that payload, so what is timed is
    the parent's side of a call: plan and parameter checks, the disclosure filters, the output
    contract, the ledger and the audit line. Variants, by the site's `[privacy] filters`:
      - no_filters: none (the output contract only);
      - filters: min_count, noise (a no-op without `dp`), histogram_bins; no ledger;
      - ledger_first: all filters and the ledger, the release new to an empty ledger (written);
      - ledger_repeat: the same release again (checked, nothing written);
      - ledger_first_grown: new to a ledger already holding the same release for `ledger_history`
        other data scientists (the whole file is read and rewritten).
    The ledger's cost is the median over rounds of (ledger variant - `filters`), the disclosure
    filters' cost likewise (`filters` - `no_filters`). The ledger's cost is set against today's whole call:
    the data scientist's `call_site_task` of the same approved request with the same parameters
    through the same datasite (site task in an isolated child forked from the server's zygote), median
    of `call_repetitions`. Ratio = (call + ledger cost) / call; the measured call already contains
    one ledger check (its ledger is on), so this slightly overstates the ledger's share. A `--quick`
    run skips the whole call and sets the ledger's cost against the in-process task time instead (a
    smaller denominator, so a stricter ratio) and says so.

Before the door's calls and before each whole call the benchmark waits until the site's zygote has
finished importing (their CPU use stops), so that they do not run beside what is timed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.quiet_machine import wait_until_idle
from benchmarks.radiomics_throughput import PARAMS, _phantom

TARGET_RATIO = 1.05
TASK = "radiomics_aggregates"
DS_WHO = "ds@uni.example"
FULL = {"door_calls_per_repetition": 30, "door_repetitions": 5, "sizes": (8, 32), "releases_per_repetition": 10,
        "release_repetitions": 5, "ledger_history": 100, "call_repetitions": 3, "fork_server": True,
        "idle_timeout_s": 120.0}
QUICK = {"door_calls_per_repetition": 10, "door_repetitions": 2, "sizes": (8,), "releases_per_repetition": 3,
         "release_repetitions": 2, "ledger_history": 10, "call_repetitions": 0, "fork_server": False,
         "idle_timeout_s": 20.0}
FEATURE_BINS = 10
INTENSITY_EDGES = [float(v) for v in np.linspace(0, 4000, 41)]
RELEASE_VARIANTS = ("no_filters", "filters", "ledger_first", "ledger_repeat", "ledger_first_grown")


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _median_ms(values: list[float]) -> float:
    return _ms(statistics.median(values))


def _my_children() -> list[Any]:
    """This process's children: the site's zygote and the runs it forks."""
    import psutil

    return psutil.Process().children(recursive=True)


def _interleaved(variants: dict[str, Callable[[], float]], per_repetition: int, repetitions: int) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Run every variant once per round, the order reversed every other round, so that the
    machine's load falls on all of them alike; each variant does its own untimed preparation and
    returns the seconds of its timed part. Returns the seconds per variant, round by round, and the
    medians of each repetition (`per_repetition` rounds)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    repetition_medians = []
    for rep in range(repetitions):
        for i in range(per_repetition):
            for name in (names if (rep * per_repetition + i) % 2 == 0 else reversed(names)):
                times[name].append(variants[name]())
        repetition_medians.append({"repetition": rep, **{f"{name}_median_ms": _median_ms(times[name][-per_repetition:])
                                                         for name in names}})
    return times, repetition_medians


def _paired_median_ms(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of (variant - baseline): within a round both ran under the same load."""
    return _median_ms([a - b for a, b in zip(times[name], times[baseline])])


# ---- (1) the door ------------------------------------------------------------------------------------


def _door_timings(datasite: Any, calls: dict[str, Callable[[], Any]], per_repetition: int, repetitions: int) -> dict[str, Any]:
    """Per call kind: the call through the door and through syft's own handler and role lookup,
    alternating call by call; medians over all calls, their ratio and the median paired difference."""
    from datasite_setup.connection import quiet_syft

    door = (datasite.handle_api_call_with_unsigned_result, datasite.get_role_for_credentials)
    handlers = {"door": door, "plain": (door[0].__wrapped__, door[1].__wrapped__)}

    def through(mode: str, call: Callable[[], Any]) -> Callable[[], float]:
        def timed() -> float:
            datasite.handle_api_call_with_unsigned_result, datasite.get_role_for_credentials = handlers[mode]
            started = time.perf_counter()
            call()
            return time.perf_counter() - started
        return timed

    kinds = {}
    try:
        for kind, call in calls.items():
            with quiet_syft():
                for _ in range(3):
                    call()
                times, repetition_medians = _interleaved({mode: through(mode, call) for mode in handlers},
                                                         per_repetition, repetitions)
            door_ms, plain_ms = _median_ms(times["door"]), _median_ms(times["plain"])
            kinds[kind] = {"door_ms": door_ms, "plain_ms": plain_ms, "ratio": round(door_ms / plain_ms, 3),
                           "paired_difference_ms": _paired_median_ms(times, "door", "plain"),
                           "repetitions": repetition_medians}
            print(f"  privacy_overhead door {kind}: door {door_ms:.2f} ms, plain {plain_ms:.2f} ms, "
                  f"ratio {door_ms / plain_ms:.3f}", file=sys.stderr, flush=True)
    finally:
        datasite.handle_api_call_with_unsigned_result, datasite.get_role_for_credentials = door
    return kinds


# ---- (2) the release ledger --------------------------------------------------------------------------


def _feature_edges(result: dict[str, Any]) -> dict[str, list[float]]:
    """FEATURE_BINS bins over mean +- 3 sd of each feature, as a data scientist would pick them from
    an earlier run's aggregates (features without spread get no histogram)."""
    edges = {}
    for name, group in result["features"].items():
        if group["var"] > 0:
            sd = float(np.sqrt(group["var"]))
            edges[name] = [float(v) for v in np.linspace(group["mean"] - 3 * sd, group["mean"] + 3 * sd, FEATURE_BINS + 1)]
    return edges


@contextlib.contextmanager
def _child_replaced_by(payloads: list[Any]) -> Iterator[None]:
    """`site_execution.run_request` with its isolated run replaced by a payload that run returned
    (one fresh copy per call: the filters work in place), so only the parent's side is timed."""
    from datasite_setup import site_execution
    from datasite_setup.isolation.outcome import IsolatedOutcome

    def replay(*args: Any, **kwargs: Any) -> IsolatedOutcome:
        return IsolatedOutcome(ok=True, result=payloads.pop(), failure=None, stdout="", seconds=0.0)

    real = site_execution.run_isolated
    site_execution.run_isolated = replay
    try:
        yield
    finally:
        site_execution.run_isolated = real


def _release_timings(site_config: Any, work: Path, cases: list[dict[str, Any]], params: dict[str, Any], blob: bytes,
                     plan: dict[str, Any]) -> dict[str, Any]:
    """The parent's side of one call per variant (RELEASE_VARIANTS), interleaved call by call; the
    ledger's cost as the median paired difference to `filters`; the ledger files' sizes."""
    from analyses.site_requests import thin_function
    from datasite_setup.disclosure import FILTERS
    from datasite_setup.disclosure.ledger import LEDGER_FILE
    from datasite_setup.site_execution import run_request

    code = SimpleNamespace(raw_code=inspect.getsource(thin_function(TASK, "bench")), id=None)  # a syft UserCode's fields run_request reads
    without_ledger = tuple(f for f in FILTERS if f != "release_ledger")
    filters = {"no_filters": (), "filters": without_ledger, "ledger_first": FILTERS, "ledger_repeat": FILTERS,
               "ledger_first_grown": FILTERS}
    configs = {name: replace(site_config, data_dir=work / name, privacy=replace(site_config.privacy, filters=chosen))
               for name, chosen in filters.items()}
    ledger = {name: config.data_dir / LEDGER_FILE for name, config in configs.items()}
    payloads: list[Any] = []

    def release(config: Any, who: str = DS_WHO) -> float:
        payloads.append(pickle.loads(blob))
        started = time.perf_counter()
        run_request(config, code, {"cases": cases, "params": params}, who)
        return time.perf_counter() - started

    def variant(name: str) -> Callable[[], float]:
        def timed() -> float:
            if name == "ledger_first":
                ledger[name].unlink()
            elif name == "ledger_first_grown":
                ledger[name].write_bytes(grown)
            return release(configs[name])
        return timed

    with _child_replaced_by(payloads):
        for name, config in configs.items():  # creates each data dir, salt and audit log; records the repeat
            release(config)
        for i in range(plan["ledger_history"]):
            release(configs["ledger_first_grown"], who=f"other-{i:03d}@uni.example")
        grown = ledger["ledger_first_grown"].read_bytes()
        times, repetition_medians = _interleaved({name: variant(name) for name in RELEASE_VARIANTS},
                                                 plan["releases_per_repetition"], plan["release_repetitions"])
    with_ledger = ("ledger_first", "ledger_repeat", "ledger_first_grown")
    return {
        "medians_ms": {name: _median_ms(values) for name, values in times.items()},
        "ledger_ms": {name: _paired_median_ms(times, name, "filters") for name in with_ledger},
        "filters_ms": _paired_median_ms(times, "filters", "no_filters"),
        "ledger_kb": {name: round(ledger[name].stat().st_size / 1024, 1) for name in with_ledger},
        "grown_ledger_kb": round(len(grown) / 1024, 1),
        "repetitions": repetition_medians,
    }


# ---- the run -----------------------------------------------------------------------------------------


def _site(work: Path, plan: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(config, datasite, admin client, data scientist client) of a datasite built in this process."""
    from datasite_setup.accounts import provision_accounts
    from datasite_setup.connection import quiet_syft
    from datasite_setup.credentials import admin_password, data_scientist_password
    from datasite_setup.loopback_site import free_port, write_site_config
    from datasite_setup.server import build_datasite
    from datasite_setup.site_config import PrivacySettings, load_site_config

    path = write_site_config(work, "bench-privacy", free_port(), min_cohort=PrivacySettings().min_cohort,
                             ds_email=DS_WHO, extra=f"[execution]\nfork_server = {str(plan['fork_server']).lower()}\n")
    config = load_site_config(path)
    with quiet_syft():
        datasite = build_datasite(config)
        admin = datasite.get_guest_client(verbose=False).login(email=config.admin_email, password=admin_password(config))
        provision_accounts(config, admin)
        ds = datasite.get_guest_client(verbose=False).login(email=DS_WHO, password=data_scientist_password(config, DS_WHO))
    return config, datasite, admin, ds


def _upload(admin: Any, name: str, cases: list[dict[str, Any]]) -> None:
    import syft as sy

    from datasite_setup.connection import quiet_syft
    from datasite_setup.upload import ASSET_NAME, DEFAULT_DOMAIN
    from domains import get_domain

    dataset = sy.Dataset(name=name, description=f"{len(cases)} phantom cases")
    dataset.add_asset(sy.Asset(name=ASSET_NAME, data=cases, mock=get_domain(DEFAULT_DOMAIN).mock_cases(cases)))
    with quiet_syft():
        outcome = admin.upload_dataset(dataset)
    if isinstance(outcome, sy.SyftError):
        raise RuntimeError(f"upload of {name} failed: {outcome.message}")


def _whole_calls(config: Any, admin: Any, ds: Any, params_by_size: dict[int, dict[str, Any]], plan: dict[str, Any]) -> dict[int, list[float]]:
    """Seconds of the data scientist's `call_site_task` per size, after the request was approved."""
    from analyses.site_requests import call_site_task, request_site_task
    from datasite_setup import review
    from datasite_setup.connection import quiet_syft

    assets = {n: next(d for d in ds.datasets.get_all() if d.name == f"bench-{n}").assets[0] for n in params_by_size}
    for n, asset in assets.items():
        request_site_task(ds, asset, TASK, f"bench{n}", max_runs=plan["call_repetitions"])
    for request in review.list_requests(config, admin, status="pending"):
        review.approve(config, admin, request.id)
    seconds: dict[int, list[float]] = {n: [] for n in params_by_size}
    for rep in range(plan["call_repetitions"]):
        for n in (params_by_size if rep % 2 == 0 else reversed(list(params_by_size))):
            wait_until_idle(_my_children, plan["idle_timeout_s"])
            with quiet_syft():
                started = time.perf_counter()
                result = call_site_task(ds, assets[n], TASK, f"bench{n}", params_by_size[n])
                seconds[n].append(time.perf_counter() - started)
            if result["n"] != n:
                raise RuntimeError(f"the {n}-case call used {result['n']} cases")
            print(f"  privacy_overhead whole call, {n} cases: {seconds[n][-1]:.2f} s", file=sys.stderr, flush=True)
    return seconds


def run(quick: bool) -> dict[str, Any]:
    import radiomics
    from syft.service.action.action_object import ActionObject

    from analyses.commands.radiomics import read_params
    from datasite_setup.credentials import pseudonym_key
    from datasite_setup.ingest import read_cases
    from datasite_setup.isolation import stop_fork_servers
    from datasite_setup.site_tasks import run_for_parent

    plan = QUICK if quick else FULL
    radiomics.logger.setLevel(logging.ERROR)  # the task also runs in this process, where pyradiomics would log every case
    settings, _ = read_params(PARAMS)
    exports = {n: _phantom(n) for n in plan["sizes"]}
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-privacy-"))
    datasite = None
    try:
        config, datasite, admin, ds = _site(work / "site", plan)
        cases = {n: read_cases(export, None, pseudonym_key(config), progress=False).cases for n, export in exports.items()}
        for n, site_cases in cases.items():
            _upload(admin, f"bench-{n}", site_cases)
        own = ActionObject.from_obj({"lr": 1e-3}).send(ds)
        calls = {
            "user.get_current_user": lambda: ds.api.services.user.get_current_user(),
            "dataset.get_all": lambda: ds.api.services.dataset.get_all(),
            "action.get (own object)": lambda: ds.api.services.action.get(own.id),
            "action.set (small object)": lambda: ActionObject.from_obj({"a": 1}).send(ds),
        }
        waited = {"before_door_s": wait_until_idle(_my_children, plan["idle_timeout_s"])}
        door = _door_timings(datasite, calls, plan["door_calls_per_repetition"], plan["door_repetitions"])

        first_run = run_for_parent(TASK, cases[max(cases)], {"settings": settings}, config.privacy.min_cohort,
                                   config.privacy.min_batch)  # also pays this process's pyradiomics warm-up
        edges = _feature_edges(first_run["result"])
        params = {"settings": settings, "intensity_edges": INTENSITY_EDGES, "feature_edges": edges}
        releases = {}
        for n, site_cases in cases.items():
            started = time.perf_counter()
            payload = run_for_parent(TASK, site_cases, params, config.privacy.min_cohort, config.privacy.min_batch)
            task_s = time.perf_counter() - started
            blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            releases[n] = {"in_process_task_s": round(task_s, 3), "payload_kb": round(len(blob) / 1024, 1),
                           "features": len(payload["result"]["features"]), "cohorts": len(payload["cohorts"]),
                           **_release_timings(config, work / f"releases-{n}", site_cases, params, blob, plan)}
            print(f"  privacy_overhead release, {n} cases: {releases[n]['medians_ms']} ms; task in-process {task_s:.2f} s",
                  file=sys.stderr, flush=True)

        if plan["call_repetitions"]:
            seconds = _whole_calls(config, admin, ds, {n: params for n in cases}, plan)
            for n, values in seconds.items():
                releases[n]["whole_call_s"] = [round(v, 3) for v in values]
                releases[n]["whole_call_median_s"] = round(statistics.median(values), 3)
    finally:
        if datasite is not None:
            datasite.stop()
        stop_fork_servers()
        shutil.rmtree(work, ignore_errors=True)

    call_kind = "whole_call_median_s" if plan["call_repetitions"] else "in_process_task_s"
    for row in releases.values():
        call_ms = row[call_kind] * 1e3
        row["call_for_ratio"] = call_kind
        row["ratio"] = {name: round((call_ms + extra) / call_ms, 4) for name, extra in row["ledger_ms"].items()}
    door_worst_kind = max(door, key=lambda kind: door[kind]["ratio"])
    door_worst = door[door_worst_kind]
    ledger_worst = max(max(row["ratio"].values()) for row in releases.values())
    door_text = ", ".join(f"{kind} {value['ratio']:.2f}" for kind, value in door.items())
    ledger_text = "; ".join(
        f"{n} cases: first {row['ledger_ms']['ledger_first']:+.1f} ms, repeat {row['ledger_ms']['ledger_repeat']:+.1f} ms, "
        f"first into a {row['grown_ledger_kb']:.0f} kB ledger {row['ledger_ms']['ledger_first_grown']:+.1f} ms "
        f"vs {row[call_kind]:.2f} s" for n, row in releases.items())
    against = "the whole radiomics call" if plan["call_repetitions"] else "the in-process task time (no whole call in --quick)"
    verdict = "meet" if door_worst["ratio"] <= TARGET_RATIO and ledger_worst <= TARGET_RATIO else "miss"
    summary = (f"door/plain per call: {door_text}; ledger {ledger_text} ({against}); worst ratios door "
               f"{door_worst['ratio']:.3f}, ledger {ledger_worst:.4f} ({verdict} the {TARGET_RATIO} target)")
    return {
        "parameters": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
            "target_ratio": TARGET_RATIO,
            "task": TASK,
            "settings": str(PARAMS.relative_to(PARAMS.parents[2])),
            "feature_bins": FEATURE_BINS,
            "intensity_edges": f"{len(INTENSITY_EDGES) - 1} bins over [0, 4000]",
            "min_cohort": config.privacy.min_cohort,
            "phantom": {"profile": "hospital-a", "tumour_prevalence": 1.0, "cached_as": "radiomics_throughput"},
            "door": "in-process datasite, no HTTP; 'plain' is syft's handler and role lookup without the door",
            "release": "site_execution.run_request with the isolated run replaced by the task's payload",
            "call_for_ratio": against,
        },
        "waited_for_idle_children_s": waited,
        "door": door,
        "release": releases,
        "door_worst": {"call": door_worst_kind, "ratio": door_worst["ratio"]},
        "ledger_worst_ratio": ledger_worst,
        "summary": summary,
    }
