"""What the site's ingestion read path costs over simply decoding the DICOM files.

A three-site phantom fleet (hospital-a, -b, -c scanner profiles, RTSTRUCT masks, ~2,000 slices
in all at a 256 x 256 matrix) is generated once and cached in `benchmarks/.cache/`. Then, in the
same process, alternating and repeated:

(a) bare read: `pydicom.dcmread(f).pixel_array` over every image slice file;
(b) ingestion: `datasite_setup.ingest.read_cases(site_dir, None, secret, progress=False)` over
    each site folder: header scan, grouping, sorting and validation of series, pixel decoding
    with rescale, RTSTRUCT rasterisation and de-identification (all the work before an upload).

Reported: slices/s both ways and ingestion time / bare read time (target <= 3x). Once, the full
`datasite-setup ingest` CLI of one site against a live datasite (read + mock + upload).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from benchmarks.datasite_startup import live_site, run_setup

CACHE = Path(__file__).resolve().parent / ".cache"
REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
SEEDS = {"hospital-a": 101, "hospital-b": 102, "hospital-c": 103}
SECRET = bytes(range(32))
TARGET_RATIO = 3.0
CLI_SITE = "hospital-a"

FULL = {"matrix": 256, "slice_factor": 2, "cases_per_site": 17, "repetitions": 3}
QUICK = {"matrix": 128, "slice_factor": 1, "cases_per_site": 2, "repetitions": 3}


def _profiles(params: dict[str, Any]) -> dict[str, Any]:
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    return {name: PROFILES[name].with_size(matrix=params["matrix"], n_slices=PROFILES[name].n_slices * params["slice_factor"])
            for name in SITES}


def _code_version() -> str:
    """The cache key changes when the phantom generator changes."""
    digest = hashlib.sha256()
    root = REPO / "domains" / "brain_mr_segmentation"
    for name in ("phantom.py", "scanner_profiles.py"):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:10]


def fleet(params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The cached fleet folder (one sub-folder per site), generating it if needed."""
    from domains.brain_mr_segmentation.phantom import write_phantom_site

    key = f"fleet-m{params['matrix']}-z{params['slice_factor']}x-c{params['cases_per_site']}-rtstruct-{_code_version()}"
    folder = CACHE / key
    info = {"folder": str(folder.relative_to(REPO)), "cached": True, "generation_s": None}
    if (folder / ".complete").exists():
        info["generation_s"] = json.loads((folder / ".complete").read_text()).get("generation_s")
        return folder, info
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    for name, profile in _profiles(params).items():
        write_phantom_site(profile, partial / name, n_cases=params["cases_per_site"], seed=SEEDS[name], mask_format="rtstruct")
    generation = time.perf_counter() - started
    (partial / ".complete").write_text(json.dumps({"generation_s": round(generation, 2)}))
    partial.rename(folder)
    info.update(cached=False, generation_s=round(generation, 2))
    return folder, info


def image_files(site_dir: Path) -> list[Path]:
    return sorted(site_dir.glob("*/image/*.dcm"))


