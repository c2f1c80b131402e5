"""Radiomics through a live datasite versus pyradiomics run directly on the same cases.

Phantom cases (hospital-a scanner profile, 24 x 64 x 64, every case with a lesion) at 2, 8, 32,
128 and 512 cases are ingested into one live datasite with `upload.ingest_to_datasite`, one dataset per size:
each case is written once to the site's case store and the dataset's private asset is the
manifest (no pixels). With the example parameter file `analyses/radiomics_params/mr_default.yaml`
(shape, first order, GLCM; 1 mm in-plane resampling):

(a) remote: the data scientist's `call_site_task` call of an approved `radiomics_aggregates`
    request, timed around the call: HTTP, syft loading the manifest asset, the isolated child
    (hand-over of the lazy `CaseSource`), reading each case from the case store, pyradiomics on
    every case, aggregation, the output contract, disclosure control and the result's way back;
(b) direct: one pyradiomics extractor over the same cases in this process, one after the other,
    reading them from the same case store (`CaseSource(data_dir / "case_store", manifest)`, the
    manifest being the admin's view of the asset), so both sides see identical arrays;
(c) task in process (for the breakdown, not the target): the site task itself
    (`site_tasks.run_for_parent`) over the same `CaseSource`, i.e. (a) without syft, HTTP and the
    child: (a) - (c) is the remote path's own cost, (c) - (b) the task's aggregation.

Alternating (a b c, c b a, ...) per size; each remote call follows an untimed pause (a site between
requests, whose zygote has finished its imports). Reported: cases/s both ways and the ratio remote
/ direct throughput per size, and the remote path's cost beyond the task, which a call pays
whatever its size (~0.15 s on the 2-core dev VM: syft's handling of `code.call` with its policy
checks and result store, ~0.06 s; the client's four other round trips per call, uploading the
parameters and fetching the result, ~0.04 s; the isolated child's start and hand-over, ~0.05 s).
Throughput is a rate over a cohort, so the target (>= 0.95) is judged at the largest size, 512
cases (collections in the field hold 1,000-1,600 patients), where that per-call cost is ~1 %; the
smaller sizes show how a small site's calls are dominated by it (at 128 cases it is ~3.5 %).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import live_site
from benchmarks.phantom_exports import cached_export

TARGET_RATIO = 0.95
FULL = {"sizes": (2, 8, 32, 128, 512), "repetitions": 5, "pause_s": 5.0}
QUICK = {"sizes": (2, 4), "repetitions": 1, "pause_s": 0.5}
PARAMS = Path(__file__).resolve().parents[1] / "analyses" / "radiomics_params" / "mr_default.yaml"


def _phantom(n_cases: int) -> Path:
    """A cached hospital-a export of `n_cases` cases, each with a lesion."""
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    return cached_export(f"radiomics-phantom-hospital-a-{n_cases}cases", replace(PROFILES["hospital-a"], tumour_prevalence=1.0),
                         n_cases, 21)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(quick: bool) -> dict[str, Any]:
    import radiomics

    from analyses.commands.radiomics import read_params
    from analyses.site_requests import call_site_task, request_site_task
    from datasite_setup import audit_log, review
    from datasite_setup.case_store import STORE_DIR, CaseSource, cases_of_manifest
    from datasite_setup.connection import admin_client, login, quiet_syft
    from datasite_setup.credentials import data_scientist_password
    from datasite_setup.site_config import load_site_config
    from datasite_setup.site_tasks import run_for_parent
    from datasite_setup.site_tasks.radiomics_aggregates import extract, feature_extractor
    from datasite_setup.upload import ingest_to_datasite

    plan = QUICK if quick else FULL
    radiomics.logger.setLevel(logging.ERROR)  # the task also runs in this process, where pyradiomics would log every case
    settings, _ = read_params(PARAMS)
    exports = {n: _phantom(n) for n in plan["sizes"]}
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-radiomics-"))
    rows = []
    try:
        with live_site(work, "bench-radiomics") as (config_path, _):
            config = load_site_config(config_path)
            ingestion_s = {}
            for n, export in exports.items():
                started = time.perf_counter()
                report = ingest_to_datasite(config, export, dataset_name=f"bench-{n}", progress=False)
                ingestion_s[n] = round(time.perf_counter() - started, 2)
                if len(report["accepted"]) != n or report["rejected"]:
                    raise RuntimeError(f"ingestion of {export.name}: {len(report['accepted'])} accepted, "
                                       f"{len(report['rejected'])} rejected")
                print(f"  radiomics_throughput: {n} cases ingested into the case store in {ingestion_s[n]:.1f} s",
                      file=sys.stderr, flush=True)
            with quiet_syft():
                ds = login(config.url, "ds@uni.example", data_scientist_password(config, "ds@uni.example"))
                assets = {n: next(d for d in ds.datasets.get_all() if d.name == f"bench-{n}").assets[0] for n in exports}
                for n, asset in assets.items():
                    request_site_task(ds, asset, "radiomics_aggregates", f"bench{n}", max_runs=plan["repetitions"] + 1)
                admin = admin_client(config)
                for request in review.list_requests(config, admin, status="pending"):
                    review.approve(config, admin, request.id)
                manifests = {n: cases_of_manifest(config.data_dir / STORE_DIR,
                                                  next(d for d in admin.datasets.get_all() if d.name == f"bench-{n}").assets[0].data)[0].entries
                             for n in exports}

            for n, asset in assets.items():
                cases = CaseSource(config.data_dir / STORE_DIR, manifests[n])
                remote: list[float] = []
                isolated: list[float] = []
                direct: list[float] = []
                task: list[float] = []

                def time_remote() -> None:
                    time.sleep(plan["pause_s"])  # a site between requests
                    with quiet_syft():
                        started = time.perf_counter()
                        result = call_site_task(ds, asset, "radiomics_aggregates", f"bench{n}", {"settings": settings})
                        remote.append(time.perf_counter() - started)
                    isolated.append(next(e["seconds"] for e in reversed(audit_log.read(config.data_dir)) if e.get("action") == "ran"))
                    if result["n"] != n:
                        raise RuntimeError(f"the remote run used {result['n']} of {n} cases")

                def time_direct() -> None:
                    started = time.perf_counter()
                    extractor = feature_extractor(settings)
                    for case in cases:
                        extract(extractor, case)
                    direct.append(time.perf_counter() - started)

                def time_task() -> None:
                    started = time.perf_counter()
                    payload = run_for_parent("radiomics_aggregates", cases, {"settings": settings},
                                             config.privacy.min_cohort, config.privacy.min_batch)
                    task.append(time.perf_counter() - started)
                    if payload.get("result", {}).get("n") != n:
                        raise RuntimeError(f"the in-process task declined or used other cases: {payload.get('refused')}")

                for rep in range(plan["repetitions"]):
                    steps = (time_remote, time_direct, time_task)
                    for step in (steps if rep % 2 == 0 else reversed(steps)):
                        step()
                row = {
                    "cases": n,
                    "ingestion_s": ingestion_s[n],
                    "remote_s": [round(v, 3) for v in remote],
                    "site_isolated_run_s": isolated,
                    "direct_s": [round(v, 3) for v in direct],
                    "task_in_process_s": [round(v, 3) for v in task],
                    "remote_cases_per_s": round(n / statistics.median(remote), 3),
                    "direct_cases_per_s": round(n / statistics.median(direct), 3),
                    "remote_path_cost_s": round(statistics.median(remote) - statistics.median(task), 3),
                    "syft_and_http_s": round(statistics.median(r - i for r, i in zip(remote, isolated)), 3),
                    "task_aggregation_cost_s": round(statistics.median(task) - statistics.median(direct), 3),
                }
                row["ratio"] = round(row["remote_cases_per_s"] / row["direct_cases_per_s"], 3)
                rows.append(row)
                print(f"  radiomics_throughput {n} cases: remote {_median(remote):.2f} s, direct {_median(direct):.2f} s, "
                      f"task in process {_median(task):.2f} s, ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = ", ".join(f"{r['cases']} cases {r['ratio']:.2f}" for r in rows)
    last = rows[-1]
    meets = last["ratio"] >= TARGET_RATIO
    per_call = statistics.median(r["remote_path_cost_s"] for r in rows)
    summary = (f"remote/direct radiomics throughput {ratios} (target >= {TARGET_RATIO} at {last['cases']} cases: "
               f"{'met' if meets else 'not met'}); direct {last['direct_cases_per_s']:.2f} cases/s, remote "
               f"{last['remote_cases_per_s']:.2f} cases/s at {last['cases']} cases; a call's remote path costs "
               f"{per_call:.2f} s beyond the task in process whatever its size (median over sizes of the medians of "
               f"{plan['repetitions']})")
    return {
        "parameters": {
            "sizes": list(plan["sizes"]),
            "repetitions": plan["repetitions"],
            "pause_before_remote_s": plan["pause_s"],
            "phantom": {"profile": "hospital-a", "shape_zyx": [24, 64, 64], "tumour_prevalence": 1.0},
            "settings": str(PARAMS.relative_to(PARAMS.parents[2])),
            "ingestion": "upload.ingest_to_datasite: case store + manifest asset, one dataset per size",
            "remote": "wall time of the data scientist's call_site_task call (one live datasite, isolated child)",
            "direct": "one pyradiomics extractor over the same cases (CaseSource over the site's case store and "
                      "the admin's manifest) in the benchmark process, sequentially",
            "task_in_process": "site_tasks.run_for_parent('radiomics_aggregates') over the same CaseSource here",
            "site_isolated_run": "seconds of the isolated run at the site, from the audit line of each remote call (the rest of remote is syft and HTTP)",
        },
        "raw": rows,
        "target_ratio": TARGET_RATIO,
        "target_judged_at_cases": last["cases"],
        "meets_target": meets,
        "remote_path_cost_per_call_s": round(per_call, 3),
        "summary": summary,
    }
