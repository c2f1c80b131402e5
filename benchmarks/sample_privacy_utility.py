"""What sample-level differential privacy (DP-SGD at each site) costs: held-out Dice against epsilon.

A larger phantom fleet than benchmarks/federated_quality.py, because DP-SGD's noise is averaged
over the batch and a batch needs samples: three scanner profiles, 40 train / 4 validation / 6 test
patients per site (48 x 48 x 12, every case with a lesion; ~480 training slices per site). FedAvg
with Adam (lr 1e-3), expected batch 32, 20 rounds of one epoch. Every site trains as a datasite
with `[privacy.sample_dp]` does (`SimulatedSite(sample_dp=...)`: the same task code,
`datasite_setup/site_tasks/dp_sgd.py`): Poisson batches, each slice's gradient clipped to 1,
Gaussian noise of noise_multiplier on each step's sum. For each target epsilon (delta 1e-5, per
site, over the whole run, RDP-composed as the site's accountant does) the noise multiplier is the
smallest that keeps every site within it at its own sampling rate. Reported: test pooled Dice
(final and validation-selected round) and the epsilon each site reports spent. One slice is the
unit of privacy; a patient's twelve slices are protected as a group, more weakly.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.federated_quality import LAST, SITES, _fleet

EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-5
MAX_GRAD_NORM = 1.0
FULL = {"matrix": 48, "n_slices": 12, "train": 40, "validation": 4, "test": 6, "rounds": 20, "epochs": 1, "max_steps": 0}
QUICK = {"matrix": 32, "n_slices": 8, "train": 4, "validation": 1, "test": 1, "rounds": 2, "epochs": 1, "max_steps": 2}
BATCH = 32
PLOT = Path(__file__).resolve().parent / "results" / "sample_privacy_utility.png"


def noise_multiplier_for(epsilon: float, rates: list[float], steps: list[int], delta: float = DELTA) -> float:
    """The smallest noise multiplier keeping every site (its sampling rate, its steps) within `epsilon`."""
    from datasite_setup.disclosure.update_accountant import composed_epsilon

    def worst(z: float) -> float:
        return max(composed_epsilon([(z, q, t)], delta) for q, t in zip(rates, steps))

    low, high = 0.3, 100.0
    for _ in range(40):
        middle = (low * high) ** 0.5
        low, high = (low, middle) if worst(middle) <= epsilon else (middle, high)
    return high


def dp_sgd_schedule(cases: dict[str, list[dict[str, Any]]], size: dict[str, int]) -> tuple[dict[str, int], list[float], list[int]]:
    """Per site: its training samples, its DP-SGD sampling rate and the steps of the whole run, as
    `site_tasks/dp_sgd.py` will count them."""
    from domains import get_domain

    domain = get_domain("brain_mr_segmentation")
    samples = {s: len(domain.training_samples([c for c in cases[s] if c["split"] == "train"])[0]) for s in SITES}
    rates = [min(1.0, BATCH / samples[s]) for s in SITES]
    per_run = [max(1, round(size["epochs"] / q)) for q in rates]
    return samples, rates, [(min(t, size["max_steps"]) if size["max_steps"] else t) * size["rounds"] for t in per_run]


def _plot(rows: dict[str, Any]) -> None:
    from analyses.figures import epsilon_axes, save_figure

    fig, ax = epsilon_axes(EPSILONS, "epsilon per site over the run (delta 1e-5, one slice = one unit)", "test pooled Dice",
                           "FedAvg, 3 phantom sites: sample-level DP-SGD")
    points = [(e, rows[f"eps{e:g}"]) for e in EPSILONS]
    ax.plot([p[0] for p in points], [p[1]["test_pooled_dice"] for p in points], marker="o", label="DP-SGD, final round")
    ax.plot([p[0] for p in points], [p[1]["test_pooled_dice_selected"] for p in points], marker="s", linestyle=":",
            label="DP-SGD, round selected on validation")
    ax.axhline(rows["no_dp"]["test_pooled_dice"], color="black", linestyle="--", label="no DP")
    ax.legend(fontsize=8)
    save_figure(fig, PLOT)


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite
    from datasite_setup.disclosure import SampleNoise
    from domains import get_domain

    size = QUICK if quick else FULL
    epsilons = (8.0,) if quick else EPSILONS
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-sample-dp-"))
    try:
        cases = _fleet(size, work / "exports")
        domain = get_domain("brain_mr_segmentation")
        samples, rates, steps = dp_sgd_schedule(cases, size)
        plan = TrainingPlan(domain=domain.name, strategy="fedavg", rounds=size["rounds"], epochs=size["epochs"],
                            batch_size=BATCH, lr=1e-3, optimizer="adam", max_steps=size["max_steps"], seed=0,
                            min_sites=len(SITES))
        rows: dict[str, Any] = {}
        arms: list[tuple[str, SampleNoise | None]] = [("no_dp", None)]
        arms += [(f"eps{e:g}", SampleNoise(noise_multiplier_for(e, rates, steps), MAX_GRAD_NORM, DELTA)) for e in epsilons]
        for name, noise in arms:
            started = time.perf_counter()
            links = [SimulatedSite(site, cases[site], sample_dp=noise) for site in SITES]
            report = Orchestrator(plan, links, work / name, progress=True).run()
            curve = [r["pooled"]["dice"] for r in report.history if "dice" in r.get("pooled", {})]
            spent = [f["dp_epsilon_spent"] for f in report.history[-1].get("update_dp", {}).get("sites", {}).values()]
            rows[name] = {"noise_multiplier": None if noise is None else round(noise.noise_multiplier, 4),
                          "test_pooled_dice": round(report.test["final"]["pooled"]["dice"], 4),
                          "test_pooled_dice_selected": round(report.test["best"]["pooled"]["dice"], 4),
                          "validation_last5_mean": round(statistics.fmean(curve[-LAST:]), 4),
                          "epsilon_spent_per_site": [round(e, 3) for e in spent],
                          "seconds": round(time.perf_counter() - started, 1)}
            print(f"  sample_privacy_utility: {name} {rows[name]}", flush=True)
        if not quick:
            _plot(rows)
        curve = ", ".join(f"eps {e:g} {rows[f'eps{e:g}']['test_pooled_dice']:.3f} (selected round "
                          f"{rows[f'eps{e:g}']['test_pooled_dice_selected']:.3f}, noise multiplier "
                          f"{rows[f'eps{e:g}']['noise_multiplier']:.2f})" for e in epsilons)
        return {
            "parameters": {**size, "sites": list(SITES), "strategy": "fedavg", "optimizer": "adam", "lr": 1e-3,
                           "expected_batch": BATCH, "max_grad_norm": MAX_GRAD_NORM, "delta": DELTA,
                           "training_slices_per_site": samples, "sampling_rates": [round(q, 4) for q in rates],
                           "steps_per_site": steps},
            "runs": rows,
            "summary": (f"FedAvg test pooled Dice with DP-SGD at every site (one slice = one unit, delta {DELTA:g}): "
                        f"{curve}; no DP {rows['no_dp']['test_pooled_dice']:.3f}"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
