"""What running a site task in the isolated child costs over running it in the server's process.

Every approved function at a site runs through `datasite_setup.isolation.run_isolated`: inputs
pickled to a fresh interpreter, which preloads libraries, confines itself (Landlock, seccomp,
audit hook), runs the code and sends the result back in the `result_codec` format. The workload is
the site task `local_train` (brain MR domain, `datasite_setup.site_tasks.run_installed_task`, Adam, phantom
cases at a 64 x 64 matrix), with the U-Net widened (`base_channels`) until its exchanged float32
weights weigh ~30 MB, as a model state shipped each round would. The function receives those
weights plus the cases and returns new weights of the same names and shapes.

Per repetition, alternating the order (A B C D, then D C B A) on the same inputs:

(a) in-process: the same function source `exec`'d and called here (warm: one untimed call first,
    as in a server that has trained before);
(b) isolated: `run_isolated` with the server's defaults (`ExecutionLimits()`, DEFAULT_PRELOAD,
    a warm child forked from the zygote that did the imports), timed around the whole call:
    encode inputs, hand-over to the child, confinement, compute, encode and decode the result;
(b') isolated cold: the same with `warm=False`, a fresh interpreter that preloads during the run;
(c) child start: `run_isolated` (warm) of a function that returns None;
(d) child start + transfer: the same for a function that returns the ~30 MB weights it got.

Every variant starts after a pause of `pause_s` (a server between requests); the pause is not timed.

Headline: median(b) / median(a) (target <= 1.10 for a >= 5 s task), and median(b') / median(a)
for the cold path. Fixed overhead: median(c),
and median(d) - median(c) for moving the weights in and out. The task also times itself from
inside, so (b) splits into "outside the function" and "inside it", where the fresh child pays
what the warm server process paid once (the first torch optimiser imports torch._dynamo, the
first training step warms up). Both paths run torch on `torch_threads` threads: on the shared
2-core machine multi-threaded OpenMP spins against other work and timings lose all meaning.
A full run also times the child's imports in a plain subprocess (no sandbox).
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

TARGET_RATIO = 1.10
DOMAIN_NAME = "brain_mr_segmentation"
FULL = {"base_channels": 64, "n_cases": 5, "n_slices": 16, "matrix": 64, "batch_size": 8, "epochs": 1,
        "torch_threads": 1, "repetitions": 5, "pause_s": 5.0}
QUICK = {"base_channels": 16, "n_cases": 5, "n_slices": 4, "matrix": 64, "batch_size": 10, "epochs": 1,
         "torch_threads": 1, "repetitions": 1, "pause_s": 0.5}

# The server's `_TASK_HARNESS` (site_execution.py) with two settings around it: a wider U-Net, so
# that the weights weigh ~30 MB (the target is stated for that size), and a fixed torch thread count. Both are
# restored afterwards, since in-process the domain object and torch are the server's own.
TASK_SOURCE = '''
def train_wide(cases, params, min_cohort, base_channels, torch_threads):
    import time

    started = time.perf_counter()
    import torch
    from datasite_setup.site_tasks import run_installed_task
    from domains import get_domain

    domain = get_domain(params["domain"])
    saved_channels, saved_threads = domain.base_channels, torch.get_num_threads()
    domain.base_channels = base_channels
    torch.set_num_threads(torch_threads)
    try:
        result = run_installed_task("local_train", cases, params, min_cohort)
    finally:
        domain.base_channels = saved_channels
        torch.set_num_threads(saved_threads)
    result["scalars"]["inside_s"] = time.perf_counter() - started
    return result
'''
NOOP_SOURCE = "def noop():\n    return None\n"
ECHO_SOURCE = "def echo(weights):\n    return weights\n"

# Run in a plain interpreter: how long each thing the child loads takes on its own.
IMPORT_PROFILE_SCRIPT = """
import json, time
laps = {}
def lap(name, started):
    laps[name] = round(time.perf_counter() - started, 3)
t = time.perf_counter(); import numpy; lap("numpy", t)
t = time.perf_counter(); import torch; lap("torch", t)
t = time.perf_counter(); import radiomics; lap("radiomics", t)
t = time.perf_counter(); import pydicom; lap("pydicom", t)
t = time.perf_counter(); import datasite_setup.site_tasks; lap("datasite_setup.site_tasks", t)
t = time.perf_counter(); import domains.brain_mr_segmentation; lap("domains.brain_mr_segmentation", t)
model = torch.nn.Linear(2, 2)
t = time.perf_counter(); torch.optim.Adam(model.parameters()); lap("first torch optimiser (imports torch._dynamo)", t)
print(json.dumps(laps))
"""


def _cases(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Phantom case records as a site holds them, all in its training split (seeded, so every run
    trains on the same slices)."""
    from domains.brain_mr_segmentation import PROFILES, generate_case

    profile = PROFILES["hospital-a"].with_size(matrix=params["matrix"], n_slices=params["n_slices"])
    rng = np.random.default_rng(2024)
    return [{**generate_case(profile, rng).as_record(f"bench-{i:02d}"), "split": "train"} for i in range(params["n_cases"])]


