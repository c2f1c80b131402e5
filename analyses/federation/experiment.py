"""The data scientist's training API (what `federate train` and the notebooks call).

    plans = [TrainingPlan(domain="brain_mr_segmentation", strategy=s, rounds=5) for s in ("fedavg", "fedprox")]
    submit(federation, plans)            # sends the thin requests; admins approve once
    reports = {p.strategy: train(federation, p, out / p.strategy) for p in plans}
    compare(reports, out, centralized=...)   # federated vs local-only vs centralized, per site

Local-only is a plan with strategy "local" (it runs through the sites like any other);
centralized is a simulation on pooled phantom data (see `centralized.py`). Every number `compare`
reports is on the sites' test splits: for the round each method selected on pooled validation
("best") and for its last round ("final"); local-only adds each site's model scored at the others.

A site whose admin denied the run's training or evaluation request is left out of it (every
round records why) while `min_sites` others take part; one that denied only `foreground_share`
trains and evaluates, and the initial model's output prior is pooled without it. A site still
pending holds the run until its admin decides.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from analyses.federation import make_strategy
from analyses.federation.orchestrator import PRIOR_TASK, TEST, VALIDATION, Orchestrator, RunReport, TrainingPlan
from analyses.federation.run_outputs import write_csv
from analyses.federation.site_link import DatasiteLink, LeftOutLink, SiteLink, WithoutPriorLink
from analyses.federation_file import Federation, FederationFileError
from analyses.figures import pyplot, save_figure

OPTIONAL_TASKS = (PRIOR_TASK,)  # a site that denies only these still trains and evaluates


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
    """Send every plan's requests to every site (idempotent); returns "<site>" -> "<task>@<label>" -> status.
    A plan that cannot run (its strategy refuses it, `Strategy.check_plan`: e.g. SCAFFOLD with Adam;
    or its domain is unknown) raises ValueError before anything is sent, so no admin approves
    requests that cannot run."""
    budgets = []
    for plan in plans:
        make_strategy(plan.strategy, **plan.strategy_options).check_plan(plan)
        budgets.append(plan.budgets(len(federation.datasites)))
    statuses: dict[str, dict[str, str]] = {}
    for plan, budget in zip(plans, budgets):
        for link in links_for(federation, plan):
            for task, status in link.ensure_requests(budget).items():
                statuses.setdefault(link.name, {})[f"{task}@{plan.label}"] = status
    return statuses


def approval_statuses(federation: Federation, plan: TrainingPlan) -> dict[str, dict[str, str | None]]:
    return {link.name: link.statuses(list(plan.budgets())) for link in links_for(federation, plan)}


def train(federation: Federation, plan: TrainingPlan, out_dir: Path, progress: bool = True) -> RunReport:
    """Run (or resume) one plan across the federation.

    Raises AwaitingApproval before any round if a reachable site's request is still pending. A
    site whose admin denied its training or evaluation request takes no part (the orchestrator
    records why, every round), one that denied only an optional task (`OPTIONAL_TASKS`) is left
    out of that task alone; an unreachable site is left to the orchestrator, which records it as
    missing the rounds it misses. RuntimeError if fewer than `min_sites` sites can take part at all."""
    links = links_for(federation, plan)
    needed = list(plan.budgets())
    statuses: dict[str, dict[str, str | None]] = {}
    unreachable: dict[str, str] = {}
    for link in links:
        try:
            statuses[link.name] = link.statuses(needed)
        except FederationFileError:  # an unreadable credential is the caller's to fix, not a site failure
            raise
        except Exception as exc:  # a site that is down now may answer later rounds
            unreachable[link.name] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    refused = {site: [t for t, s in by_task.items() if s == "rejected"] for site, by_task in statuses.items()}
    denied = {site: ", ".join(names) for site, names in refused.items()
              if any(name not in OPTIONAL_TASKS for name in names)}
    optional = {site: ", ".join(names) for site, names in refused.items() if names and site not in denied}
    if any(s not in ("approved", "rejected") for tasks in statuses.values() for s in tasks.values()):
        raise AwaitingApproval(statuses)
    usable = [link for link in links if link.name not in denied and link.name not in unreachable]
    if len(usable) < min(plan.min_sites, len(links)):
        why = {**{s: "unreachable: " + r for s, r in unreachable.items()},
               **{s: f"the site's admin denied the request ({tasks})" for s, tasks in denied.items()}}
        raise RuntimeError(f"only {len(usable)} of {len(links)} sites can take part; min_sites is {plan.min_sites} ("
                           + "; ".join(f"{s}: {r}" for s, r in why.items()) + ")")
    run_links: list[SiteLink] = [
        LeftOutLink(link.name, f"the site's admin denied the request ({denied[link.name]})") if link.name in denied
        else WithoutPriorLink(link, f"the site's admin denied the request ({optional[link.name]})") if link.name in optional
        else link
        for link in links
    ]
    return Orchestrator(plan, run_links, out_dir, progress=progress).run()


def local_plan(plan: TrainingPlan) -> TrainingPlan:
    """The local-only baseline of `plan`: same schedule, no aggregation (so no secure-aggregation
    session: a site that requires one refuses the baseline, and the outputs say so)."""
    return replace(plan, strategy="local", strategy_options={}, secure_aggregation=False,
                   name=f"{plan.name}_local" if plan.name else "")


def _table(scores: dict[str, Any], metric: str) -> dict[str, float]:
    """site -> `metric` (and "pooled" over the training sites, "pooled (held-out sites)" over the
    unseen ones when the plan holds some out) from one set of test scores."""
    table = {site: m[metric] for site, m in scores["site_metrics"].items()}
    table["pooled"] = scores["pooled"].get(metric, float("nan"))
    if "pooled_held_out" in scores:
        table["pooled (held-out sites)"] = scores["pooled_held_out"].get(metric, float("nan"))
    return table


def _cross_table(scores: dict[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """model site -> {other site: `metric`, "pooled (other sites)": pooled over them}."""
    return {model: {**{site: m[metric] for site, m in sorted(at.items())},
                    "pooled (other sites)": scores.get("cross_site_pooled", {}).get(model, {}).get(metric, float("nan"))}
            for model, at in sorted(scores.get("cross_site", {}).items())}


def comparison_tables(reports: dict[str, RunReport], metric: str,
                      centralized: dict[str, Any] | None = None) -> dict[str, Any]:
    """Test-split `metric` per method and site for the weights selected on validation ("best", the
    round in "best_round") and the last round's ("final"); local-only's models at the other sites
    ("cross_site"); which site each method left out of what, and why ("left_out"); for runs with
    sites joining late or leaving early, each method's `RunReport.onboarding` and `longevity`
    (every method of a comparison runs the same plan, so they line up); and each method's time
    (`RunReport.timing` without the per-round rows) beside the centralized simulation's, the same
    training in one process ("time")."""
    sources: dict[str, dict[str, Any]] = {
        method: {"best": report.test["best"], "final": report.test["final"], "selection": report.selection}
        for method, report in reports.items()
    }
    if centralized is not None:
        sources["centralized (simulation)"] = centralized
    result: dict[str, Any] = {
        "metric": metric, "split": TEST, "selected_on": f"pooled {VALIDATION} {metric}",
        "best_round": {method: src["selection"]["best_round"] for method, src in sources.items()},
        "best": {method: _table(src["best"], metric) for method, src in sources.items()},
        "final": {method: _table(src["final"], metric) for method, src in sources.items()},
        "cross_site": {method: {"best": _cross_table(src["best"], metric), "final": _cross_table(src["final"], metric)}
                       for method, src in sources.items() if "cross_site" in src["final"]},
        "left_out": {method: report.left_out() for method, report in reports.items() if report.left_out()},
        "onboarding": {method: report.onboarding() for method, report in reports.items() if report.onboarding()},
        "longevity": {method: report.longevity() for method, report in reports.items() if report.longevity()},
        "time": {method: {k: v for k, v in report.timing().items() if k != "rounds"} for method, report in reports.items()},
    }
    if centralized is not None:
        missed = {site: [{"round": centralized[w]["round"], "phase": f"{TEST} ({w} weights)", "reason": why}]
                  for w in ("best", "final") for site, why in centralized[w]["missed"].items()}
        if missed:
            result["left_out"]["centralized (simulation)"] = missed
        result["time"]["centralized (simulation)"] = centralized["time"]
    return result


def compare(reports: dict[str, RunReport], out_dir: Path, metric: str,
            centralized: dict[str, Any] | None = None) -> dict[str, Any]:
    """`comparison_tables` written to `out_dir` as comparison.json, comparison.csv (one row per
    method, site and weights: best / final), comparison_cross_site.csv (local-only) and a grouped
    bar chart of the validation-selected weights' test scores (comparison.png).

    For "local" each site is scored with its own model; federated strategies score the global
    model (FedBN: with that site's own normalisation layers)."""
    tables = comparison_tables(reports, metric, centralized)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(tables, indent=1))
    rows = [{"method": method, "site": site, "weights": which, "round": tables["best_round"][method] if which == "best"
             else None, "split": TEST, metric: value}
            for which in ("best", "final") for method, sites in tables[which].items() for site, value in sites.items()]
    write_csv(rows, out_dir / "comparison.csv")
    cross = [{"method": method, "weights": which, "model_of": model, "scored_at": site, "split": TEST, metric: value}
             for method, kinds in tables["cross_site"].items() for which, models in kinds.items()
             for model, sites in models.items() for site, value in sites.items()]
    if cross:
        write_csv(cross, out_dir / "comparison_cross_site.csv")
    _plot_comparison(tables["best"], metric, out_dir / "comparison.png")
    return tables


def _plot_comparison(table: dict[str, dict[str, float]], metric: str, path: Path) -> Path:
    import numpy as np

    methods = list(table)
    sites = sorted({s for values in table.values() for s in values}, key=lambda s: (s == "pooled", s))
    width = 0.8 / max(len(methods), 1)
    fig, ax = pyplot().subplots(figsize=(max(6, 1.5 * len(sites)), 4))
    for i, method in enumerate(methods):
        ax.bar(np.arange(len(sites)) + i * width, [table[method].get(s, np.nan) for s in sites], width, label=method)
    ax.set_xticks(np.arange(len(sites)) + width * (len(methods) - 1) / 2, sites)
    ax.set(ylabel=f"test {metric}", title=f"test {metric} per site and method (round selected on validation)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
