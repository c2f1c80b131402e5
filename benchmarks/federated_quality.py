"""Quality on the 3-site phantom fleet: federated (FedAvg, FedProx, FedBN) vs local-only vs
centralized, scored on held-out test cases at every site.

Setup: the three scanner profiles (hospital-a/b/c: different vendors, field strengths, intensity
scales, bias fields and noise - the strongest differences the phantom offers), every case with a
lesion. Each site holds `train`, `validation` and `test` cases (fixed by case-folder order); the
sites train on `train`, every round is scored on `validation` to select a round, and every Dice
reported below is on `test`, which neither training nor selection saw. The sites are simulated in
this process (`SimulatedSite`: the installed site-task code and split selection on the same cases;
results equal the datasite path, which tests/test_federated_training.py checks) so the figures
measure learning, not transport; benchmarks/federated_round_overhead.py measures transport.

Every method gets the same schedule (rounds x epochs x step cap per site, same seed and initial
model) and trains on the domain's batches as the sites do, scanner augmentation included
(`domains/brain_mr_segmentation/augmentation.py`; runs before 2026-12-03 had none). Centralized
(simulation only) trains on the pooled training cases with the step cap
scaled by the number of sites, so it does as many optimisation steps as the federation does in
total, and selects its round on the pooled validation cases too. Local-only: each site's own model
on its own test cases (and, reported apart, on the other sites').

Every method starts from the same initial model: the output prior pooled from the sites'
`foreground_share` (the federated runs ask the sites; centralized and local-only start from that
same prior). Reported per method: pooled test Dice (from pooled confusion counts) of the final
round's weights and of the round selected on pooled validation Dice, per-site test Dice, the
validation curve. The verdicts use the mean pooled validation Dice of the last LAST rounds (cases
no model trained on), so no single round decides: federated within 0.02 of centralized and above
local-only, FedBN at least FedAvg, and the curve above its round-1 value (it rises rather than
falls after round 1); also the final test gap to centralized and the test Dice vs the mean of the
local-only models'. Payload bytes per round and the orchestrator's peak RSS. Pooled Dice
moves by up to ~0.05 from one round to the next (Adam restarted at every site each round), which
is what the validation-selected round steadies.

Plain SGD (lr 0.02): FedAvg and SCAFFOLD (whose control variates correct the sites' drift, and
which needs SGD steps) against a centralized run with the same optimiser; the same verdicts, with
that run as the reference. This shows what SCAFFOLD does for the outlier site (hospital-c).
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
# SCAFFOLD corrects the sites' drift for plain SGD steps only, so it runs with FedAvg and a
# centralized reference of its own on that optimiser (lr tuned on this fleet: 0.05 diverged for FedAvg).
SGD = {"optimizer": "sgd", "lr": 0.02}
SGD_FEDERATED = ("fedavg_sgd", "scaffold_sgd")
FULL = {"matrix": 48, "n_slices": 12, "train": 6, "validation": 3, "test": 4, "rounds": 40, "epochs": 2, "max_steps": 0}
QUICK = {"matrix": 32, "n_slices": 8, "train": 2, "validation": 1, "test": 1, "rounds": 2, "epochs": 1, "max_steps": 4}
SPLITS = ("train", "validation", "test")
MAX_GAP = 0.02
LAST = 5  # rounds whose mean validation Dice the verdicts use, so no single round decides


def _fleet(size: dict[str, int], work: Path) -> dict[str, list[dict[str, Any]]]:
    """Cases per site, each with its split, read from freshly written phantom DICOM."""
    from analyses.federation.centralized import read_site_exports
    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    exports = {}
    for index, site in enumerate(SITES):
        profile = replace(PROFILES[site].with_size(size["matrix"], size["n_slices"]), tumour_prevalence=1.0)
        write_phantom_site(profile, work / site, n_cases=sum(size[s] for s in SPLITS), seed=index)
        exports[site] = work / site
    order = [split for split in SPLITS for _ in range(size[split])]
    # in case-folder order, so the split is the same every run
    return {site: [{**case, "split": split} for case, split in zip(cases, order)]
            for site, cases in read_site_exports(exports).items()}


def _scores(run: dict[str, Any]) -> dict[str, Any]:
    """Test Dice of the final and the validation-selected weights, and the validation curve."""
    final, best = run["final"], run["best"]
    curve = [r["pooled"]["dice"] for r in run["history"] if "dice" in r.get("pooled", {})]
    scores = {"pooled_dice": round(final["pooled"]["dice"], 4),
              "validation_last5_mean": round(statistics.fmean(curve[-LAST:]), 4),
              "validation_round1": round(curve[1], 4) if len(curve) > 1 else None,
              "pooled_dice_selected": round(best["pooled"]["dice"], 4),
              "selected_round": run["selection"]["best_round"],
              "site_dice": {s: round(m["dice"], 4) for s, m in sorted(final["site_metrics"].items())},
              "site_dice_selected": {s: round(m["dice"], 4) for s, m in sorted(best["site_metrics"].items())},
              "validation_pooled_dice_per_round": [round(r["pooled"]["dice"], 4) for r in run["history"]]}
    if "cross_site_pooled" in final:
        scores["other_sites_dice"] = {s: round(m["dice"], 4) for s, m in sorted(final["cross_site_pooled"].items())}
    return scores


def _verdict(methods: dict[str, Any], method: str, reference: str, local_mean: float) -> dict[str, Any]:
    """The targets for one federated method against its centralized reference (same optimiser)."""
    scores, central = methods[method], methods[reference]
    last5, central_last5 = scores["validation_last5_mean"], central["validation_last5_mean"]
    return {"reference": reference,
            "gap_to_centralized": round(scores["pooled_dice"] - central["pooled_dice"], 4),
            "gap_to_centralized_last5": round(last5 - central_last5, 4),
            "within_0.02_of_centralized_last5": last5 >= central_last5 - MAX_GAP,
            "above_local_only_last5": last5 > methods["local"]["validation_last5_mean"],
            "above_local_mean": scores["pooled_dice"] > local_mean,
            "rises_after_round1": scores["validation_round1"] is not None and last5 > scores["validation_round1"],
            "gap_to_centralized_selected": round(scores["pooled_dice_selected"] - central["pooled_dice_selected"], 4)}


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.centralized import SIMULATION_LABEL, train_centralized
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan, initial_weights
    from analyses.federation.simulated_site import SimulatedSite
    from domains import get_domain

    size = QUICK if quick else FULL
    torch.set_num_threads(1)  # three concurrent sites on a 2-core machine; a site's child uses one thread too
    work = Path(tempfile.mkdtemp(prefix="bench-fed-quality-"))
    try:
        cases = _fleet(size, work / "exports")
        links = [SimulatedSite(site, cases[site]) for site in SITES]
        common = {"domain": "brain_mr_segmentation", "rounds": size["rounds"], "epochs": size["epochs"],
                  "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0,
                  "min_sites": len(SITES)}
        methods: dict[str, Any] = {}
        bytes_per_round: dict[str, int] = {}
        peak_rss: dict[str, float] = {}
        seconds: dict[str, float] = {}
        priors: dict[str, Any] = {}
        for strategy in (*FEDERATED, "local"):
            plan = TrainingPlan(strategy=strategy, strategy_options={"mu": 0.01} if strategy == "fedprox" else {}, **common)
            started = time.perf_counter()
            report = Orchestrator(plan, links, work / "runs" / strategy, progress=True).run()
            seconds[strategy] = round(time.perf_counter() - started, 1)
            methods[strategy] = _scores({"history": report.history, "selection": report.selection, **report.test})
            bytes_per_round[strategy] = int(statistics.median(r["payload_bytes_sent"] for r in report.history[1:]))
            peak_rss[strategy] = report.peak_rss_mb
            priors[strategy] = report.initial_model
        for method in SGD_FEDERATED:
            plan = TrainingPlan(strategy=method.removesuffix("_sgd"), **{**common, **SGD})
            started = time.perf_counter()
            report = Orchestrator(plan, links, work / "runs" / method, progress=True).run()
            seconds[method] = round(time.perf_counter() - started, 1)
            methods[method] = _scores({"history": report.history, "selection": report.selection, **report.test})
        prior = priors["fedavg"]
        initial = initial_weights(get_domain(common["domain"]), common["seed"], prior["foreground_fraction"])
        for method, optimiser in (("centralized", {}), ("centralized_sgd", SGD)):
            started = time.perf_counter()
            centralized = train_centralized(TrainingPlan(strategy="fedavg", **{**common, **optimiser}), cases, initial,
                                            progress=True, initial_model=prior)
            seconds[method] = round(time.perf_counter() - started, 1)
            methods[method] = _scores(centralized)

        local_mean = statistics.fmean(methods["local"]["site_dice"].values())
        last5 = {m: methods[m]["validation_last5_mean"] for m in methods}
        verdicts = {strategy: _verdict(methods, strategy, "centralized", local_mean) for strategy in FEDERATED}
        verdicts.update({method: _verdict(methods, method, "centralized_sgd", local_mean) for method in SGD_FEDERATED})
        verdicts["fedbn"]["at_least_fedavg_last5"] = last5["fedbn"] >= last5["fedavg"]
        table = ", ".join(f"{m} {methods[m]['pooled_dice']:.3f}" for m in (*FEDERATED, "centralized"))
        sgd_table = ", ".join(f"{m} {methods[m]['pooled_dice']:.3f}" for m in (*SGD_FEDERATED, "centralized_sgd"))
        return {
            "params": {**size, "sites": list(SITES), "batch_size": 8, "lr": 1e-3, "optimizer": "adam",
                       "sgd_family": {"methods": [*SGD_FEDERATED, "centralized_sgd"], **SGD},
                       "fedprox_mu": 0.01, "torch_threads": 1, "centralized": SIMULATION_LABEL,
                       "train_slices_per_site": {s: sum(len(c["image"]) for c in cases[s] if c["split"] == "train")
                                                 for s in SITES}},
            "methods": methods,
            "local_mean_site_dice": round(local_mean, 4),
            "verdicts": verdicts,
            "payload_bytes_sent_per_round": bytes_per_round,
            "orchestrator_peak_rss_mb": peak_rss,
            "seconds": seconds,
            "initial_model": priors["fedavg"],
            "summary": (f"test pooled Dice, final round: {table}; local-only mean {local_mean:.3f}; "
                        f"pooled validation Dice, mean of the last {LAST} rounds: "
                        + ", ".join(f"{m} {v:.3f}" for m, v in last5.items()) + "; "
                        f"FedAvg gap to centralized {verdicts['fedavg']['gap_to_centralized']:+.3f} "
                        f"(target >= -{MAX_GAP}; rounds selected on validation "
                        f"{verdicts['fedavg']['gap_to_centralized_selected']:+.3f}); "
                        f"plain SGD (lr {SGD['lr']}): {sgd_table}, hospital-c "
                        + ", ".join(f"{m} {methods[m]['site_dice']['hospital-c']:.3f}" for m in SGD_FEDERATED) + "; "
                        f"{bytes_per_round['fedavg'] / 2**20:.2f} MiB sent per round"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
