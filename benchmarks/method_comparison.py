"""Federated strategies vs local-only vs centralized on one simulated fleet, written like `federate train --out`.

The benchmarks of the translation and body-size programmes compare several strategies on the
same fleet, schedule, seed and initial model, each run through the orchestrator against
`SimulatedSite`s (the installed site-task code on the fleet's cases, split by the cases' `split`),
plus local-only and the centralized simulation. The folder written is what `federate train --out`
writes (per-method metrics.json and plots, centralized/metrics.json, comparison.json/png), so the
report reads a benchmark's folder as it reads a live run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from analyses.federation.centralized import train_centralized
from analyses.federation.experiment import compare, local_plan
from analyses.federation.orchestrator import Orchestrator, RunReport, TrainingPlan, initial_weights
from analyses.federation.run_outputs import write_run
from analyses.federation.simulated_site import SimulatedSite
from domains import get_domain

CENTRALIZED = "centralized (simulation)"


def run_methods(plan: TrainingPlan, strategies: dict[str, dict[str, Any]], cases: dict[str, list[dict[str, Any]]],
                out: Path, work: Path, progress: bool = False, centralized: bool = True) -> dict[str, Any]:
    """Every strategy (name -> its options) and local-only under `plan`, then the centralized
    simulation; writes `out` as `federate train --out` would and returns the comparison tables with
    each method's validation curve, wall seconds and reports ("reports": method -> RunReport)."""
    domain = get_domain(plan.domain)
    plans = [replace(plan, strategy=name, strategy_options=options, name=f"{plan.name or 'bench'}_{name}")
             for name, options in strategies.items()]
    plans.append(local_plan(replace(plan, name=f"{plan.name or 'bench'}")))
    reports: dict[str, RunReport] = {}
    seconds: dict[str, float] = {}
    for each in plans:
        started = time.perf_counter()
        links = [SimulatedSite(site, site_cases) for site, site_cases in sorted(cases.items())]
        reports[each.strategy] = Orchestrator(each, links, work / each.strategy, progress=progress).run()
        seconds[each.strategy] = round(time.perf_counter() - started, 1)
        write_run(reports[each.strategy], out / each.strategy, domain.primary_metric)
        print(f"  {plan.domain}: {each.strategy} done in {seconds[each.strategy]:.0f} s", flush=True)
    central = None
    if centralized:
        started = time.perf_counter()
        central = train_centralized(plan, cases, initial_weights(domain, plan.seed), progress=progress)
        seconds[CENTRALIZED] = round(time.perf_counter() - started, 1)
        (out / "centralized").mkdir(parents=True, exist_ok=True)
        (out / "centralized" / "metrics.json").write_text(json.dumps(central, indent=1))
    tables = compare(reports, out, domain.primary_metric, central)
    curves = {method: [r["pooled"].get(domain.primary_metric) for r in report.history] for method, report in reports.items()}
    if central is not None:
        curves[CENTRALIZED] = [r["pooled"].get(domain.primary_metric) for r in central["history"]]
    return {**tables, "curves": curves, "seconds": seconds, "reports": reports, "centralized_run": central}


def site_metric_table(report: RunReport | dict[str, Any], metrics: tuple[str, ...], which: str = "best") -> dict[str, Any]:
    """Per site and pooled test metrics of one method (a RunReport or the centralized run's dict)."""
    scores = report.test[which] if isinstance(report, RunReport) else report[which]
    table = {site: {m: round(values[m], 4) for m in metrics} for site, values in sorted(scores["site_metrics"].items())}
    table["pooled"] = {m: round(scores["pooled"][m], 4) for m in metrics if m in scores["pooled"]}
    if scores.get("pooled_held_out"):
        table["pooled (held-out sites)"] = {m: round(scores["pooled_held_out"][m], 4) for m in metrics
                                           if m in scores["pooled_held_out"]}
    return table


def rounds_to_target(curve: list[float | None], target: float, higher_is_better: bool) -> int | None:
    """The first round whose pooled validation value reaches `target` (None: never)."""
    for round_no, value in enumerate(curve):
        if value is not None and (value >= target if higher_is_better else value <= target):
            return round_no
    return None


def drop_weight_files(out: Path) -> None:
    """Remove the runs' weight files from a results folder kept in the repository: its figures and
    metrics are the record, the weights are megabytes a rerun makes again."""
    for path in out.rglob("*.npz"):
        path.unlink()
