"""What a training run leaves in `--out DIR`: metrics.json, metrics.csv, curves PNG, weights.

The run's results are test-split scores: `best` (the weights of the round selected on pooled
validation, `selection.best_round`) and `final` (the last round's weights), each per site and
pooled, with the sites that did not answer and why. Local-only adds `cross_site`: each site's model
scored on the other sites' test splits. `left_out` lists every call a site was left out of (round,
phase, reason); `history` keeps every round's training and validation metrics and the plan;
`initial_model` says which output prior the initial model started from and which sites' counts it
pooled (None for a domain without a prior).

metrics.csv is long-format, one row per (round, site) plus a "pooled" row per round (validation),
then the test rows (`split` test, `status` "test (best, round k)" / "test (final)"), so it loads
straight into pandas or a spreadsheet. `final_weights.npz` and `best_weights.npz` hold the
strategy's weight sets ("<set>::<state name>").
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from analyses.federation.orchestrator import RunReport


def metric_rows(report: RunReport) -> list[dict[str, Any]]:
    """Validation rows per round and site (plus pooled), then the test rows of the selected and final weights."""
    rows = []
    strategy = report.plan.strategy
    for record in report.history:
        sites = sorted(set(record.get("site_metrics", {})) | set(record.get("missed", {})) | set(record.get("rejected", {})))
        split = record.get("eval_split", "")
        for site in sites:
            status = "rejected" if site in record.get("rejected", {}) else "missed" if site in record.get("missed", {}) else (
                "trained" if site in record.get("aggregated", []) else "evaluated")
            rows.append({"strategy": strategy, "round": record["round"], "site": site, "status": status,
                         "train_loss": record.get("train_loss", {}).get(site), "split": split,
                         **record.get("site_metrics", {}).get(site, {})})
        rows.append({"strategy": strategy, "round": record["round"], "site": "pooled", "status": "",
                     "train_loss": None, "split": split, **record.get("pooled", {})})
    for which in ("best", "final"):
        scores = report.test.get(which)
        if scores is None:
            continue
        status = f"test (best, round {scores['round']})" if which == "best" else "test (final)"
        for site in sorted(set(scores["site_metrics"]) | set(scores["missed"])):
            rows.append({"strategy": strategy, "round": scores["round"], "site": site,
                         "status": status if site in scores["site_metrics"] else f"{status}: missed",
                         "train_loss": None, "split": scores["split"], **scores["site_metrics"].get(site, {})})
        rows.append({"strategy": strategy, "round": scores["round"], "site": "pooled", "status": status,
                     "train_loss": None, "split": scores["split"], **scores["pooled"]})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_curves(report: RunReport, metric: str, path: Path) -> Path:
    """Training loss and validation `metric` per round, one line per site and the pooled value,
    with the round selected on validation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    sites = sorted({s for r in report.history for s in r.get("site_metrics", {})})
    for site in sites:
        rounds = [r["round"] for r in report.history if site in r.get("train_loss", {})]
        ax_loss.plot(rounds, [r["train_loss"][site] for r in report.history if site in r.get("train_loss", {})], marker="o", label=site)
        rounds = [r["round"] for r in report.history if site in r.get("site_metrics", {})]
        ax_metric.plot(rounds, [r["site_metrics"][site][metric] for r in report.history if site in r.get("site_metrics", {})], marker="o", label=site)
    pooled = [(r["round"], r["pooled"][metric]) for r in report.history if metric in r.get("pooled", {})]
    if pooled:
        ax_metric.plot(*zip(*pooled), color="black", linestyle="--", label="pooled")
    for site, last in report.plan.leave_after.items():
        ax_metric.axvline(last + 0.5, color="grey", linestyle=":", label=f"{site} leaves")
    selected = report.selection.get("best_round")
    if selected is not None:
        ax_metric.axvline(selected, color="green", linestyle="-.", alpha=0.6, label=f"selected round {selected}")
    ax_loss.set(title="local training loss", xlabel="round", ylabel="loss")
    ax_metric.set(title=f"validation {metric} per site", xlabel="round", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.plan.strategy} on {report.plan.domain}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_weights(state: dict[str, Any], path: Path) -> Path:
    np.savez(path, **{f"{group}::{name}": v for group, w in state.items() for name, v in w.items()})
    return path


def write_run(report: RunReport, out_dir: Path, metric: str) -> dict[str, Path]:
    """Write the run's files (see the module docstring); returns kind -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "plan": asdict(report.plan),
        "resumed_from_round": report.resumed_from,
        "rounds_completed": report.last()["round"],
        "metric": metric,
        "selection": report.selection,
        "initial_model": report.initial_model,
        "best": report.test.get("best"),
        "final": report.test.get("final"),
        "missed": report.missed(),
        "left_out": report.left_out(),
        "peak_rss_mb": report.peak_rss_mb,
        "history": report.history,
    }
    files = {
        "metrics_json": out_dir / "metrics.json",
        "metrics_csv": out_dir / "metrics.csv",
        "curves_png": out_dir / "training_curves.png",
        "final_weights": out_dir / "final_weights.npz",
        "best_weights": out_dir / "best_weights.npz",
    }
    files["metrics_json"].write_text(json.dumps(summary, indent=1))
    write_csv(metric_rows(report), files["metrics_csv"])
    plot_curves(report, metric, files["curves_png"])
    _save_weights(report.final_state, files["final_weights"])
    _save_weights(report.best_state or report.final_state, files["best_weights"])
    return files
