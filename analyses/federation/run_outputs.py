"""What a training run leaves in `--out DIR`: metrics.json, metrics.csv, curves PNG, final weights.

metrics.csv is long-format, one row per (round, site) plus a "pooled" row per round, so it
loads straight into pandas or a spreadsheet; metrics.json keeps the whole history and the plan.
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
    rows = []
    for record in report.history:
        sites = sorted(set(record.get("site_metrics", {})) | set(record.get("missed", {})) | set(record.get("rejected", {})))
        for site in sites:
            status = "rejected" if site in record.get("rejected", {}) else "missed" if site in record.get("missed", {}) else (
                "trained" if site in record.get("aggregated", []) else "evaluated")
            rows.append({"strategy": report.plan.strategy, "round": record["round"], "site": site, "status": status,
                         "train_loss": record.get("train_loss", {}).get(site), **record.get("site_metrics", {}).get(site, {})})
        rows.append({"strategy": report.plan.strategy, "round": record["round"], "site": "pooled", "status": "",
                     "train_loss": None, **record.get("pooled", {})})
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
    """Training loss and `metric` per round, one line per site and the pooled value."""
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
    ax_loss.set(title="local training loss", xlabel="round", ylabel="loss")
    ax_metric.set(title=f"{metric} per site (global model)", xlabel="round", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.plan.strategy} on {report.plan.domain}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run(report: RunReport, out_dir: Path, metric: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "plan": asdict(report.plan),
        "resumed_from_round": report.resumed_from,
        "rounds_completed": report.last()["round"],
        "missed": report.missed(),
        "peak_rss_mb": report.peak_rss_mb,
        "final": {"pooled": report.last()["pooled"], "site_metrics": report.last()["site_metrics"]},
        "history": report.history,
    }
    files = {
        "metrics_json": out_dir / "metrics.json",
        "metrics_csv": out_dir / "metrics.csv",
        "curves_png": out_dir / "training_curves.png",
        "final_weights": out_dir / "final_weights.npz",
    }
    files["metrics_json"].write_text(json.dumps(summary, indent=1))
    write_csv(metric_rows(report), files["metrics_csv"])
    plot_curves(report, metric, files["curves_png"])
    np.savez(files["final_weights"], **{f"{group}::{name}": v for group, w in report.final_state.items() for name, v in w.items()})
    return files