def _global_weights(base_channels: int) -> dict[str, np.ndarray]:
    """Initial weights of the widened U-Net, as the orchestrator would send them."""
    import torch

    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    domain = get_domain(DOMAIN_NAME)
    saved = domain.base_channels
    domain.base_channels = base_channels
    try:
        torch.manual_seed(0)
        return exchanged_weights(domain.build_model())
    finally:
        domain.base_channels = saved


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def _import_profile() -> dict[str, float]:
    """Seconds per import in a fresh interpreter with the child's working directory and path."""
    from datasite_setup.sandbox.grants import PROJECT_ROOT

    proc = subprocess.run([sys.executable, "-B", "-c", IMPORT_PROFILE_SCRIPT], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=300, check=True)
    return json.loads(proc.stdout)


def _codec_only(task_kwargs: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, float]:
    """The copies the isolated path makes of the data, without any child: inputs pickled (twice,
    as run_isolated nests them) and unpickled, the result encoded and decoded."""
    from datasite_setup.result_codec import decode, encode

    protocol = pickle.HIGHEST_PROTOCOL
    pickle_s, payload = _timed(lambda: pickle.dumps({"kwargs": pickle.dumps(task_kwargs, protocol=protocol)}, protocol=protocol))
    unpickle_s, _ = _timed(lambda: pickle.loads(pickle.loads(payload)["kwargs"]))
    encode_s, blob = _timed(lambda: encode({"ok": True, "result": {"weights": weights}}))
    decode_s, _ = _timed(lambda: decode(blob))
    return {"pickle_inputs_s": round(pickle_s, 4), "unpickle_inputs_s": round(unpickle_s, 4),
            "encode_result_s": round(encode_s, 4), "decode_result_s": round(decode_s, 4),
            "input_mb": round(len(payload) / 1e6, 2), "result_mb": round(len(blob) / 1e6, 2)}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(quick: bool) -> dict[str, Any]:
    from datasite_setup.isolation import DEFAULT_PRELOAD, Limits, run_isolated
    from datasite_setup.site_config import ExecutionLimits, PrivacySettings

    params = QUICK if quick else FULL
    limits = Limits(**asdict(ExecutionLimits()))
    cases = _cases(params)
    weights = _global_weights(params["base_channels"])
    weights_mb = sum(a.nbytes for a in weights.values()) / 1e6
    task_params = {"domain": DOMAIN_NAME, "weights": weights, "epochs": params["epochs"],
                   "batch_size": params["batch_size"], "lr": 1e-3, "optimizer": "adam", "seed": 7}
    task_kwargs = {"cases": cases, "params": task_params, "min_cohort": PrivacySettings().min_cohort,
                   "base_channels": params["base_channels"], "torch_threads": params["torch_threads"]}
    namespace: dict[str, Any] = {}
    exec(compile(TASK_SOURCE, "<benchmark task>", "exec"), namespace)
    train_wide = namespace["train_wide"]

    def isolated(source: str, function: str, kwargs: dict[str, Any], warm: bool = True) -> Any:
        outcome = run_isolated(source, function, kwargs, limits, warm=warm)
        if not outcome.ok:
            raise RuntimeError(f"{function} failed in the child ({outcome.failure}): {outcome.stderr_tail[-2000:]}")
        return outcome.result

    variants: dict[str, Callable[[], Any]] = {
        "in_process": lambda: train_wide(**task_kwargs),
        "isolated": lambda: isolated(TASK_SOURCE, "train_wide", task_kwargs),
        "isolated_cold": lambda: isolated(TASK_SOURCE, "train_wide", task_kwargs, warm=False),
        "child_start": lambda: isolated(NOOP_SOURCE, "noop", {}),
        "child_start_transfer": lambda: isolated(ECHO_SOURCE, "echo", {"weights": weights}),
    }
    first_in_process_s, _ = _timed(variants["in_process"])
    first_child_s = None if quick else _timed(variants["child_start"])[0]  # pages in what every child reads
    codec = _codec_only(task_kwargs, weights)
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for rep in range(params["repetitions"]):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        entry: dict[str, Any] = {"repetition": rep, "order": order, "load_average_before": [round(v, 2) for v in os.getloadavg()]}
        for name in order:
            time.sleep(params["pause_s"])
            seconds, results[name] = _timed(variants[name])
            entry[f"{name}_s"] = round(seconds, 3)
        entry["in_process_inside_s"] = round(results["in_process"]["scalars"]["inside_s"], 3)
        entry["isolated_inside_s"] = round(results["isolated"]["scalars"]["inside_s"], 3)
        entry["isolated_cold_inside_s"] = round(results["isolated_cold"]["scalars"]["inside_s"], 3)
        entry["ratio"] = round(entry["isolated_s"] / entry["in_process_s"], 3)
        entry["ratio_cold"] = round(entry["isolated_cold_s"] / entry["in_process_s"], 3)
        entry["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        runs.append(entry)
        print(f"  isolation_overhead rep {rep + 1}/{params['repetitions']}: in-process {entry['in_process_s']:.2f} s, "
              f"isolated {entry['isolated_s']:.2f} s (cold {entry['isolated_cold_s']:.2f} s), child start {entry['child_start_s']:.2f} s, "
              f"+transfer {entry['child_start_transfer_s']:.2f} s", file=sys.stderr, flush=True)

    identical = all(
        set(results["in_process"]["weights"]) == set(results[name]["weights"])
        and all(np.array_equal(value, results[name]["weights"][k]) for k, value in results["in_process"]["weights"].items())
        for name in ("isolated", "isolated_cold")
    )
    shapes_kept = all(results["isolated"]["weights"][k].shape == weights[k].shape for k in weights)
    medians = {key: _median([r[key] for r in runs]) for key in runs[0] if key.endswith("_s")}
    ratio = round(medians["isolated_s"] / medians["in_process_s"], 3)
    ratio_cold = round(medians["isolated_cold_s"] / medians["in_process_s"], 3)
    overhead = {
        "isolated_minus_in_process_s": round(medians["isolated_s"] - medians["in_process_s"], 3),
        "child_start_s": medians["child_start_s"],
        "transfer_in_and_out_s": round(medians["child_start_transfer_s"] - medians["child_start_s"], 3),
        "outside_the_function_s": round(medians["isolated_s"] - medians["isolated_inside_s"], 3),
        "cold_start_inside_the_function_s": round(medians["isolated_inside_s"] - medians["in_process_inside_s"], 3),
    }
    overhead["task_seconds_for_target"] = round(overhead["isolated_minus_in_process_s"] / (TARGET_RATIO - 1), 1)
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    summary = (f"local_train with {weights_mb:.1f} MB of weights: in-process {medians['in_process_s']:.2f} s, isolated "
               f"{medians['isolated_s']:.2f} s, ratio {ratio:.2f} ({verdict} the {TARGET_RATIO:.2f} target; cold child "
               f"{medians['isolated_cold_s']:.2f} s, ratio {ratio_cold:.2f}); fixed: warm child "
               f"start {overhead['child_start_s']:.2f} s + {weights_mb:.0f} MB in and out {overhead['transfer_in_and_out_s']:.2f} s "
               f"(median of {params['repetitions']})")
    return {
        "parameters": {
            **params,
            "task": "local_train via datasite_setup.site_tasks.run_installed_task, adam, lr 1e-3, seed 7",
            "domain": DOMAIN_NAME,
            "weights_mb": round(weights_mb, 2),
            "weight_arrays": len(weights),
            "cases_mb": round(sum(c["image"].nbytes + c["mask"].nbytes for c in cases) / 1e6, 2),
            "training_steps": int(results["in_process"]["scalars"]["steps"]),
            "limits": asdict(limits),
            "preload": list(DEFAULT_PRELOAD),
            "min_cohort": task_kwargs["min_cohort"],
            "target_ratio": TARGET_RATIO,
        },
        "warm_up": {"first_in_process_call_s": round(first_in_process_s, 3),
                    "first_child_start_s": None if first_child_s is None else round(first_child_s, 3)},
        "raw": runs,
        "medians": medians,
        "ratio": ratio,
        "ratio_cold": ratio_cold,
        "overhead": overhead,
        "codec_only": codec,
        "import_profile_s": None if quick else _import_profile(),
        "isolated_weights_identical_to_in_process": identical,
        "isolated_weights_keep_shapes": shapes_kept,
        "summary": summary,
    }
