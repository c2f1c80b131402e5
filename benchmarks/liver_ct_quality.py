"""3-D liver CT segmentation on the phantom CT fleet: federated (FedAvg, FedProx) vs local-only vs
centralized on held-out test patients.

Setup: three hospitals of the phantom CT fleet (`domains/liver_ct_segmentation/phantom.py`:
SIEMENS smooth kernel 3 mm portal-venous, GE 5 mm low-dose portal-venous, Philips sharp kernel
2.5 mm arterial), each with `train`, `validation` and `test` patients fixed by case order. The
sites train the 3-D U-Net on class-balanced patches of their `train` patients; every round is
scored on `validation` to select a round; every figure below is on `test`, which neither training
nor selection saw, with the programme's metrics: liver Dice, sensitivity and specificity per
patient averaged over the test patients, the pooled voxel Dice, mean liver HD95, lesion Dice and
patient-level lesion detection (sensitivity / specificity / F1). Sites are simulated in this
process (`SimulatedSite`: the installed site-task code); benchmarks/liver_ct_patch_throughput.py
measures the live datasite path.

Same schedule, seed and initial model for every method; centralized trains on the pooled training
patients with the step budget of the whole federation. Verdicts: federated within 0.02 liver Dice
(per-patient mean, test split, round selected on validation) of centralized, and above the mean of
the local-only models.

A figure sets the methods' test liver Dice side by side. benchmarks/liver_ct_teacher_student.py
uses the same fleet and schedule for the annotation-effort question.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SITES = ("hospital-a", "hospital-b", "hospital-c")
FULL = {"train": 8, "validation": 2, "test": 4, "rounds": 24, "epochs": 2, "max_steps": 0}
QUICK = {"train": 2, "validation": 1, "test": 1, "rounds": 2, "epochs": 1, "max_steps": 2}
SPLITS = ("train", "validation", "test")
MAX_GAP = 0.02
REPORTED = ("liver_dice", "liver_sensitivity", "liver_specificity", "liver_dice_pooled", "liver_hd95_mm", "lesion_dice",
            "detection_sensitivity", "detection_specificity", "detection_f1")
RESULTS = Path(__file__).resolve().parent / "results"


def fleet(size: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Phantom CT cases per site with their split, in case order."""
    from domains.liver_ct_segmentation.phantom import phantom_fleet

    order = [split for split in SPLITS for _ in range(size[split])]
    by_site = phantom_fleet(len(order), seed=seed, profiles=SITES)
    return {site: [{**case, "split": split} for case, split in zip(records, order)] for site, records in by_site.items()}


def scores(run: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the validation-selected and the final weights, and the validation curve."""
    best, final = run["best"], run["final"]
    return {
        "best_round": run["selection"]["best_round"],
        "selected": {k: round(best["pooled"][k], 4) for k in REPORTED if k in best["pooled"]},
        "final": {k: round(final["pooled"][k], 4) for k in REPORTED if k in final["pooled"]},
        "site_liver_dice_selected": {s: round(m["liver_dice"], 4) for s, m in sorted(best["site_metrics"].items())},
        "validation_liver_dice_per_round": [round(r["pooled"]["liver_dice"], 4) for r in run["history"]
                                            if "liver_dice" in r.get("pooled", {})],
    }


def federated(plan: Any, cases: dict[str, list[dict[str, Any]]], out: Path) -> tuple[dict[str, Any], float, float]:
    from analyses.federation.orchestrator import Orchestrator
    from analyses.federation.simulated_site import SimulatedSite

    started = time.perf_counter()
    report = Orchestrator(plan, [SimulatedSite(site, cases[site]) for site in SITES], out, progress=True).run()
    return (scores({"history": report.history, "selection": report.selection, **report.test}),
            round(time.perf_counter() - started, 1), report.peak_rss_mb)


def _figure(methods: dict[str, Any], path: Path) -> Path:
    from analyses.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = list(methods)
    ax.bar(names, [methods[m]["selected"]["liver_dice"] for m in names], color="tab:blue")
    ax.set_ylabel("test liver Dice (mean over patients)")
    ax.set_ylim(0, 1)
    ax.set_title("phantom CT fleet, 3 sites, round selected on validation")
    return save_figure(fig, path)


def run(quick: bool) -> dict[str, Any]:
    import torch

    size = QUICK if quick else FULL
    torch.set_num_threads(1)  # three concurrent sites on a 2-core machine
    work = Path(tempfile.mkdtemp(prefix="bench-liver-ct-"))
    try:
        return _compare(size, fleet(size), work, quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(size: dict[str, int], cases: dict[str, list[dict[str, Any]]], work: Path, quick: bool) -> dict[str, Any]:
    from analyses.federation.centralized import train_centralized
    from analyses.federation.orchestrator import TrainingPlan, initial_weights
    from domains import get_domain

    common = {"domain": "liver_ct_segmentation", "rounds": size["rounds"], "epochs": size["epochs"], "batch_size": 8,
              "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0, "min_sites": len(SITES)}
    methods: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    peak_rss: dict[str, float] = {}
    for strategy, options in (("fedavg", {}), ("fedprox", {"mu": 0.01}), ("local", {})):
        plan = TrainingPlan(strategy=strategy, strategy_options=options, **common)
        methods[strategy], seconds[strategy], peak_rss[strategy] = federated(plan, cases, work / strategy)
    initial = initial_weights(get_domain(common["domain"]), common["seed"])
    started = time.perf_counter()
    methods["centralized"] = scores(train_centralized(TrainingPlan(strategy="fedavg", **common), cases, initial, progress=True))
    seconds["centralized"] = round(time.perf_counter() - started, 1)

    central = methods["centralized"]["selected"]["liver_dice"]
    local_mean = statistics.fmean(methods["local"]["site_liver_dice_selected"].values())
    verdicts = {m: {"gap_to_centralized": round(methods[m]["selected"]["liver_dice"] - central, 4),
                    "within_0.02_of_centralized": methods[m]["selected"]["liver_dice"] >= central - MAX_GAP,
                    "above_local_only_mean": methods[m]["selected"]["liver_dice"] > local_mean}
                for m in ("fedavg", "fedprox")}
    figure = _figure(methods, RESULTS / f"liver_ct_quality{'.quick' if quick else ''}.png")
    table = ", ".join(f"{m} {methods[m]['selected']['liver_dice']:.3f}" for m in methods)
    fedavg = methods["fedavg"]["selected"]
    return {
        "params": {**size, "sites": list(SITES), "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "fedprox_mu": 0.01,
                   "torch_threads": 1, "patch_size": list(get_domain(common["domain"]).sampling.patch_size),
                   "target_spacing_mm": list(get_domain(common["domain"]).preprocessing.target_spacing_mm)},
        "methods": methods,
        "local_mean_site_liver_dice": round(local_mean, 4),
        "verdicts": verdicts,
        "seconds": seconds,
        "orchestrator_peak_rss_mb": peak_rss,
        "figure": str(figure.relative_to(Path(__file__).resolve().parents[1])),
        "summary": (f"test liver Dice (mean over patients, selected round): {table}; local-only mean {local_mean:.3f}; "
                    f"FedAvg gap to centralized {verdicts['fedavg']['gap_to_centralized']:+.3f}, FedProx "
                    f"{verdicts['fedprox']['gap_to_centralized']:+.3f} (target >= -{MAX_GAP}); FedAvg per patient: "
                    f"sensitivity {fedavg['liver_sensitivity']:.3f}, specificity {fedavg['liver_specificity']:.3f}, "
                    f"lesion detection F1 {fedavg['detection_f1']:.3f}"),
    }
