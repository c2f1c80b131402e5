"""What client-level differential privacy on model updates costs: held-out Dice against epsilon.

The phantom fleet of benchmarks/federated_quality.py (three scanner profiles, 6 train / 3
validation / 4 test patients per site, 48 x 48 x 12), FedAvg with Adam as there. Every site noises
its updates as a datasite with `[privacy.update_dp]` does (`SimulatedSite(update_dp=...)`: the same
filter, `datasite_setup.disclosure.update_noise`): the update is clipped to C and Gaussian noise of
standard deviation noise_multiplier * C is added to each of the model's ~121 k weights. For each
target epsilon (delta 1e-5, over all the rounds, RDP-composed as the site's accountant does) the
noise multiplier is the smallest that keeps the run within it; C is swept, and for each epsilon the
C whose run has the best validation Dice (the last-5-round mean) is reported with its test Dice,
so the choice of C sees no test case. Reference arms: no DP, and clipping alone (noise multiplier
1e-9) at each C, which separates what clipping costs from what the noise costs.

Expected from the arithmetic, and what the figure shows: with three sites the noise per weight
(noise_multiplier * C, 5-10 C at these epsilons) dwarfs an update's share per weight
(C / sqrt(121 k) ~ C / 350), so client-level DP, which protects a whole site's data, leaves nothing
to learn at any useful epsilon; it needs hundreds of clients to average the noise away (McMahan et
al. 2018). Protecting patients at a site with three peers calls for sample-level DP-SGD instead.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.federated_quality import FULL, LAST, QUICK, SITES, _fleet

EPSILONS = (1.0, 4.0, 8.0, 64.0)
CLIPS = (0.01, 0.1, 1.0)
DELTA = 1e-5
FULL_ROUNDS = 30
PLOT = Path(__file__).resolve().parent / "results" / "update_privacy_utility.png"


def noise_multiplier_for(epsilon: float, rounds: int, delta: float = DELTA) -> float:
    """The smallest site noise multiplier whose `rounds` releases compose to at most `epsilon`."""
    from datasite_setup.disclosure import UpdateNoise
    from datasite_setup.disclosure.update_accountant import composed_epsilon

    def spent(z: float) -> float:
        return composed_epsilon([(UpdateNoise(z, 1.0, delta).release_multiplier(), 1.0, rounds)], delta)

    low, high = 1e-3, 1e3
    for _ in range(60):
        middle = (low * high) ** 0.5
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high


def _arm(links_for: Any, plan: Any, work: Path, name: str) -> dict[str, Any]:
    from analyses.federation.orchestrator import Orchestrator

    started = time.perf_counter()
    report = Orchestrator(plan, links_for(), work / name, progress=False).run()
    curve = [r["pooled"]["dice"] for r in report.history if "dice" in r.get("pooled", {})]
    spent = [f["dp_epsilon_spent"] for r in report.history[-1:] for f in r.get("update_dp", {}).get("sites", {}).values()]
    return {"test_pooled_dice": round(report.test["final"]["pooled"]["dice"], 4),
            "test_pooled_dice_selected": round(report.test["best"]["pooled"]["dice"], 4),
            "validation_last5_mean": round(statistics.fmean(curve[-LAST:]), 4),
            "epsilon_spent_per_site": round(max(spent), 3) if spent else None,
            "seconds": round(time.perf_counter() - started, 1)}


def _plot(rows: dict[str, Any], no_dp: float) -> None:
    from analyses.figures import epsilon_axes, save_figure

    fig, ax = epsilon_axes(EPSILONS, "epsilon over the run (delta 1e-5, per site)", "test pooled Dice (final round)",
                           "FedAvg, 3 phantom sites: client-level DP on updates")
    for clip in CLIPS:
        points = [(e, rows[f"eps{e:g}_clip{clip:g}"]["test_pooled_dice"]) for e in EPSILONS]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"clip C = {clip:g}")
    ax.axhline(no_dp, color="black", linestyle="--", label="no DP")
    ax.legend(fontsize=8)
    save_figure(fig, PLOT)


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.orchestrator import TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite
    from datasite_setup.disclosure import UpdateNoise

    size = QUICK if quick else FULL
    rounds = size["rounds"] if quick else FULL_ROUNDS
    epsilons, clips = ((8.0,), (0.1,)) if quick else (EPSILONS, CLIPS)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-update-dp-"))
    try:
        cases = _fleet(size, work / "exports")
        common = {"domain": "brain_mr_segmentation", "strategy": "fedavg", "rounds": rounds, "epochs": size["epochs"],
                  "batch_size": 8, "lr": 1e-3, "optimizer": "adam", "max_steps": size["max_steps"], "seed": 0,
                  "min_sites": len(SITES)}

        def links(noise: UpdateNoise | None) -> Any:
            return lambda: [SimulatedSite(site, cases[site], update_dp=noise) for site in SITES]

        multipliers = {e: noise_multiplier_for(e, rounds) for e in epsilons}
        rows: dict[str, Any] = {"no_dp": _arm(links(None), TrainingPlan(**common), work, "no_dp")}
        print(f"  update_privacy_utility: no DP {rows['no_dp']['test_pooled_dice']:.3f}", flush=True)
        for clip in clips:
            name = f"clip_only_clip{clip:g}"
            rows[name] = _arm(links(UpdateNoise(1e-9, clip, DELTA)), TrainingPlan(**common), work, name)
            print(f"  update_privacy_utility: {name} {rows[name]['test_pooled_dice']:.3f}", flush=True)
            for epsilon in epsilons:
                name = f"eps{epsilon:g}_clip{clip:g}"
                rows[name] = {"noise_multiplier": round(multipliers[epsilon], 4), "clip": clip, "target_epsilon": epsilon,
                              **_arm(links(UpdateNoise(multipliers[epsilon], clip, DELTA)), TrainingPlan(**common), work, name)}
                print(f"  update_privacy_utility: {name} {rows[name]['test_pooled_dice']:.3f}", flush=True)
        chosen = {}
        for epsilon in epsilons:
            best = max(clips, key=lambda c: rows[f"eps{epsilon:g}_clip{c:g}"]["validation_last5_mean"])
            row = rows[f"eps{epsilon:g}_clip{best:g}"]
            chosen[f"{epsilon:g}"] = {"clip": best, "test_pooled_dice": row["test_pooled_dice"],
                                      "noise_multiplier": row["noise_multiplier"]}
        if not quick:
            _plot(rows, rows["no_dp"]["test_pooled_dice"])
        curve = ", ".join(f"eps {e} {c['test_pooled_dice']:.3f} (C {c['clip']:g})" for e, c in chosen.items())
        return {
            "parameters": {**{k: v for k, v in size.items() if k != "rounds"}, "rounds": rounds, "sites": list(SITES),
                           "strategy": "fedavg", "optimizer": "adam", "lr": 1e-3, "delta": DELTA,
                           "epsilons": list(epsilons), "clips": list(clips), "weights": 121033},
            "runs": rows,
            "chosen_clip_per_epsilon": chosen,
            "summary": (f"FedAvg test pooled Dice with client-level DP on every site's updates (C chosen on validation): "
                        f"{curve}; no DP {rows['no_dp']['test_pooled_dice']:.3f}; clipping alone "
                        + ", ".join(f"C {c:g} {rows[f'clip_only_clip{c:g}']['test_pooled_dice']:.3f}" for c in clips)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
