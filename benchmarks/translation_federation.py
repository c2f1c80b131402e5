"""T1 -> T2 synthesis across hospitals: FedAvg vs FedProx vs FedMA vs local-only vs centralized.

The paired-contrast phantom fleet (`domains/mr_translation`): hospitals a, b and c train; hospital
d (another vendor, field strength and a T1 protocol blended towards proton density) is held out of
training and selection and scored as an unseen site. Each training hospital holds `train`,
`validation` and `test` patients; every method runs the same schedule (rounds x one epoch, Adam,
same seed and initial generator) through the orchestrator against simulated sites (the installed
site-task code); centralized pools the training hospitals' train splits (simulation only).

Reported per method, on held-out data only: pooled test PSNR / SSIM / MAE over the training
hospitals' test patients and at the unseen hospital (local-only: the mean of the three sites'
models there), for the round selected on pooled validation
PSNR and for the final round; per-site test PSNR and its spread across the training sites
(robustness across clients); rounds to reach the target (within 1 dB of the best pooled
validation PSNR any method reached); the validation PSNR and SSIM curves by round; FedMA's layer
widths by round; wall seconds. A figure shows mock cases (never a site's cases) translated by each
method's selected generator. The run's folder is written like `federate train --out`
(`benchmarks/results/translation_federation/`) so the report reads it.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

SITES = ("hospital-a", "hospital-b", "hospital-c")
HELD_OUT = "hospital-d"
FULL = {"matrix": 48, "n_slices": 10, "train": 8, "validation": 2, "test": 3, "rounds": 40, "epochs": 1, "batch_size": 8}
QUICK = {"matrix": 32, "n_slices": 4, "train": 2, "validation": 1, "test": 1, "rounds": 2, "epochs": 1, "batch_size": 4}
# FedMA's channel-matching threshold (cosine distance): from a shared start a few local steps move a
# channel by ~1e-3, so this is what makes channels that drifted apart at a site new global channels.
FEDMA_THRESHOLD = 0.01
STRATEGIES = {"fedavg": {}, "fedprox": {"mu": 0.01}, "fedma": {"match_threshold": FEDMA_THRESHOLD}}
METRICS = ("psnr", "ssim", "mae")
RESULTS = Path(__file__).resolve().parent / "results"
FOLDER = RESULTS / "translation_federation"


def fleet(size: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Each hospital's paired cases with their splits; the held-out hospital's are all test patients
    (plus validation ones for its curve), none of which trains."""
    from domains.mr_translation import PROFILES, phantom_records

    order = [split for split in ("train", "validation", "test") for _ in range(size[split])]
    cases = {}
    for seed, site in enumerate((*SITES, HELD_OUT)):
        records = phantom_records(PROFILES[site], len(order), seed, matrix=size["matrix"], n_slices=size["n_slices"])
        cases[site] = [{**case, "split": split} for case, split in zip(records, order)]
    return cases


