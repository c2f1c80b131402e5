"""The harmonization experiment against epsilon: raw, Nyul (federated) and intensity augmentation
with DP-SGD at epsilon 1 and 8 per site, beside `harmonization_segmentation`'s no-DP and epsilon-4
runs (same fleet, schedule and seed; Nyul fitted centrally is left out: it matched the federated
fit there). Together they give each method's test Dice against epsilon."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.federated_quality import _fleet
from benchmarks.harmonization_segmentation import method_options, train_arms
from benchmarks.sample_privacy_utility import FULL, QUICK

METHODS = ("raw", "nyul_federated", "augmentation")
EPSILONS = (1.0, 8.0)
RESULTS = Path(__file__).resolve().parent / "results"
PLOT = RESULTS / "harmonization_privacy_curve.png"


def _plot(rows: dict[str, Any]) -> None:
    """Test Dice against epsilon per method, each method's no-DP value as a dashed line."""
    from analyses.figures import epsilon_axes, save_figure

    fig, ax = epsilon_axes((1.0, 4.0, 8.0), "epsilon per site (DP-SGD, delta 1e-5); dashed: no DP",
                           "test pooled Dice (final round)", "Harmonization under DP-SGD, FedAvg, 3 phantom sites")
    for method in METHODS:
        points = sorted((float(name.split("/dp_eps")[1]), row["test_pooled_dice"]) for name, row in rows.items()
                        if name.startswith(f"{method}/dp_eps"))
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)[0]
        if f"{method}/no_dp" in rows:
            ax.axhline(rows[f"{method}/no_dp"]["test_pooled_dice"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.legend(fontsize=8)
    save_figure(fig, PLOT)


def run(quick: bool) -> dict[str, Any]:
    import torch

    size = QUICK if quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-harmonization-curve-"))
    try:
        cases = _fleet(size, work / "exports")
        options = method_options(cases)
        rows = train_arms(cases, size, work, options, METHODS, EPSILONS, progress=not quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    earlier = RESULTS / "harmonization_segmentation.json"
    combined = dict(rows)
    if not quick and earlier.is_file():
        combined.update({name: row for name, row in json.loads(earlier.read_text())["runs"].items()
                         if name.split("/")[0] in METHODS})
        _plot(combined)
    curve = "; ".join(f"{m}: " + ", ".join(f"eps {e:g} {rows[f'{m}/dp_eps{e:g}']['test_pooled_dice']:.3f}" for e in EPSILONS)
                      for m in METHODS)
    return {"parameters": {**size, "methods": list(METHODS), "epsilons": list(EPSILONS)}, "runs": rows,
            "summary": f"FedAvg test pooled Dice with DP-SGD by harmonization: {curve}"}
