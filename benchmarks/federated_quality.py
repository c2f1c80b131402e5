"""Quality on the 3-site phantom fleet: federated (FedAvg, FedProx, FedBN) vs local-only vs
centralized, scored on held-out cases at every site.

Setup: the three scanner profiles (hospital-a/b/c: different vendors, field strengths, intensity
scales, bias fields and noise - the strongest differences the phantom offers), every case with a
lesion. Each site holds `train` cases and a disjoint set of `held_out` cases; training sees only
the former, every Dice below is on the latter. The sites are simulated in this process
(`SimulatedSite`: the installed site-task code on the same cases; results equal the datasite path,
which tests/test_federated_training.py checks) so the figures measure learning, not transport;
benchmarks/federated_round_overhead.py measures transport.

Every method gets the same schedule (rounds x epochs x step cap per site, same seed and initial
model). Centralized (simulation only) trains on the pooled training cases with the step cap
scaled by the number of sites, so it does as many optimisation steps as the federation does in
total. Local-only: each site's own model on its own held-out cases.

Reported: final pooled Dice (from pooled confusion counts) per method and per site, the gap
federated - centralized (target: within 0.02), federated vs the mean of the local-only models'
Dice (target: above), payload bytes per round and the orchestrator's peak RSS. Pooled Dice moves
by up to ~0.05 from one round to the next (Adam restarted at every site each round), so the mean
of the last rounds is reported beside the final round's value.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

SITES = ("hospital-a", "hospital-b", "hospital-c")
FEDERATED = ("fedavg", "fedprox", "fedbn")
FULL = {"matrix": 48, "n_slices": 12, "train": 6, "held_out": 4, "rounds": 40, "epochs": 2, "max_steps": 0}
QUICK = {"matrix": 32, "n_slices": 8, "train": 2, "held_out": 1, "rounds": 2, "epochs": 1, "max_steps": 4}
MAX_GAP = 0.02
LAST = 5  # rounds averaged for a steadier figure: pooled Dice moves by up to ~0.05 from round to round


def _fleet(size: dict[str, int], work: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """(training cases, held-out cases) per site, read from freshly written phantom DICOM."""
    from analyses.federation.centralized import read_site_exports
    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    exports = {}
    for index, site in enumerate(SITES):
        profile = replace(PROFILES[site].with_size(size["matrix"], size["n_slices"]), tumour_prevalence=1.0)
        write_phantom_site(profile, work / site, n_cases=size["train"] + size["held_out"], seed=index)
        exports[site] = work / site
    cases = read_site_exports(exports)  # in case-folder order: the split is the same every run
    return ({s: c[: size["train"]] for s, c in cases.items()}, {s: c[size["train"]:] for s, c in cases.items()})


def _final(history: list[dict[str, Any]]) -> dict[str, Any]:
    last = history[-1]
    per_round = [r["pooled"]["dice"] for r in history]
    return {"pooled_dice": round(last["pooled"]["dice"], 4),
            f"pooled_dice_mean_last_{LAST}": round(statistics.fmean(per_round[-LAST:]), 4),
            "site_dice": {s: round(m["dice"], 4) for s, m in sorted(last["site_metrics"].items())},
            "pooled_dice_per_round": [round(v, 4) for v in per_round]}


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.centralized import SIMULATION_LABEL, train_centralized
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    size = QUICK if quick else FULL
    torch.set_num_threads(1)  # three concurrent sites on a 2-core machine; a site's child uses one thread too
    work = Path(tempfile.mkdtemp(prefix="bench-fed-quality-"))
    try:
        train_cases, held_out = _fleet(size, work / "exports")
        links = [SimulatedSite(site, train_cases[site], held_out[site]) for site in SITES]
        common = {"domain": "brain_mr_segmentation", "rounds": size["rounds"], "epochs": size["epochs"],
                  "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0,
                  "min_sites": len(SITES)}
        methods: dict[str, Any] = {}
        bytes_per_round: dict[str, int] = {}
        peak_rss: dict[str, float] = {}
        seconds: dict[str, float] = {}
        for strategy in (*FEDERATED, "local"):
            plan = TrainingPlan(strategy=strategy, strategy_options={"mu": 0.01} if strategy == "fedprox" else {}, **common)
            started = time.perf_counter()
            report = Orchestrator(plan, links, work / "runs" / strategy, progress=True).run()
            seconds[strategy] = round(time.perf_counter() - started, 1)
            methods[strategy] = _final(report.history)
            bytes_per_round[strategy] = int(statistics.median(r["payload_bytes_sent"] for r in report.history[1:]))
            peak_rss[strategy] = report.peak_rss_mb
        plan = TrainingPlan(strategy="fedavg", **common)
        torch.manual_seed(plan.seed)
        initial = exchanged_weights(get_domain(plan.domain).build_model())
        started = time.perf_counter()
        centralized = train_centralized(plan, train_cases, initial, progress=True, eval_cases_by_site=held_out)
        seconds["centralized"] = round(time.perf_counter() - started, 1)
        methods["centralized"] = _final(centralized)

        central = methods["centralized"]["pooled_dice"]
        steady = f"pooled_dice_mean_last_{LAST}"
        local_mean = statistics.fmean(methods["local"]["site_dice"].values())
        verdicts = {
            strategy: {"gap_to_centralized": round(methods[strategy]["pooled_dice"] - central, 4),
                       "within_0.02_of_centralized": methods[strategy]["pooled_dice"] >= central - MAX_GAP,
                       "above_local_mean": methods[strategy]["pooled_dice"] > local_mean,
                       f"gap_to_centralized_mean_last_{LAST}": round(methods[strategy][steady] - methods["centralized"][steady], 4)}
            for strategy in FEDERATED
        }
        table = ", ".join(f"{m} {methods[m]['pooled_dice']:.3f}" for m in (*FEDERATED, "centralized"))
        return {
            "params": {**size, "sites": list(SITES), "batch_size": 8, "lr": 1e-3, "optimizer": "adam",
                       "fedprox_mu": 0.01, "torch_threads": 1, "centralized": SIMULATION_LABEL,
                       "slices_per_site": {s: sum(len(c["image"]) for c in train_cases[s]) for s in SITES}},
            "methods": methods,
            "local_mean_site_dice": round(local_mean, 4),
            "verdicts": verdicts,
            "payload_bytes_sent_per_round": bytes_per_round,
            "orchestrator_peak_rss_mb": peak_rss,
            "seconds": seconds,
            "summary": (f"held-out pooled Dice, final round: {table}; local-only mean {local_mean:.3f}; "
                        f"FedAvg gap to centralized {verdicts['fedavg']['gap_to_centralized']:+.3f} "
                        f"(target >= -{MAX_GAP}; mean of the last {LAST} rounds "
                        f"{verdicts['fedavg'][f'gap_to_centralized_mean_last_{LAST}']:+.3f}); "
                        f"{bytes_per_round['fedavg'] / 2**20:.2f} MiB sent per round"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
