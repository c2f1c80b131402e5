"""What harmonization does to segmentation, with and without differential privacy.

The phantom fleet of benchmarks/sample_privacy_utility.py (three scanner profiles that differ in
vendor, field strength, intensity scale, bias field and noise; 40 training / 4 validation / 6
test patients per site, 48 x 48 x 12). FedAvg (Adam, lr 1e-3), 20 rounds of one epoch, expected
batch 32. Four ways to meet the scanners' differences, each trained and scored on the sites' own
images mapped the same way:

- raw: the images as they are, no intensity augmentation;
- Nyul, fitted centrally (simulation only): the original Nyul-Udupa scale, every training image's
  landmarks rescaled and averaged over the pooled training images of all sites;
- Nyul, fitted federatedly: the sites' `intensity_landmarks` (mean landmarks per site) averaged,
  as `federate train --harmonize nyul` does (`analyses/harmonization/nyul.py`);
- standard intensity augmentation: raw images, the domain's scanner augmentation (bias field,
  contrast, noise, flips; `domains/brain_mr_segmentation/augmentation.py`).

Each without DP and with DP-SGD at every site (`[privacy.sample_dp]`, epsilon 4 per site at delta
1e-5, one slice the unit). The Nyul landmarks themselves are released as plain aggregates (means
and variances of percentiles over a site's cases), outside the DP accounting. Reported: per-site
and pooled test Dice (final round and the round selected on validation).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.federated_quality import LAST, SITES, _fleet
from benchmarks.sample_privacy_utility import BATCH, DELTA, FULL, MAX_GRAD_NORM, QUICK, dp_sgd_schedule, noise_multiplier_for

EPSILON = 4.0
METHODS = ("raw", "nyul_central", "nyul_federated", "augmentation")


def central_nyul_scale(cases: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The original Nyul-Udupa scale over every training image of every site, pooled (simulation)."""
    from analyses.harmonization.nyul import case_landmarks, fit_standard_scale, site_landmark_summary

    per_image = {f"{site}/{i}": site_landmark_summary([case_landmarks(case["image"], None)])
                 for site in SITES for i, case in enumerate(c for c in cases[site] if c["split"] == "train")}
    return fit_standard_scale(per_image).to_params()


PLOT = Path(__file__).resolve().parent / "results" / "harmonization_segmentation.png"


def _plot(rows: dict[str, Any]) -> None:
    """Per-site test Dice (final round) of each method, without and with DP, as grouped bars."""
    import numpy as np

    from analyses.figures import pyplot, save_figure

    plt = pyplot()
    privacies = sorted({name.split("/")[1] for name in rows}, key=lambda p: p != "no_dp")
    fig, axes = plt.subplots(1, len(privacies), figsize=(11, 4), sharey=True)
    for ax, privacy in zip(np.atleast_1d(axes), privacies):
        sites = list(rows[f"{METHODS[0]}/{privacy}"]["test_site_dice"])
        for i, method in enumerate(METHODS):
            values = [rows[f"{method}/{privacy}"]["test_site_dice"][s] for s in sites]
            ax.bar(np.arange(len(sites)) + (i - 1.5) * 0.2, values, width=0.2, label=method)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_title("no DP" if privacy == "no_dp" else f"DP-SGD, {privacy.removeprefix('dp_')}")
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("test Dice (final round)")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("FedAvg on 3 phantom scanners: raw vs Nyul (central, federated) vs intensity augmentation")
    save_figure(fig, PLOT)


def method_options(cases: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each method's plan options; "nyul_central" carries the pooled scale, fitted here."""
    return {"raw": {"no_augmentation": True},
            "nyul_central": {"no_augmentation": True, "harmonize": "nyul", "nyul_scale": central_nyul_scale(cases)},
            "nyul_federated": {"no_augmentation": True, "harmonize": "nyul"},
            "augmentation": {}}


def train_arms(cases: dict[str, list[dict[str, Any]]], size: dict[str, int], work: Path, options: dict[str, dict[str, Any]],
               methods: tuple[str, ...], epsilons: tuple[float | None, ...], progress: bool) -> dict[str, Any]:
    """FedAvg for every method (its plan `options`) at every epsilon (None: no DP), scored on the test
    split: "method/privacy" -> scores."""
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite
    from datasite_setup.disclosure import SampleNoise

    schedule = dp_sgd_schedule(cases, size)[1:]
    common = {"domain": "brain_mr_segmentation", "strategy": "fedavg", "rounds": size["rounds"], "epochs": size["epochs"],
              "batch_size": BATCH, "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0,
              "min_sites": len(SITES)}
    rows: dict[str, Any] = {}
    for epsilon in epsilons:
        noise = None if epsilon is None else SampleNoise(noise_multiplier_for(epsilon, *schedule), MAX_GRAD_NORM, DELTA)
        privacy = "no_dp" if epsilon is None else f"dp_eps{epsilon:g}"
        for method in methods:
            name = f"{method}/{privacy}"
            started = time.perf_counter()
            links = [SimulatedSite(site, cases[site], sample_dp=noise) for site in SITES]
            report = Orchestrator(TrainingPlan(**common, **options[method]), links, work / name.replace("/", "_"),
                                  progress=progress).run()
            curve = [r["pooled"]["dice"] for r in report.history if "dice" in r.get("pooled", {})]
            final, best = report.test["final"], report.test["best"]
            rows[name] = {"noise_multiplier": None if noise is None else round(noise.noise_multiplier, 4),
                          "test_pooled_dice": round(final["pooled"]["dice"], 4),
                          "test_pooled_dice_selected": round(best["pooled"]["dice"], 4),
                          "test_site_dice": {s: round(m["dice"], 4) for s, m in sorted(final["site_metrics"].items())},
                          "test_site_dice_selected": {s: round(m["dice"], 4) for s, m in sorted(best["site_metrics"].items())},
                          "validation_last5_mean": round(statistics.fmean(curve[-LAST:]), 4),
                          "seconds": round(time.perf_counter() - started, 1)}
            print(f"  harmonization: {name} {rows[name]['test_pooled_dice']:.3f} {rows[name]['test_site_dice']}", flush=True)
    return rows


def run(quick: bool) -> dict[str, Any]:
    import torch

    size = QUICK if quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-harmonization-"))
    try:
        cases = _fleet(size, work / "exports")
        options = method_options(cases)
        rows = train_arms(cases, size, work, options, METHODS, (None, EPSILON), progress=not quick)
        if not quick:
            _plot(rows)
        table = "; ".join(f"{privacy}: " + ", ".join(f"{m} {rows[f'{m}/{privacy}']['test_pooled_dice']:.3f}" for m in METHODS)
                          for privacy in ("no_dp", f"dp_eps{EPSILON:g}"))
        return {
            "parameters": {**size, "sites": list(SITES), "strategy": "fedavg", "optimizer": "adam", "lr": 1e-3,
                           "expected_batch": BATCH, "dp": {"epsilon": EPSILON, "delta": DELTA, "max_grad_norm": MAX_GRAD_NORM},
                           "central_nyul_scale": options["nyul_central"]["nyul_scale"]},
            "runs": rows,
            "summary": f"FedAvg test pooled Dice (final round) by harmonization: {table}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
