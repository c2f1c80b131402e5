"""What the sandbox's thread cap costs a run: in process vs a child in a pids cgroup vs a child
whose every new thread the parent approves.

Every confined child is held to `max_threads` live threads, counted outside it
(`datasite_setup.isolation`): by the kernel in a pids cgroup of the run's own where the server may
make one (`thread_cgroup`), else by the parent answering a seccomp notification per new thread
(`thread_cap`). The second costs each thread a round trip between the two processes, which matters
to code that starts threads often: ITK's default threader starts one per filter call and core.

Two workloads, each timed inside the function (so the child's start and hand-over are not
counted), alternating the order per repetition (A B C, then C B A):

(a) thread start: start and join `n_threads` Python threads one after the other, per thread;
(b) radiomics: one pyradiomics extractor (the example MR parameters: shape, first order, GLCM,
    1 mm in-plane BSpline resampling) over `n_cases` hospital-a phantom cases (24 x 64 x 64) held in
    memory, ITK with its default (platform) threader and one thread per core.

Headline: child / in-process time for each way of counting threads (target for the pids cgroup:
<= 1.02 on the radiomics loop, i.e. the cap costs nothing measurable).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from typing import Any

import numpy as np

TARGET_RATIO = 1.02
FULL = {"n_threads": 3000, "n_cases": 64, "repetitions": 8}
QUICK = {"n_threads": 300, "n_cases": 4, "repetitions": 1}

SOURCE = '''
def start_threads(n_threads):
    import threading
    import time
    started = time.perf_counter()
    for _ in range(n_threads):
        worker = threading.Thread(target=lambda: None)
        worker.start()
        worker.join()
    return {"seconds": time.perf_counter() - started}


def radiomics_loop(cases, settings):
    import logging
    import time
    import SimpleITK as sitk
    from radiomics import featureextractor
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(settings)
    images = []
    for image, mask, spacing in cases:
        itk_image = sitk.GetImageFromArray(image.astype("float32"))
        itk_image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        itk_mask = sitk.GetImageFromArray(mask.astype("uint8"))
        itk_mask.CopyInformation(itk_image)
        images.append((itk_image, itk_mask))
    started = time.perf_counter()
    for itk_image, itk_mask in images:
        extractor.execute(itk_image, itk_mask)
    return {"seconds": time.perf_counter() - started, "threader": sitk.ProcessObject.GetGlobalDefaultThreader()}
'''


def _cases(n_cases: int) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    from domains.brain_mr_segmentation.phantom import generate_case
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    profile = replace(PROFILES["hospital-a"], tumour_prevalence=1.0)
    rng = np.random.default_rng(21)
    return [(case.image, case.mask, case.spacing) for case in (generate_case(profile, rng) for _ in range(n_cases))]


def run(quick: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from analyses.commands.radiomics import read_params
    from benchmarks.radiomics_throughput import PARAMS
    from datasite_setup.isolation import Limits, run_isolated, stop_fork_servers
    from datasite_setup.isolation.thread_cgroup import runs_root

    params = QUICK if quick else FULL
    if runs_root() is None:
        raise SystemExit("thread_cap_cost: this process may not make pids cgroups (run as root on a machine with a "
                         "cgroup v1 pids hierarchy or cgroup v2 enabling pids at its root); nothing to compare")
    namespace: dict[str, Any] = {}
    exec(compile(SOURCE, "thread_cap_cost", "exec"), namespace)
    workloads = {
        "thread_start": ("start_threads", {"n_threads": params["n_threads"]}),
        "radiomics": ("radiomics_loop", {"cases": _cases(params["n_cases"]), "settings": read_params(PARAMS)[0]}),
    }
    ways = ("in_process", "pids_cgroup", "approvals")
    raw: dict[str, dict[str, list[float]]] = {name: {way: [] for way in ways} for name in workloads}
    threaders: set[str] = set()
    steps = params["repetitions"] * len(workloads) * len(ways)
    with tqdm(total=steps, desc="thread_cap_cost", file=sys.stderr) as bar:
        for repetition in range(params["repetitions"]):
            for name, (function, kwargs) in workloads.items():
                for way in ways if repetition % 2 == 0 else ways[::-1]:
                    if way == "in_process":
                        result = namespace[function](**kwargs)
                    else:
                        limits = Limits(wall_seconds=600, thread_cgroup=way == "pids_cgroup")
                        outcome = run_isolated(SOURCE, function, kwargs, limits, preload=("numpy", "radiomics"))
                        if not outcome.ok:
                            raise RuntimeError(f"thread_cap_cost: the {way} run failed: {outcome.failure}\n{outcome.stderr_tail}")
                        expected = "pids-cgroup" if way == "pids_cgroup" else "thread-approvals"
                        if expected not in outcome.confinement:
                            raise RuntimeError(f"thread_cap_cost: the {way} run was not counted that way: {outcome.confinement}")
                        result = outcome.result
                    raw[name][way].append(result["seconds"])
                    if "threader" in result:
                        threaders.add(result["threader"])
                    bar.update()
    stop_fork_servers()
    medians = {name: {way: round(statistics.median(times), 4) for way, times in by_way.items()} for name, by_way in raw.items()}
    per_thread_us = {way: round(seconds / params["n_threads"] * 1e6, 1) for way, seconds in medians["thread_start"].items()}
    ratios = {name: {way: round(by_way[way] / by_way["in_process"], 3) for way in ways[1:]} for name, by_way in medians.items()}
    met = ratios["radiomics"]["pids_cgroup"] <= TARGET_RATIO
    return {
        "params": params,
        "raw_seconds": raw,
        "median_seconds": medians,
        "thread_start_us": per_thread_us,
        "ratio_to_in_process": ratios,
        "itk_threaders": sorted(threaders),
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "summary": (
            f"thread start {per_thread_us['in_process']} us in process, {per_thread_us['pids_cgroup']} us under the pids "
            f"cgroup, {per_thread_us['approvals']} us approved; radiomics over {params['n_cases']} cases "
            f"{ratios['radiomics']['pids_cgroup']}x in process under the pids cgroup, {ratios['radiomics']['approvals']}x "
            f"with approvals (target <= {TARGET_RATIO} for the cgroup: {'met' if met else 'not met'})"
        ),
    }
