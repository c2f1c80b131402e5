"""Whether a site stays as fast and as small when it holds 4, 32 or 256 cases.

Ingestion streams cases into the on-disk case store and the syft asset is only the manifest, so
nothing a site does per call, and nothing its server holds, should grow with the number of cases
it stores. This benchmark checks that claim at three sizes of the same phantom export (hospital-a
scanner profile at 128 x 128 x 32 voxels, every case with a lesion; case i is the same case at
every size):

1. ingestion: `python -m datasite_setup ingest` as a subprocess, its wall time (cases/s, also the
   marginal rate between sizes, which leaves out the CLI's start-up, login and upload) and its peak
   resident memory (`os.wait4`'s rusage of that one child), which should be bounded by one series
   and not grow with the number of cases;
2. the server's resident memory (the server process alone, from the pid `up` records in the data
   dir; its sandbox zygote separately) after ingestion and after the calls;
3. the time of one trivial site-task call as the data scientist sees it: `cohort_summary` grouped
   by Manufacturer through an approved thin request, several calls after a warm-up, median.

One datasite per size, all three up at once, so that the calls of the three sizes alternate (4, 32,
256, then 256, 32, 4, ...) under the same machine load; before each timed call the benchmark waits
until every site's server and its zygote are idle (the zygote imports torch and pyradiomics once
at start, which would otherwise run beside the first calls on this 2-core machine).

`cohort_summary` reads every case's image and mask (memory-mapped), so its own compute does grow
with the cases; to tell that apart from the per-call overhead, the same task runs in this process
over the same `CaseSource` at each size (`in_process_task_s`), and the call's remainder is reported.
Targets: call time largest / smallest <= 1.2, judged both on the whole call and on the call beyond
the task's own compute (what a call costs for being a call: the data plane's part, which the
issue's baseline of 7.7 s -> 58.6 s against a task of 0.37 s -> 2.5 s was about); memory largest /
smallest <= 1.1 (server RSS, ingestion peak RSS).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import CACHE, REPO, stop_site, timed_up
from benchmarks.phantom_exports import cached_export
from benchmarks.quiet_machine import wait_until_idle, with_children

TASK = "cohort_summary"
PARAMS = {"group_by": "Manufacturer"}
PROFILE = "hospital-a"
MATRIX = 128
N_SLICES = 32
SEED = 14
TARGET_CALL_RATIO = 1.2
TARGET_MEMORY_RATIO = 1.1
FULL = {"sizes": (4, 32, 256), "warmup_calls": 2, "calls": 7, "idle_timeout_s": 120.0}
QUICK = {"sizes": (2, 4), "warmup_calls": 1, "calls": 2, "idle_timeout_s": 60.0}
DS_WHO = "ds@uni.example"


def phantom(n_cases: int) -> Path:
    """A cached hospital-a export of `n_cases` cases at MATRIX x MATRIX x N_SLICES, each with a lesion."""
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    from benchmarks.ingestion_throughput import _code_version

    profile = replace(PROFILES[PROFILE].with_size(matrix=MATRIX, n_slices=N_SLICES), tumour_prevalence=1.0)
    return cached_export(f"growth-{PROFILE}-m{MATRIX}-z{N_SLICES}-{n_cases}cases-{_code_version()}", profile, n_cases, SEED)


def series_mb() -> float:
    """The size of one ingested case in memory: float32 image plus uint8 mask."""
    return round(N_SLICES * MATRIX * MATRIX * (4 + 1) / 2**20, 2)


def ratio(values: dict[int, float]) -> float:
    """Largest size's value over the smallest size's."""
    return round(values[max(values)] / values[min(values)], 3)


# Runs argv[2:] as its own child and writes that child's peak RSS (KiB) to the file argv[1].
_PEAK_RSS_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_with_peak_rss(argv: list[str]) -> tuple[int, float, float, str]:
    """Run `argv`; (exit code, wall seconds, peak RSS in MiB of exactly that program, stderr tail).

    The kernel keeps a process's peak RSS across exec, and a child forked from this process starts
    from this process's memory: measured directly, a small program run from a big benchmark process
    would report the benchmark's size. So a small launcher forks the program and reports its peak.
    """
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as peak:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_LAUNCHER, peak.name, *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        _, stderr = proc.communicate()
        text = Path(peak.name).read_text().strip()
    peak_mb = int(text) / 1024 if text else float("nan")
    return proc.returncode, time.perf_counter() - started, peak_mb, stderr[-3000:].decode(errors="replace")


def ingest_with_peak_rss(config_path: Path, export: Path, dataset: str) -> dict[str, Any]:
    """`datasite-setup ingest` as a subprocess: its wall time, its own peak RSS and its report."""
    report_path = config_path.with_name(f"{dataset}-report.json")
    code, wall, peak_mb, stderr = run_with_peak_rss(
        [sys.executable, "-m", "datasite_setup", "ingest", str(config_path), str(export), "--dataset", dataset,
         "--report", str(report_path), "--json"])
    if code != 0:
        raise RuntimeError(f"ingest of {export.name} exited {code}: {stderr}")
    report = json.loads(report_path.read_text())
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb, 1),
            "accepted": len(report["accepted"]), "rejected": len(report["rejected"]), "added": report["added"],
            "manifest_version": report["manifest_version"]}


def server_pid(config: Any) -> int:
    return int((config.data_dir / "server.pid").read_text().strip())


def server_memory(config: Any) -> dict[str, Any]:
    """RSS (MiB) of the server process alone, and of its children (the sandbox zygote) apart."""
    import psutil

    server = psutil.Process(server_pid(config))
    children_rss = 0
    children = server.children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            children_rss += child.memory_info().rss
    return {"server_rss_mb": round(server.memory_info().rss / 2**20, 1),
            "children_rss_mb": round(children_rss / 2**20, 1), "n_children": len(children)}


@contextlib.contextmanager
def live_sites(work: Path, sizes: tuple[int, ...]) -> Iterator[dict[int, tuple[Path, dict[str, float]]]]:
    """One running datasite per size (free loopback ports), all stopped on exit whatever happened."""
    from datasite_setup.loopback_site import free_port, write_site_config

    started: dict[int, tuple[Path, dict[str, float]]] = {}
    try:
        for n in sizes:
            config_path = write_site_config(work / f"site-{n}", f"bench-growth-{n}", free_port(), ds_email=DS_WHO)
            started[n] = (config_path, {})  # listed before `up`, so a start that fails half-way is stopped too
            started[n] = (config_path, timed_up(config_path))
            print(f"  data_growth: site for {n} cases up in {started[n][1]['first_answer_s']:.1f} s", file=sys.stderr, flush=True)
        yield started
    finally:
        for config_path, _ in started.values():
            stop_site(config_path)


def in_process_task_s(config: Any, manifest: list[dict[str, Any]], repetitions: int) -> float:
    """Median seconds of the task itself over the site's `CaseSource`, in this process (page cache warm)."""
    from datasite_setup.case_store import STORE_DIR, CaseSource
    from datasite_setup.site_tasks import run_for_parent

    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        payload = run_for_parent(TASK, CaseSource(config.data_dir / STORE_DIR, manifest), dict(PARAMS),
                                 config.privacy.min_cohort, config.privacy.min_batch)
        times.append(time.perf_counter() - started)
        if "refused" in payload:
            raise RuntimeError(f"{TASK} refused in process: {payload['refused']}")
    return statistics.median(times)