def plot_curves(curves: dict[str, dict[str, list[float | None]]], path: Path) -> Path:
    """Pooled validation PSNR and SSIM per round and method."""
    from analyses.figures import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for method, by_metric in curves.items():
            values = by_metric[metric]
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=method)
        ax.set(xlabel="round", ylabel=f"pooled validation {metric.upper()}", title=f"{metric.upper()} by round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_mock_translations(weights: dict[str, tuple[dict[str, Any], dict[str, int] | None]], templates: list[dict[str, Any]],
                           path: Path) -> Path:
    """Mock cases (synthetic, made from the templates' shapes only) translated by each method's
    generator: source, target, then one column per method, at the middle slice of each case."""
    from analyses.figures import pyplot, save_figure
    from datasite_setup.model_weights import load_weights
    from domains.mr_translation import DOMAIN, preprocess_pair

    mocks = DOMAIN.mock_cases(templates, seed=7)
    columns = ["T1 (source)", "T2 (target)", *weights]
    fig, axes = pyplot().subplots(len(mocks), len(columns), figsize=(2.2 * len(columns), 2.2 * len(mocks)), squeeze=False)
    for row, case in enumerate(mocks):
        pair = preprocess_pair(case)
        middle = len(pair.source) // 2
        images = [pair.source[middle], pair.target[middle]]
        for method, (state, widths) in weights.items():
            model = DOMAIN.build_model(widths)
            load_weights(model, state)
            images.append(DOMAIN.translate(model, case)[middle])
        for col, image in enumerate(images):
            axes[row][col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
            if row == 0:
                axes[row][col].set_title(columns[col], fontsize=9)
    fig.suptitle("mock cases (synthetic) translated by each method's selected generator", fontsize=10)
    return save_figure(fig, path)


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.orchestrator import TrainingPlan
    from benchmarks.method_comparison import CENTRALIZED, drop_weight_files, rounds_to_target, run_methods, site_metric_table

    size = QUICK if quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-translation-"))
    out = work / "out" if quick else FOLDER
    if not quick:
        shutil.rmtree(out, ignore_errors=True)
    try:
        cases = fleet(size)
        plan = TrainingPlan(domain="mr_translation", strategy="fedavg", rounds=size["rounds"], epochs=size["epochs"],
                            batch_size=size["batch_size"], lr=3e-3, optimizer="adam", seed=0, min_sites=len(SITES),
                            held_out=(HELD_OUT,), name="translation")
        compared = run_methods(plan, STRATEGIES, cases, out, work / "runs", progress=not quick)
        reports, central = compared["reports"], compared["centralized_run"]
        curves = {method: {m: [r["pooled"].get(m) for r in report.history] for m in ("psnr", "ssim")}
                  for method, report in reports.items()}
        curves[CENTRALIZED] = {m: [r["pooled"].get(m) for r in central["history"]] for m in ("psnr", "ssim")}
        target = max(v for c in curves.values() for v in c["psnr"] if v is not None) - 1.0
        methods: dict[str, Any] = {}
        for method, source in [*reports.items(), (CENTRALIZED, central)]:
            best = site_metric_table(source, METRICS, "best")
            final = site_metric_table(source, METRICS, "final")
            site_psnr = [best[s]["psnr"] for s in SITES if s in best]
            methods[method] = {
                "selected_round": compared["best_round"][method],
                "test_selected": best, "test_final": final,
                "site_psnr_spread": round(statistics.pstdev(site_psnr), 3) if len(site_psnr) > 1 else None,
                "rounds_to_target": rounds_to_target(curves[method]["psnr"], target, True),
                "seconds": compared["seconds"][method],
            }
        methods["fedma"]["widths_by_round"] = [r["strategy"]["widths"] for r in reports["fedma"].history]
        plot_curves(curves, out / "psnr_ssim_curves.png")
        generators = {method if method != "local" else f"local ({SITES[0]}'s)":
                      (report.best_state.get("global") or report.best_state[f"site/{SITES[0]}"],
                       report.best_state.get("widths") and {g: int(v[0]) for g, v in report.best_state["widths"].items()})
                      for method, report in reports.items()}
        plot_mock_translations(generators, [cases[site][0] for site in (SITES[0], HELD_OUT)], out / "mock_translations.png")
        cross = compared["cross_site"]["local"]["best"]
        methods["local"]["unseen_site_psnr_by_model"] = {model: round(at[HELD_OUT], 3) for model, at in cross.items()}
        drop_weight_files(out)
        pooled = {m: methods[m]["test_selected"]["pooled"]["psnr"] for m in methods}
        unseen = {m: methods[m]["test_selected"].get("pooled (held-out sites)", {}).get("psnr") for m in methods}
        unseen["local"] = statistics.fmean(methods["local"]["unseen_site_psnr_by_model"].values())
        return {
            "parameters": {**size, "sites": list(SITES), "held_out": HELD_OUT, "lr": 3e-3, "optimizer": "adam",
                           "strategies": STRATEGIES, "target_validation_psnr": round(target, 3),
                           "local_only_note": "local: each site's own generator (pooled = each at its own site); at "
                                              "the unseen site the mean over the sites' models (its own entry is the "
                                              "untrained initial model: it has none)"},
            "methods": methods,
            "summary": "test PSNR (selected round) training sites / unseen " + HELD_OUT + ": " + ", ".join(
                f"{m} {pooled[m]:.2f}/{unseen[m]:.2f}" if unseen[m] is not None else f"{m} {pooled[m]:.2f}" for m in methods)
                + f"; FedMA widths {methods['fedma']['widths_by_round'][-1]}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