def bare_read(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array
    return time.perf_counter() - started


def ingest_read(site_dirs: list[Path]) -> tuple[float, dict[str, float], int]:
    """read_cases over each site; total time, per-site times, accepted slices."""
    from datasite_setup.ingest import read_cases

    per_site: dict[str, float] = {}
    slices = 0
    for site_dir in site_dirs:
        started = time.perf_counter()
        result = read_cases(site_dir, None, SECRET, progress=False)
        per_site[site_dir.name] = time.perf_counter() - started
        if result.rejected:
            raise RuntimeError(f"{site_dir}: ingestion rejected input: {result.rejected[:3]}")
        slices += sum(item["n_slices"] for item in result.accepted)
        del result
        gc.collect()
    return sum(per_site.values()), per_site, slices


def _warm_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.dcm"):
        path.read_bytes()


def cli_ingest(site_dir: Path) -> dict[str, Any]:
    """`datasite-setup ingest` of one site against a live datasite started for it."""
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-ingest-"))
    try:
        with live_site(work, "bench-ingest") as (config_path, up_times):
            report_path = work / "report.json"
            _, wall = run_setup("ingest", config_path, str(site_dir), "--dataset", f"bench-{site_dir.name}",
                                "--report", str(report_path), timeout=3600)
            report = json.loads(report_path.read_text())
        return {"site": site_dir.name, "wall_s": round(wall, 2), "accepted_cases": len(report["accepted"]),
                "slices": sum(item["n_slices"] for item in report["accepted"]),
                "rejected": len(report["rejected"]), "dataset": report["dataset"],
                "site_up_first_answer_s": round(up_times["first_answer_s"], 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def mock_generation_time(site_dir: Path) -> float:
    """How long the CLI spends making the mock asset (the domain's `mock_cases`) for this site."""
    from datasite_setup.ingest import read_cases
    from domains import get_domain

    mock_cases = get_domain("brain_mr_segmentation").mock_cases

    cases = read_cases(site_dir, None, SECRET, progress=False).cases
    started = time.perf_counter()
    mock_cases(cases)
    return time.perf_counter() - started


def run(quick: bool) -> dict[str, Any]:
    params = QUICK if quick else FULL
    folder, fleet_info = fleet(params)
    site_dirs = [folder / name for name in SITES]
    files = [path for site_dir in site_dirs for path in image_files(site_dir)]
    n_slices = len(files)
    _warm_page_cache(folder)

    bare: list[float] = []
    ingest: list[float] = []
    ingest_per_site: list[dict[str, float]] = []
    order_log: list[str] = []
    for rep in range(params["repetitions"]):
        order = ("bare", "ingest") if rep % 2 == 0 else ("ingest", "bare")
        for which in order:
            if which == "bare":
                bare.append(bare_read(files))
            else:
                total, per_site, accepted = ingest_read(site_dirs)
                if accepted != n_slices:
                    raise RuntimeError(f"read_cases accepted {accepted} slices, expected {n_slices}")
                ingest.append(total)
                ingest_per_site.append(per_site)
            gc.collect()
        order_log.append("+".join(order))
        print(f"  ingestion_throughput rep {rep + 1}/{params['repetitions']}: bare {bare[-1]:.2f} s, "
              f"read_cases {ingest[-1]:.2f} s", file=sys.stderr, flush=True)

    bare_median, ingest_median = statistics.median(bare), statistics.median(ingest)
    ratio = ingest_median / bare_median
    paired = [i / b for i, b in zip(ingest, bare)]
    cli = cli_ingest(folder / CLI_SITE)
    cli_site_read = statistics.median(p[CLI_SITE] for p in ingest_per_site)
    mock_s = mock_generation_time(folder / CLI_SITE)

    profiles = _profiles(params)
    medians = {
        "bare_read_s": round(bare_median, 3),
        "read_cases_s": round(ingest_median, 3),
        "bare_read_slices_per_s": round(n_slices / bare_median, 1),
        "read_cases_slices_per_s": round(n_slices / ingest_median, 1),
        f"read_cases_{CLI_SITE}_s": round(cli_site_read, 3),
    }
    summary = (f"{n_slices} slices: bare pydicom {medians['bare_read_slices_per_s']:.0f} slices/s, read_cases "
               f"{medians['read_cases_slices_per_s']:.0f} slices/s, ratio {ratio:.2f}x "
               f"({'meets' if ratio <= TARGET_RATIO else 'misses'} <= {TARGET_RATIO:.0f}x); CLI ingest of {CLI_SITE} "
               f"({cli['slices']} slices) to a live datasite {cli['wall_s']:.1f} s (mock generation {mock_s:.1f} s of it)")
    return {
        "parameters": {
            **params,
            "sites": {name: {"matrix": p.matrix, "n_slices_per_case": p.n_slices, "cases": params["cases_per_site"],
                             "pixel_spacing_mm": round(p.pixel_spacing_mm, 4), "slice_thickness_mm": round(p.slice_thickness_mm, 4),
                             "bits_stored": p.bits_stored, "rescale_slope": p.rescale_slope} for name, p in profiles.items()},
            "mask_format": "rtstruct",
            "n_slices": n_slices,
            "fleet": fleet_info,
            "page_cache": "warm (every file read once before timing)",
            "order_per_repetition": order_log,
        },
        "raw": {"bare_read_s": _rounded(bare), "read_cases_s": _rounded(ingest),
                "read_cases_per_site_s": [{k: round(v, 4) for k, v in p.items()} for p in ingest_per_site],
                "paired_ratios": _rounded(paired)},
        "medians": medians,
        "ratio": round(ratio, 3),
        "ratio_median_of_pairs": round(statistics.median(paired), 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "cli_ingest": {**cli, "read_cases_part_s": round(cli_site_read, 2), "mock_cases_part_s": round(mock_s, 2),
                       "rest_s": round(cli["wall_s"] - cli_site_read - mock_s, 2),
                       "note": "read_cases and mock_cases parts are timed in this process on the same site (the "
                               "read_cases median of the repetitions above); rest = CLI start-up and imports (syft), "
                               "login, serialisation and upload"},
        "summary": summary,
    }
