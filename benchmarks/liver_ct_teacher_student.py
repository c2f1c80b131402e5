"""Teacher-student vs labelled-only at 25 / 50 / 100 % labelled training patients: how much expert
annotation the federation can save on the phantom CT fleet.

Same fleet, schedule and initial model as benchmarks/liver_ct_quality.py (three hospitals, FedAvg,
held-out test patients, round selected on validation). Of each site's training patients only the
first 25 % / 50 % keep their masks; the others are marked unlabelled and lose them, as a site's
not-yet-contoured scans. Labelled-only trains FedAvg on the labelled patients. Teacher-student
trains the same way up to `TEACHER_FROM_ROUND`, then each site pseudo-labels its unlabelled
patients with the round's global model before every local training (`local_train` over
`train+unlabelled`; the pseudo-labels never leave the site; voxels the teacher is less than 90 %
sure of are left out of the loss) and the student trains on both. At 100 % both are the same run.
Reported: test liver Dice (mean over patients), pooled Dice and lesion detection per share and
method, the validation curves, and a figure of test Dice against the share labelled.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.liver_ct_quality import FULL, QUICK, RESULTS, SITES, federated, fleet

SHARES = (0.25, 0.5, 1.0)


def with_labelled_share(cases: dict[str, list[dict[str, Any]]], share: float) -> dict[str, list[dict[str, Any]]]:
    """The fleet with only the first `share` of each site's training patients labelled; the others
    unlabelled and without their masks."""
    out = {}
    for site, records in cases.items():
        train = [i for i, case in enumerate(records) if case["split"] == "train"]
        keep = set(train[: max(1, math.ceil(share * len(train)))])
        out[site] = [case if case["split"] != "train" or i in keep else
                     {**{k: v for k, v in case.items() if k != "mask"}, "labelled": False} for i, case in enumerate(records)]
    return out


def _figure(results: dict[str, dict[str, Any]], path: Path) -> Path:
    from analyses.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind, marker in (("labelled_only", "o"), ("teacher_student", "s")):
        shares = sorted(float(s) for s in results[kind])
        ax.plot([100 * s for s in shares], [results[kind][str(s)]["selected"]["liver_dice"] for s in shares], marker=marker,
                label=kind.replace("_", "-"))
    ax.set_xlabel("training patients labelled (%)")
    ax.set_ylabel("test liver Dice (mean over patients)")
    ax.set_title("FedAvg, 3 phantom CT sites: annotation effort vs quality")
    ax.legend()
    return save_figure(fig, path)


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.orchestrator import TrainingPlan

    size = QUICK if quick else FULL
    teacher_from = size["rounds"] // 2 + 1
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-liver-ts-"))
    try:
        cases = fleet(size)
        common = {"domain": "liver_ct_segmentation", "strategy": "fedavg", "rounds": size["rounds"], "epochs": size["epochs"],
                  "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0,
                  "min_sites": len(SITES)}
        results: dict[str, dict[str, Any]] = {"labelled_only": {}, "teacher_student": {}}
        seconds: dict[str, float] = {}
        for share in SHARES:
            partial = with_labelled_share(cases, share)
            kinds = (("labelled_only", 0), ("teacher_student", teacher_from)) if share < 1 else (("labelled_only", 0),)
            for kind, start in kinds:
                plan = TrainingPlan(semi_supervised_from=start, **common)
                results[kind][str(share)], seconds[f"{kind}_{share}"], _ = federated(plan, partial, work / f"{kind}-{share}")
        results["teacher_student"]["1.0"] = results["labelled_only"]["1.0"]
        figure = _figure(results, RESULTS / f"liver_ct_teacher_student{'.quick' if quick else ''}.png")
        table = "; ".join(f"{int(share * 100)} %: labelled-only {results['labelled_only'][str(share)]['selected']['liver_dice']:.3f}, "
                          f"teacher-student {results['teacher_student'][str(share)]['selected']['liver_dice']:.3f}"
                          for share in SHARES)
        return {
            "params": {**size, "sites": list(SITES), "strategy": "fedavg", "shares": list(SHARES),
                       "teacher_from_round": teacher_from, "pseudo_label_confidence": 0.9},
            "results": results,
            "seconds": seconds,
            "figure": str(figure.relative_to(Path(__file__).resolve().parents[1])),
            "summary": f"test liver Dice (mean over patients, selected round): {table}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
