"""Federated radiomics from the data scientist's side: request, run, collect, compare the sites.

    submit_radiomics   send the thin `radiomics_aggregates` request to every site that has none yet
    run_radiomics      run it at every site (in parallel), write the aggregates and a heterogeneity report
    nyul_scale         run `intensity_landmarks` everywhere and fit one Nyul standard scale from the means

The settings are the content of a pyradiomics parameter file; they travel with each run, while the
site's admin approves the task once per label. Only aggregates come back (see
`datasite_setup.site_tasks.radiomics_aggregates`); each site decides on its own what of them it releases.

`out_dir` receives:
    aggregates.json        {site: the site's result}: n, features {name: {n, mean, var, hist?}}, ...
    heterogeneity.json     `analyses.heterogeneity.heterogeneity_report` on the per-feature aggregates
    heterogeneity.csv      one row per feature: ANOVA across sites, adjusted p, SMD per site
    heterogeneity.png      sites x features heatmap of each site's SMD against the pooled mean
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from analyses.federation_file import DatasiteEntry, Federation

TASK = "radiomics_aggregates"
LANDMARKS_TASK = "intensity_landmarks"


class AwaitingApproval(RuntimeError):
    """Some site has not approved the request yet; `statuses` maps each such site to its status."""

    def __init__(self, task: str, label: str, statuses: dict[str, str]) -> None:
        self.statuses = statuses
        waiting = ", ".join(f"{site} ({status})" for site, status in statuses.items())
        super().__init__(f"request '{task}' (label '{label}') is not approved at: {waiting}")


class SiteFailed(RuntimeError):
    """A site refused or failed a run; the message names the site and gives its reason."""


def _asset(entry: DatasiteEntry, client: Any) -> Any:
    dataset = next((d for d in client.datasets.get_all() if d.name == entry.dataset_name), None)
    if dataset is None:
        raise SiteFailed(f"datasite '{entry.name}' has no dataset '{entry.dataset_name}' (see its [[datasites]] entry)")
    asset = next((a for a in dataset.assets if a.name == entry.asset), None)
    if asset is None:
        raise SiteFailed(f"dataset '{entry.dataset_name}' at '{entry.name}' has no asset '{entry.asset}'")
    return asset


def _each_site(federation: Federation, work: Callable[[DatasiteEntry, Any, Any], Any]) -> dict[str, Any]:
    """`work(entry, client, asset)` at every site in parallel (the work happens at the sites).

    syft's prints are silenced around the whole pool: `quiet_syft` swaps the process-wide stdout,
    and its threads' swaps interleave, so only an outer swap restores the real stdout reliably.
    """
    from datasite_setup.connection import quiet_syft

    def one(entry: DatasiteEntry) -> Any:
        client = entry.login()
        return work(entry, client, _asset(entry, client))

    with quiet_syft(), ThreadPoolExecutor(max_workers=len(federation.datasites)) as pool:
        futures = {entry.name: pool.submit(one, entry) for entry in federation.datasites}
        return {name: future.result() for name, future in futures.items()}


def submit(federation: Federation, task: str, label: str, max_runs: int) -> dict[str, str]:
    """Send the request for `task` under `label` where it was never sent; return site -> status."""
    from analyses.site_requests import ensure_request

    return _each_site(federation, lambda entry, client, asset: ensure_request(client, asset, task, label, max_runs))


def submit_radiomics(federation: Federation, label: str, max_runs: int) -> dict[str, str]:
    """Request `radiomics_aggregates` at every site; site -> "approved", "pending" or "rejected"."""
    return submit(federation, TASK, label, max_runs)


def run_everywhere(federation: Federation, task: str, label: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run the approved request at every site; raise AwaitingApproval naming the sites that have not approved."""
    return run_on(federation, task, label, {entry.name: params for entry in federation.datasites})


def run_on(federation: Federation, task: str, label: str, params_by_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`run_everywhere` with each site's own parameters (every site of the federation must have some)."""
    from analyses.site_requests import request_status, call_site_task

    missing = [entry.name for entry in federation.datasites if entry.name not in params_by_site]
    if missing:
        raise ValueError(f"no parameters for site(s) {missing}")

    def status(entry: DatasiteEntry, client: Any, asset: Any) -> str:
        return request_status(client, task, label) or "not requested"

    waiting = {site: s for site, s in _each_site(federation, status).items() if s != "approved"}
    if waiting:
        raise AwaitingApproval(task, label, waiting)

    def run(entry: DatasiteEntry, client: Any, asset: Any) -> Any:
        try:
            return call_site_task(client, asset, task, label, params_by_site[entry.name])
        except RuntimeError as exc:
            raise SiteFailed(f"datasite '{entry.name}': {exc}") from None

    return _each_site(federation, run)


def nyul_scale(federation: Federation, label: str, percentiles: list[float] | None = None) -> dict[str, Any]:
    """The Nyul standard scale fitted on every site's landmark summary, as `harmonization` wants it."""
    from analyses.harmonization.nyul import DEFAULT_PERCENTILES, fit_standard_scale

    percentiles = list(percentiles or DEFAULT_PERCENTILES)
    summaries = run_everywhere(federation, LANDMARKS_TASK, label, {"percentiles": percentiles})
    return {"nyul": fit_standard_scale(summaries, percentiles=percentiles).to_params()}


def jsonable(value: Any) -> Any:
    """Arrays and numpy scalars as plain lists and numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_radiomics(
    federation: Federation,
    settings: dict[str, Any],
    out_dir: Path,
    intensity_edges: list[float] | None = None,
    feature_edges: dict[str, list[float]] | None = None,
    harmonization: dict[str, Any] | None = None,
    dp: dict[str, Any] | None = None,
    label: str = "radiomics",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Run `radiomics_aggregates` at every site, write aggregates and the heterogeneity report to `out_dir`.

    Returns {"aggregates": {site: result}, "heterogeneity": report, "files": {kind: path}}.
    Raises AwaitingApproval (naming the sites) if any site has not approved the request under `label`.
    """
    from analyses.heterogeneity import heterogeneity_report, write_heatmap_png, write_table_csv

    params: dict[str, Any] = {"settings": settings}
    optional = {"intensity_edges": intensity_edges, "feature_edges": feature_edges, "harmonization": harmonization, "dp": dp}
    params.update(jsonable({key: value for key, value in optional.items() if value is not None}))
    results = run_everywhere(federation, TASK, label, params)

    histograms = {
        site: {**result["intensity"], "edges": params["intensity_edges"]}
        for site, result in results.items() if "intensity" in result
    }
    report = heterogeneity_report(
        {site: result.get("features", {}) for site, result in results.items()},
        intensity_histograms=histograms if len(histograms) >= 2 else None,
        alpha=alpha,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"aggregates": out_dir / "aggregates.json", "report": out_dir / "heterogeneity.json",
             "table": out_dir / "heterogeneity.csv"}
    files["aggregates"].write_text(json.dumps(jsonable(results), indent=1, sort_keys=True))
    files["report"].write_text(json.dumps(jsonable(report), indent=1))
    write_table_csv(report, files["table"])
    if report["features"]:
        title = f"Site effects on radiomics features ({'harmonized' if harmonization else 'raw intensities'})"
        files["heatmap"] = write_heatmap_png(report, out_dir / "heterogeneity.png", title)
    return {"aggregates": results, "heterogeneity": report, "files": {k: str(v) for k, v in files.items()}}
