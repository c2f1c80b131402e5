"""`python -m benchmarks [name ...] [--quick]`: run on-demand benchmarks, write their results.

Each benchmark module exposes `run(quick: bool) -> dict`; the dict holds its parameters, raw
timings, medians, headline figures and a one-line `summary`. Results go to
`benchmarks/results/<name>.json` (`<name>.quick.json` for a `--quick` smoke run, so a smoke run
never overwrites the reference figures), together with what the machine was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REGISTRY: dict[str, str] = {
    "ingestion_throughput": "benchmarks.ingestion_throughput",
    "datasite_startup": "benchmarks.datasite_startup",
    "isolation_overhead": "benchmarks.isolation_overhead",
    "federated_round_overhead": "benchmarks.federated_round_overhead",
    "federated_quality": "benchmarks.federated_quality",
    "radiomics_throughput": "benchmarks.radiomics_throughput",
    "privacy_overhead": "benchmarks.privacy_overhead",
    "data_growth": "benchmarks.data_growth",
    "liver_ct_quality": "benchmarks.liver_ct_quality",
    "liver_ct_patch_throughput": "benchmarks.liver_ct_patch_throughput",
    "liver_ct_teacher_student": "benchmarks.liver_ct_teacher_student",
    "update_privacy_utility": "benchmarks.update_privacy_utility",
    "sample_privacy_utility": "benchmarks.sample_privacy_utility",
    "harmonization_segmentation": "benchmarks.harmonization_segmentation",
    "harmonization_privacy_curve": "benchmarks.harmonization_privacy_curve",
    "translation_federation": "benchmarks.translation_federation",
    "body_size_federation": "benchmarks.body_size_federation",
    "thread_cap_cost": "benchmarks.thread_cap_cost",
}

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, Any]:
    import psutil

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for package in ("numpy", "pydicom", "syft"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            versions[package] = None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
    }


def write_result(name: str, data: dict[str, Any], quick: bool) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}{'.quick' if quick else ''}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"benchmarks to run (default: all): {', '.join(REGISTRY)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer repetitions, for a smoke run")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    failed = 0
    for name in args.names or list(REGISTRY):
        module = importlib.import_module(REGISTRY[name])
        machine = machine_info()
        started = time.perf_counter()
        try:
            result = module.run(args.quick)
        except Exception as exc:  # report and go on with the next benchmark
            failed += 1
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        data = {"benchmark": name, "quick": args.quick, "machine": machine,
                "benchmark_wall_s": round(time.perf_counter() - started, 2), **result}
        path = write_result(name, data, args.quick)
        print(f"{name}: {result.get('summary', '(no summary)')}  -> {path.relative_to(REPO)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
