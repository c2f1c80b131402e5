"""Teacher-student vs labelled-only at 25 / 50 / 100 % labelled training patients: how much expert
annotation the federation can save on the phantom CT fleet.

Same fleet, schedule and initial model as benchmarks/liver_ct_quality.py (three hospitals, FedAvg,
held-out test patients, round selected on validation). Of each site's training patients only the
first 25 % / 50 % keep their masks; the others are marked unlabelled and lose them, as a site's
not-yet-contoured scans. Five arms per share:

- labelled-only: FedAvg on the labelled patients, the same rounds and epochs as every other arm;
- labelled-only, equal steps: the same with more epochs per round, so that it takes as many
  optimiser steps as teacher-student does (whose rounds also step through pseudo-labelled
  patients): the gain of teacher-student is then not just more training;
- labelled-only, long: 5x the epochs per round, at every share: how far labelled patients alone
  go when training is not what limits them (the converged annotation curve);
- teacher-student: labelled-only up to `TEACHER_FROM_ROUND`, then every site also trains on its
  unlabelled patients, pseudo-labelled at the site by the teacher - the round selected on
  validation so far, sent beside the weights and held fixed until a round validates better
  (`local_train` over `train+unlabelled` with `teacher`; the pseudo-labels never leave the site;
  the largest connected liver is kept and voxels the teacher is less than 90 % sure of are left
  out of the loss);
- teacher-student, same epochs: teacher-student with the equal-steps arm's epochs per round, so
  that its teacher is the better one those epochs train, compared with labelled-only at the same
  epochs.

At 100 % the equal-steps and teacher-student arms are the labelled-only run. Reported: test liver Dice (mean over patients), pooled Dice,
HD95 and lesion detection per share and arm, the validation curves, the teacher's rounds and a
figure of test Dice against the share labelled.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.liver_ct_quality import FULL, QUICK, RESULTS, SITES, federated, fleet

SHARES = (0.25, 0.5, 1.0)
ARMS = ("labelled_only", "labelled_only_equal_steps", "labelled_only_long", "teacher_student", "teacher_student_same_epochs")
LONG = 5  # the long arm's epochs per round, as a multiple of the schedule's


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


def equal_step_epochs(epochs: int, rounds: int, teacher_from: int, share: float) -> int:
    """Epochs per round that give labelled-only (the labelled share's patients every round) the
    optimiser steps of teacher-student (the labelled share until `teacher_from`, every training
    patient after), rounded to the nearest epoch."""
    teacher_rounds, student_rounds = teacher_from - 1, rounds - teacher_from + 1
    return max(epochs, round(epochs * (teacher_rounds + student_rounds / share) / rounds))


def _figure(results: dict[str, dict[str, Any]], path: Path) -> Path:
    from analyses.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arm, marker in zip(ARMS, ("o", "^", "D", "s", "v")):
        shares = sorted(float(s) for s in results[arm])
        ax.plot([100 * s for s in shares], [results[arm][str(s)]["selected"]["liver_dice"] for s in shares], marker=marker,
                label=arm.replace("_", " "))
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
        common = {"domain": "liver_ct_segmentation", "strategy": "fedavg", "rounds": size["rounds"], "batch_size": 8,
                  "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0, "min_sites": len(SITES)}
        results: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
        seconds: dict[str, float] = {}
        epochs_used: dict[str, int] = {}
        for share in SHARES:
            partial = with_labelled_share(cases, share)
            arms = {"labelled_only": {"epochs": size["epochs"]}, "labelled_only_long": {"epochs": LONG * size["epochs"]}}
            if share < 1:
                more = equal_step_epochs(size["epochs"], size["rounds"], teacher_from, share)
                arms["labelled_only_equal_steps"] = {"epochs": more}
                arms["teacher_student"] = {"epochs": size["epochs"], "semi_supervised_from": teacher_from}
                arms["teacher_student_same_epochs"] = {"epochs": more, "semi_supervised_from": teacher_from}
            for arm, options in arms.items():
                plan = TrainingPlan(**common, **options)
                out = work / f"{arm}-{share}"
                results[arm][str(share)], seconds[f"{arm}_{share}"], _ = federated(plan, partial, out)
                epochs_used[f"{arm}_{share}"] = options["epochs"]
                if arm.startswith("teacher_student"):
                    results[arm][str(share)]["teacher_round_per_round"] = _teacher_rounds(out)
        for arm in ("labelled_only_equal_steps", "teacher_student", "teacher_student_same_epochs"):
            results[arm]["1.0"] = results["labelled_only"]["1.0"]
        figure = _figure(results, RESULTS / f"liver_ct_teacher_student{'.quick' if quick else ''}.png")
        table = "; ".join(f"{int(share * 100)} %: " + ", ".join(
            f"{arm.replace('_', ' ')} {results[arm][str(share)]['selected']['liver_dice']:.3f}" for arm in ARMS
            if arm != "labelled_only_long")
            for share in SHARES[:-1])
        long = ", ".join(f"{int(share * 100)} % {results['labelled_only_long'][str(share)]['selected']['liver_dice']:.3f}"
                         for share in SHARES)
        return {
            "params": {**size, "sites": list(SITES), "strategy": "fedavg", "shares": list(SHARES),
                       "teacher_from_round": teacher_from, "teacher": "round selected on validation so far",
                       "pseudo_label_confidence": 0.9, "pseudo_label_largest_component": True, "epochs": epochs_used},
            "results": results,
            "seconds": seconds,
            "figure": str(figure.relative_to(Path(__file__).resolve().parents[1])),
            "summary": (f"test liver Dice (mean over patients, selected round): {table}; 100 % labelled "
                        f"{results['labelled_only']['1.0']['selected']['liver_dice']:.3f}; labelled-only with "
                        f"{LONG}x the epochs: {long}"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _teacher_rounds(out: Path) -> list[int | None]:
    """Which round taught each training round of a finished run (from its checkpoint)."""
    from analyses.federation.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(out / "checkpoint")
    return [record.get("teacher_round") for record in checkpoint.history[1:]] if checkpoint else []
