"""What a training run leaves in `--out DIR`: metrics.json, metrics.csv, PNG plots, weights.

The run's results are test-split scores: `best` (the weights of the round selected on pooled
validation, `selection.best_round`) and `final` (the last round's weights), each per site and
pooled, with the sites that did not answer and why. Local-only adds `cross_site`: each site's model
scored on the other sites' test splits. `left_out` lists every call a site was left out of (round,
phase, reason); `history` keeps every round's training and validation metrics and the plan;
`initial_model` says which output prior the initial model started from and which sites' counts it
pooled (None for a domain without a prior). `onboarding` and `longevity` summarise the sites that
joined late or left early (`RunReport.onboarding`, `RunReport.longevity`); `timing` says where the
run's time went (`RunReport.timing`).

metrics.csv is long-format, one row per (round, site) plus a "pooled" row per round (validation),
with the training call's timing and bytes on the rows of the sites that trained (round totals on
the pooled row, its bytes counting every weight set moved that round, evaluations included), then the longevity rows (`split` test, `status` "longevity (left after round L)"),
then the test rows (`split` test, `status` "test (best, round k)" / "test (final)"), so it loads
straight into pandas or a spreadsheet. `final_weights.npz` and `best_weights.npz` hold the
strategy's weight sets ("<set>::<state name>").

Plots: training_curves.png (loss and validation per round), training_time.png (each site's
training call per round: compute and the rest, stacked), and when the plan has them
longevity.png (a departed site's test metric per round) and onboarding.png (a joining clinic's
validation metric against the founding sites').
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from analyses.federation.orchestrator import RunReport
from analyses.figures import JOINS, LEAVES, draw_site_rounds, mark_membership_change, pyplot, save_figure


def metric_rows(report: RunReport) -> list[dict[str, Any]]:
    """Validation rows per round and site (plus pooled, with the round's time totals), the longevity
    test rows, then the test rows of the selected and final weights."""
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
                         **record.get("site_metrics", {}).get(site, {}),
                         **record.get("train_calls", {}).get(site, {})})
        totals = {}
        if "train_calls" in record:
            totals = {"wall_seconds": record["train_seconds"], "compute_seconds": record["site_compute_seconds"],
                      "other_seconds": record["site_other_seconds"], "bytes_sent": record["payload_bytes_sent"],
                      "bytes_received": record["payload_bytes_received"]}
        rows.append({"strategy": strategy, "round": record["round"], "site": "pooled", "status": "",
                     "train_loss": None, "split": split, **record.get("pooled", {}), **totals})
    for site, summary in report.longevity().items():
        for round_no, metrics in ((r["round"], r["longevity"][site]) for r in report.history
                                  if site in r.get("longevity", {})):
            rows.append({"strategy": strategy, "round": round_no, "site": site,
                         "status": f"longevity (left after round {summary['leaves_after']})", "train_loss": None,
                         "split": summary["split"], **metrics})
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
    fig, (ax_loss, ax_metric) = pyplot().subplots(1, 2, figsize=(10, 4))
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
        mark_membership_change(ax_metric, site, last, LEAVES)
    for site, first in report.plan.join_at.items():
        mark_membership_change(ax_metric, site, first, JOINS)
    selected = report.selection.get("best_round")
    if selected is not None:
        ax_metric.axvline(selected, color="green", linestyle="-.", alpha=0.6, label=f"selected round {selected}")
    ax_loss.set(title="local training loss", xlabel="round", ylabel="loss")
    ax_metric.set(title=f"validation {metric} per site", xlabel="round", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.plan.strategy} on {report.plan.domain}")
    return save_figure(fig, path)


def plot_training_time(report: RunReport, path: Path) -> Path:
    """Per round, one bar per site that trained: the seconds its training took at the site
    (compute) under the rest of its call's wall time (waiting, transfer, sandbox start), with the
    bytes moved per round beside it, so a reader sees whether the federation waits or computes."""
    plt = pyplot()
    timed = [r for r in report.history if "train_calls" in r]
    sites = sorted({s for r in timed for s in r["train_calls"]})
    rounds = np.array([r["round"] for r in timed])
    width = 0.8 / max(len(sites), 1)
    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, site in enumerate(sites):
        x = rounds + (i - (len(sites) - 1) / 2) * width
        compute = [r["train_calls"].get(site, {}).get("compute_seconds", 0.0) for r in timed]
        other = [r["train_calls"].get(site, {}).get("other_seconds", 0.0) for r in timed]
        colour = colours[i % len(colours)]
        ax_time.bar(x, compute, width, color=colour, label=f"{site}: compute")
        ax_time.bar(x, other, width, bottom=compute, color=colour, alpha=0.35, hatch="//",
                    label=f"{site}: waiting, transfer, start")
    ax_time.set_xticks(rounds)
    ax_time.set(xlabel="round", ylabel="seconds",
                title=f"training call per site (run: {report.timing()['wall_seconds']:.1f} s wall)")
    ax_time.legend(fontsize=7)
    mib = 1024 * 1024
    ax_bytes.bar(rounds - 0.2, [r["payload_bytes_sent"] / mib for r in timed], 0.4, label="sent to sites")
    ax_bytes.bar(rounds + 0.2, [r["payload_bytes_received"] / mib for r in timed], 0.4, label="received")
    ax_bytes.set_xticks(rounds)
    ax_bytes.set(xlabel="round", ylabel="MiB", title="weights moved per round")
    ax_bytes.legend(fontsize=7)
    for ax in (ax_time, ax_bytes):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.plan.strategy}: where the training time went")
    return save_figure(fig, path)


def plot_longevity(report: RunReport, path: Path) -> Path:
    """Each departed site's test metric per round from its last training round on, with its
    departure marked and the line past which its information counts as faded."""
    metric, longevity = report.selection["metric"], report.longevity()
    fig, ax, curves = draw_site_rounds({report.plan.strategy: longevity}, "test", LEAVES, ylabel=f"test {metric}",
                                       title="Longevity: a departed site's test score, round by round")
    sign = -1 if report.selection["higher_is_better"] else 1
    for (_, site), line in curves.items():
        summary = longevity[site]
        if summary["departure_value"] is not None:
            ax.axhline(summary["departure_value"] * (1 + sign * summary["tolerance"]), color=line.get_color(),
                       linestyle="--", alpha=0.5, label=f"{site}: {summary['tolerance']:.0%} worse than at departure")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_onboarding(report: RunReport, path: Path) -> Path:
    """Each joining clinic's validation metric per round against the founding sites' pooled value,
    with its first training round and the round it reached their level marked."""
    metric, onboarding = report.selection["metric"], report.onboarding()
    fig, ax, curves = draw_site_rounds({report.plan.strategy: onboarding}, "site", JOINS, ylabel=f"validation {metric}",
                                       title="Onboarding: a joining clinic against the federation",
                                       reference="founding_pooled", reference_label="founding sites, pooled")
    for (_, site), line in curves.items():
        summary = onboarding[site]
        reached = summary["reached_round"]
        if reached is not None:
            value = summary["site"][summary["rounds"].index(reached)]
            ax.plot([reached], [value], marker="*", markersize=14, color=line.get_color(), linestyle="none",
                    label=f"{site} at the federation's level (round {reached})")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


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
        "onboarding": report.onboarding(),
        "longevity": report.longevity(),
        "timing": report.timing(),
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
    files["time_png"] = plot_training_time(report, out_dir / "training_time.png")
    if report.longevity():
        files["longevity_png"] = plot_longevity(report, out_dir / "longevity.png")
    if report.onboarding():
        files["onboarding_png"] = plot_onboarding(report, out_dir / "onboarding.png")
    _save_weights(report.final_state, files["final_weights"])
    _save_weights(report.best_state or report.final_state, files["best_weights"])
    return files
