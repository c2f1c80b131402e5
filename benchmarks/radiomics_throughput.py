"""Radiomics through a live datasite versus pyradiomics run directly on the same cases.

Phantom cases (hospital-a scanner profile, every case with a lesion) at 2, 8 and 32 cases are
ingested into one live datasite, one dataset per size. With the example parameter file
`analyses/radiomics_params/mr_default.yaml` (shape, first order, GLCM; 1 mm in-plane resampling):

(a) remote: the data scientist's `call_site_task` call of an approved `radiomics_aggregates`
    request, timed around the call: HTTP, the isolated child (interpreter start, preloaded imports,
    passing the cases), pyradiomics on every case, aggregation, the output contract, disclosure
    control and the result's way back;
(b) direct: one pyradiomics extractor over the same cases in this process, one after the other
    (the cases are those the ingestion read, so both sides see identical arrays).

Alternating (a b, b a, a b) per size; each remote call follows an untimed pause (a site between
requests, whose warm spare child has finished its imports). Reported: cases/s both ways and the
ratio remote / direct throughput (target >= 0.9), per size: the fixed cost of a run (request
handling, hand-over to the child) matters less the more cases a run covers.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import CACHE, live_site, run_setup

TARGET_RATIO = 0.9
FULL = {"sizes": (2, 8, 32), "repetitions": 3, "pause_s": 5.0}
QUICK = {"sizes": (2, 4), "repetitions": 1, "pause_s": 0.5}
PARAMS = Path(__file__).resolve().parents[1] / "analyses" / "radiomics_params" / "mr_default.yaml"


def _phantom(n_cases: int) -> Path:
    """A cached hospital-a export of `n_cases` cases, each with a lesion."""
    from domains.brain_mr_segmentation.phantom import write_phantom_site
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    folder = CACHE / f"radiomics-phantom-hospital-a-{n_cases}cases"
    if not (folder / ".complete").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_phantom_site(replace(PROFILES["hospital-a"], tumour_prevalence=1.0), partial, n_cases=n_cases, seed=21)
        (partial / ".complete").write_text("")
        partial.rename(folder)
    return folder


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(quick: bool) -> dict[str, Any]:
    from analyses.commands.radiomics import read_params
    from analyses.site_requests import request_site_task, call_site_task
    from datasite_setup.site_tasks.radiomics_aggregates import extract, feature_extractor
    from datasite_setup import review
    from datasite_setup.connection import admin_client, login
    from datasite_setup.credentials import data_scientist_password
    from datasite_setup.ingest import read_cases
    from datasite_setup.site_config import load_site_config

    plan = QUICK if quick else FULL
    settings, _ = read_params(PARAMS)
    exports = {n: _phantom(n) for n in plan["sizes"]}
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-radiomics-"))
    rows = []
    try:
        with live_site(work, "bench-radiomics") as (config_path, _):
            config = load_site_config(config_path)
            for n, export in exports.items():
                run_setup("ingest", config_path, str(export), "--dataset", f"bench-{n}", "--json")
            ds = login(config.url, "ds@uni.example", data_scientist_password(config, "ds@uni.example"))
            assets = {n: next(d for d in ds.datasets.get_all() if d.name == f"bench-{n}").assets[0] for n in exports}
            for n, asset in assets.items():
                request_site_task(ds, asset, "radiomics_aggregates", f"bench{n}", max_runs=plan["repetitions"] + 1)
            admin = admin_client(config)
            for request in review.list_requests(config, admin, status="pending"):
                review.approve(config, admin, request.id)

            for n, asset in assets.items():
                cases = read_cases(exports[n], None, bytes(range(32)), progress=False).cases
                remote: list[float] = []
                direct: list[float] = []

                def time_remote() -> None:
                    time.sleep(plan["pause_s"])  # a site between requests: its warm spare child is ready
                    started = time.perf_counter()
                    result = call_site_task(ds, asset, "radiomics_aggregates", f"bench{n}", {"settings": settings})
                    remote.append(time.perf_counter() - started)
                    assert result["n"] == n, result.get("n")

                def time_direct() -> None:
                    started = time.perf_counter()
                    extractor = feature_extractor(settings)
                    for case in cases:
                        extract(extractor, case)
                    direct.append(time.perf_counter() - started)

                for rep in range(plan["repetitions"]):
                    order = (time_remote, time_direct) if rep % 2 == 0 else (time_direct, time_remote)
                    for step in order:
                        step()
                row = {
                    "cases": n,
                    "remote_s": [round(v, 3) for v in remote],
                    "direct_s": [round(v, 3) for v in direct],
                    "remote_cases_per_s": round(n / statistics.median(remote), 3),
                    "direct_cases_per_s": round(n / statistics.median(direct), 3),
                }
                row["ratio"] = round(row["remote_cases_per_s"] / row["direct_cases_per_s"], 3)
                rows.append(row)
                print(f"  radiomics_throughput {n} cases: remote {_median(remote):.2f} s, direct {_median(direct):.2f} s, "
                      f"ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = ", ".join(f"{r['cases']} cases {r['ratio']:.2f}" for r in rows)
    summary = (f"remote/direct radiomics throughput {ratios} (target >= {TARGET_RATIO}); "
               f"direct {rows[-1]['direct_cases_per_s']:.2f} cases/s, remote {rows[-1]['remote_cases_per_s']:.2f} cases/s "
               f"at {rows[-1]['cases']} cases (median of {plan['repetitions']})")
    return {
        "parameters": {
            "sizes": list(plan["sizes"]),
            "repetitions": plan["repetitions"],
            "pause_before_remote_s": plan["pause_s"],
            "phantom": {"profile": "hospital-a", "shape_zyx": [24, 64, 64], "tumour_prevalence": 1.0},
            "settings": str(PARAMS.relative_to(PARAMS.parents[2])),
            "remote": "wall time of the data scientist's call_site_task call (one live datasite, isolated child)",
            "direct": "one pyradiomics extractor over the same cases in the benchmark process, sequentially",
        },
        "raw": rows,
        "target_ratio": TARGET_RATIO,
        "summary": summary,
    }