def run(quick: bool) -> dict[str, Any]:
    from analyses.site_requests import call_site_task, request_site_task
    from datasite_setup import review
    from datasite_setup.case_store import STORE_DIR, cases_of_manifest
    from datasite_setup.connection import admin_client, login, quiet_syft
    from datasite_setup.credentials import data_scientist_password
    from datasite_setup.site_config import load_site_config

    plan = QUICK if quick else FULL
    sizes = tuple(plan["sizes"])
    exports = {}
    for n in sizes:
        print(f"  data_growth: phantom export of {n} cases (cached in {CACHE.name}/)", file=sys.stderr, flush=True)
        exports[n] = phantom(n)
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-growth-"))
    per_size: dict[int, dict[str, Any]] = {n: {"cases": n} for n in sizes}
    try:
        with live_sites(work, sizes) as sites:
            configs = {n: load_site_config(path) for n, (path, _) in sites.items()}
            pids = [server_pid(config) for config in configs.values()]
            for n in sizes:
                per_size[n]["up"] = sites[n][1]
                wait_until_idle(with_children(pids), plan["idle_timeout_s"])
                per_size[n]["memory_after_up"] = server_memory(configs[n])
            for n in sizes:  # one after the other, so each ingestion has the machine to itself
                wait_until_idle(with_children(pids), plan["idle_timeout_s"])
                print(f"  data_growth: ingesting {n} cases", file=sys.stderr, flush=True)
                ingestion = ingest_with_peak_rss(sites[n][0], exports[n], f"growth-{n}")
                if ingestion["accepted"] != n or ingestion["rejected"]:
                    raise RuntimeError(f"ingestion of {n} cases accepted {ingestion['accepted']}, rejected {ingestion['rejected']}")
                ingestion["cases_per_s"] = round(n / ingestion["wall_s"], 3)
                per_size[n]["ingestion"] = ingestion
                print(f"  data_growth: {n} cases ingested in {ingestion['wall_s']:.1f} s, peak RSS "
                      f"{ingestion['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
            for n in sizes:
                wait_until_idle(with_children(pids), plan["idle_timeout_s"])
                per_size[n]["memory_after_ingest"] = server_memory(configs[n])

            clients, assets, manifests = {}, {}, {}
            for n, config in configs.items():
                with quiet_syft():
                    ds = login(config.url, DS_WHO, data_scientist_password(config, DS_WHO))
                    assets[n] = next(d for d in ds.datasets.get_all() if d.name == f"growth-{n}").assets[0]
                    request_site_task(ds, assets[n], TASK, f"growth{n}", max_runs=plan["warmup_calls"] + plan["calls"])
                    admin = admin_client(config)
                    for request in review.list_requests(config, admin, status="pending"):
                        review.approve(config, admin, request.id)
                    manifests[n] = cases_of_manifest(
                        config.data_dir / STORE_DIR, next(d for d in admin.datasets.get_all() if d.name == f"growth-{n}").assets[0].data)[0].entries
                clients[n] = ds

            def call(n: int) -> float:
                with quiet_syft():
                    started = time.perf_counter()
                    result = call_site_task(clients[n], assets[n], TASK, f"growth{n}", dict(PARAMS))
                    seconds = time.perf_counter() - started
                if sum(group["n"] for group in result.values()) != n:
                    raise RuntimeError(f"the {n}-case site's {TASK} covered {result} cases")
                return seconds

            calls: dict[int, list[float]] = {n: [] for n in sizes}
            waited: list[float] = []
            for rounds, record in ((plan["warmup_calls"], False), (plan["calls"], True)):
                for i in range(rounds):
                    for n in (sizes if i % 2 == 0 else tuple(reversed(sizes))):
                        waited.append(wait_until_idle(with_children(pids), plan["idle_timeout_s"]))
                        seconds = call(n)
                        if record:
                            calls[n].append(seconds)
                if record:
                    print("  data_growth: calls " + ", ".join(f"{n} cases {statistics.median(v):.2f} s"
                                                              for n, v in calls.items()), file=sys.stderr, flush=True)
            for n in sizes:
                wait_until_idle(with_children(pids), plan["idle_timeout_s"])
                per_size[n]["memory_after_calls"] = server_memory(configs[n])
            for n in sizes:
                task_s = in_process_task_s(configs[n], manifests[n], plan["calls"])
                median = statistics.median(calls[n])
                per_size[n].update(call_s=[round(v, 3) for v in calls[n]], call_median_s=round(median, 3),
                                   in_process_task_s=round(task_s, 3), call_minus_task_s=round(median - task_s, 3))
                store = configs[n].data_dir / "case_store"
                per_size[n]["case_store_mb"] = round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def column(*keys: str) -> dict[int, float]:
        values = {}
        for n in sizes:
            value: Any = per_size[n]
            for key in keys:
                value = value[key]
            values[n] = value
        return values

    call_median = column("call_median_s")
    ratios = {
        "call": ratio(call_median),
        "call_minus_task": ratio(column("call_minus_task_s")),
        "in_process_task": ratio(column("in_process_task_s")),
        "server_rss_after_ingest": ratio(column("memory_after_ingest", "server_rss_mb")),
        "server_rss_after_calls": ratio(column("memory_after_calls", "server_rss_mb")),
        "ingest_peak_rss": ratio(column("ingestion", "peak_rss_mb")),
    }
    big, small = max(sizes), min(sizes)
    ingest_wall = column("ingestion", "wall_s")
    marginal = {f"{a}->{b}": round((b - a) / (ingest_wall[b] - ingest_wall[a]), 3) for a, b in zip(sizes, sizes[1:])}
    peak = column("ingestion", "peak_rss_mb")
    ingest_peak_growth_mb = round(peak[big] - peak[small], 1)
    meets = {
        "call": ratios["call"] <= TARGET_CALL_RATIO,
        "call_beyond_the_task": ratios["call_minus_task"] <= TARGET_CALL_RATIO,
        "server_rss": max(ratios["server_rss_after_ingest"], ratios["server_rss_after_calls"]) <= TARGET_MEMORY_RATIO,
        "ingest_peak_rss": ratios["ingest_peak_rss"] <= TARGET_MEMORY_RATIO,
    }
    table = ["cases  call s  task s  server MiB (ingest/calls)  ingest peak MiB  ingest cases/s"]
    for n in sizes:
        row = per_size[n]
        table.append(f"{n:>5}  {row['call_median_s']:6.2f}  {row['in_process_task_s']:6.2f}  "
                     f"{row['memory_after_ingest']['server_rss_mb']:8.0f} / {row['memory_after_calls']['server_rss_mb']:<8.0f}     "
                     f"{row['ingestion']['peak_rss_mb']:8.0f}        {row['ingestion']['cases_per_s']:6.2f}")
    print("\n".join("  " + line for line in table), file=sys.stderr, flush=True)
    summary = (f"{small} -> {big} cases: {TASK} call {call_median[small]:.2f} -> {call_median[big]:.2f} s, "
               f"ratio {ratios['call']:.2f} ({'meets' if meets['call'] else 'misses'} <= {TARGET_CALL_RATIO}; "
               f"in-process task {ratios['in_process_task']:.2f}x; call minus task {ratios['call_minus_task']:.2f}x: "
               f"{'meets' if meets['call_beyond_the_task'] else 'misses'}); "
               f"server RSS after calls {ratios['server_rss_after_calls']:.2f}x, ingest peak RSS "
               f"{ratios['ingest_peak_rss']:.2f}x ({ingest_peak_growth_mb:+.0f} MiB, one case {series_mb():.1f} MiB; {'meet' if meets['server_rss'] and meets['ingest_peak_rss'] else 'miss'} "
               f"<= {TARGET_MEMORY_RATIO}); ingestion {per_size[big]['ingestion']['cases_per_s']:.2f} cases/s at {big} "
               f"(marginal {marginal[f'{sizes[-2]}->{big}']:.2f})")
    return {
        "parameters": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
            "phantom": {"profile": PROFILE, "shape_zyx": [N_SLICES, MATRIX, MATRIX], "tumour_prevalence": 1.0,
                        "mask_format": "rtstruct", "seed": SEED, "one_case_in_memory_mb": series_mb()},
            "task": TASK, "params": PARAMS,
            "sites": "one datasite per size, all up together (default fork server); calls alternate between sizes",
            "call": "wall time of the data scientist's call_site_task of an approved request, after the sites' idle",
            "in_process_task": "run_for_parent over the site's CaseSource in the benchmark process",
            "server_memory": "RSS of the server process from data_dir/server.pid; its sandbox zygote apart",
            "ingest_peak_rss": "ru_maxrss of the `datasite_setup ingest` program alone (forked by a small launcher, os.wait4)",
            "targets": {"call_ratio_max": TARGET_CALL_RATIO, "memory_ratio_max": TARGET_MEMORY_RATIO},
        },
        "per_size": [per_size[n] for n in sizes],
        "ingestion_marginal_cases_per_s": marginal,
        "seconds_waited_for_idle_sites": {"median": round(statistics.median(waited), 2), "max": max(waited)},
        "ratios_largest_over_smallest": ratios,
        "ingest_peak_rss_growth_mb": ingest_peak_growth_mb,
        "ingest_peak_rss_growth_in_cases": round(ingest_peak_growth_mb / series_mb(), 2),
        "meets_target": meets,
        "table": table,
        "summary": summary,
    }
