"""The data scientist's training API (what `federate train` and the notebooks call).

    plans = [TrainingPlan(domain="brain_mr_segmentation", strategy=s, rounds=5) for s in ("fedavg", "fedprox")]
    submit(federation, plans)            # sends the thin requests; admins approve once
    reports = {p.strategy: train(federation, p, out / p.strategy) for p in plans}
    compare(reports, out, centralized=...)   # federated vs local-only vs centralized, per site

Local-only is a plan with strategy "local" (it runs through the sites like any other);
centralized is a simulation on pooled phantom data (see `centralized.py`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from analyses.federation.orchestrator import Orchestrator, RunReport, TrainingPlan
from analyses.federation.run_outputs import write_csv
from analyses.federation.site_link import DatasiteLink
from analyses.federation_file import Federation

TASKS = ("local_train", "evaluate")


class AwaitingApproval(RuntimeError):
    """Some site has not approved (or has denied) the run's requests; `statuses` says which."""

    def __init__(self, statuses: dict[str, dict[str, str | None]]) -> None:
        self.statuses = statuses
        waiting = [f"{site}: {task} {status or 'not sent'}" for site, tasks in statuses.items()
                   for task, status in tasks.items() if status != "approved"]
        super().__init__("waiting for the sites' admins: " + "; ".join(waiting))


def links_for(federation: Federation, plan: TrainingPlan) -> list[DatasiteLink]:
    return [DatasiteLink(entry, plan.label) for entry in federation.datasites]


def submit(federation: Federation, plans: list[TrainingPlan]) -> dict[str, dict[str, str]]:
    """Send every plan's requests to every site (idempotent); returns "<site>" -> "<task>@<label>" -> status."""
    statuses: dict[str, dict[str, str]] = {}
    for plan in plans:
        for link in links_for(federation, plan):
            for task, status in link.ensure_requests(plan.budgets()).items():
                statuses.setdefault(link.name, {})[f"{task}@{plan.label}"] = status
    return statuses


def approval_statuses(federation: Federation, plan: TrainingPlan) -> dict[str, dict[str, str | None]]:
    return {link.name: link.statuses(list(TASKS)) for link in links_for(federation, plan)}


def train(federation: Federation, plan: TrainingPlan, out_dir: Path, progress: bool = True) -> RunReport:
    """Run (or resume) one plan across the federation; raises AwaitingApproval before any round
    if a reachable site has not approved. An unreachable site is left to the orchestrator, which
    records it as missing its rounds."""
    links = links_for(federation, plan)
    statuses: dict[str, dict[str, str | None]] = {}
    reachable = []
    for link in links:
        try:
            statuses[link.name] = link.statuses(list(TASKS))
        except Exception:  # a site that is down now may answer later rounds
            continue
        reachable.append(link)
    if any(s != "approved" for tasks in statuses.values() for s in tasks.values()):
        raise AwaitingApproval(statuses)
    if len(reachable) < min(plan.min_sites, len(links)):
        raise RuntimeError(f"only {len(reachable)} of {len(links)} sites answer; min_sites is {plan.min_sites}")
    return Orchestrator(plan, links, out_dir, progress=progress).run()


def local_plan(plan: TrainingPlan) -> TrainingPlan:
    """The local-only baseline of `plan`: same schedule, no aggregation."""
    return replace(plan, strategy="local", strategy_options={}, name=f"{plan.name}_local" if plan.name else "")


def compare(reports: dict[str, RunReport], out_dir: Path, metric: str,
            centralized: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Final `metric` per site for every method, as JSON, CSV and a grouped bar chart PNG.

    For "local" each site is scored with its own model; federated strategies score the global
    model (FedBN: with that site's own normalisation layers)."""
    table: dict[str, dict[str, float]] = {}
    for method, report in reports.items():
        final = report.last()
        table[method] = {site: m[metric] for site, m in final["site_metrics"].items()}
        table[method]["pooled"] = final["pooled"].get(metric, float("nan"))
    if centralized is not None:
        final = centralized[-1]
        table["centralized (simulation)"] = {**{s: m[metric] for s, m in final["site_metrics"].items()},
                                             "pooled": final["pooled"][metric]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps({"metric": metric, "final": table}, indent=1))
    rows = [{"method": method, "site": site, metric: value} for method, sites in table.items() for site, value in sites.items()]
    write_csv(rows, out_dir / "comparison.csv")
    _plot_comparison(table, metric, out_dir / "comparison.png")
    return table


def _plot_comparison(table: dict[str, dict[str, float]], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(table)
    sites = sorted({s for values in table.values() for s in values}, key=lambda s: (s == "pooled", s))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(sites)), 4))
    for i, method in enumerate(methods):
        ax.bar(np.arange(len(sites)) + i * width, [table[method].get(s, np.nan) for s in sites], width, label=method)
    ax.set_xticks(np.arange(len(sites)) + width * (len(methods) - 1) / 2, sites)
    ax.set(ylabel=metric, title=f"final {metric} per site and method")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
