"""Federated radiomics from the data scientist's side: request, run, collect, compare the sites.

    submit_radiomics   send the thin `radiomics_aggregates` request to every site that has none yet
    run_radiomics      run it at every site (in parallel), write the aggregates and a heterogeneity report
    nyul_scale         run `intensity_landmarks` everywhere and fit one Nyul standard scale from the means

The settings are the content of a pyradiomics parameter file; they travel with each run, while the
site's admin approves the task once per label. Only aggregates come back (see
`datasite_setup.site_tasks.radiomics_aggregates`); each site decides on its own what of them it releases.

A site that is down, refuses a run (e.g. fewer cases than its `min_cohort`) or whose admin denied
the request is left out, and the others' aggregates are still computed while `min_sites` sites
answer (default 2: heterogeneity compares sites); fewer raise SiteFailed naming every site's
reason. A site whose request is still pending holds the run (AwaitingApproval).

`out_dir` receives:
    aggregates.json        {site: the site's result}: n, features {name: {n, mean, var, hist?}}, ...
    sites.json             {"used": [sites], "left_out": {site: why}, "min_sites": k}
    heterogeneity.json     `analyses.heterogeneity.heterogeneity_report` on the per-feature aggregates
    heterogeneity.csv      one row per feature: ANOVA across sites, adjusted p, SMD per site
    heterogeneity.png      sites x features heatmap of each site's SMD against the pooled mean
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from analyses.federation_file import DatasiteEntry, Federation, FederationFileError

TASK = "radiomics_aggregates"
LANDMARKS_TASK = "intensity_landmarks"
DEFAULT_MIN_SITES = 2  # a heterogeneity report compares sites, so it needs two
UNREACHABLE = "unreachable"


class AwaitingApproval(RuntimeError):
    """Some site has not approved the request yet; `statuses` maps each such site to its status."""

    def __init__(self, task: str, label: str, statuses: dict[str, str]) -> None:
        self.statuses = statuses
        waiting = ", ".join(f"{site} ({status})" for site, status in statuses.items())
        super().__init__(f"request '{task}' (label '{label}') is not approved at: {waiting}")


class SiteFailed(RuntimeError):
    """Fewer than `min_sites` sites answered; the message names every site left out and why."""


class SiteResults(dict):
    """site -> result for the sites that answered; `left_out` maps every other site to why.

    A dict, so callers that only want the results use it as before; those that report on the
    sites read `left_out`."""

    def __init__(self, results: Mapping[str, Any], left_out: Mapping[str, str] | None = None) -> None:
        super().__init__(results)
        self.left_out: dict[str, str] = dict(left_out or {})


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def require_sites(results: SiteResults, min_sites: int, total: int, what: str) -> SiteResults:
    """`results` if at least `min_sites` (or all `total`, when fewer) sites answered; else SiteFailed."""
    if len(results) < min(min_sites, total):
        reasons = "; ".join(f"datasite '{site}': {why}" for site, why in sorted(results.left_out.items()))
        raise SiteFailed(f"{what}: {len(results)} of {total} sites answered, min_sites is {min_sites} ({reasons})")
    return results


def _asset(entry: DatasiteEntry, client: Any) -> Any:
    dataset = next((d for d in client.datasets.get_all() if d.name == entry.dataset_name), None)
    if dataset is None:
        raise SiteFailed(f"datasite '{entry.name}' has no dataset '{entry.dataset_name}' (see its [[datasites]] entry)")
    asset = next((a for a in dataset.assets if a.name == entry.asset), None)
    if asset is None:
        raise SiteFailed(f"dataset '{entry.dataset_name}' at '{entry.name}' has no asset '{entry.asset}'")
    return asset


def _each_site(federation: Federation, work: Callable[[DatasiteEntry, Any, Any], Any],
               sites: list[str] | None = None) -> SiteResults:
    """`work(entry, client, asset)` at every site (or those named) in parallel (the work happens
    at the sites). A site whose login or work raises is left out with its reason; the rest answer.
    A credential the federation file points to but that cannot be read is the caller's error and raises.

    syft's prints are silenced around the whole pool: `quiet_syft` swaps the process-wide stdout,
    and its threads' swaps interleave, so only an outer swap restores the real stdout reliably.
    """
    from datasite_setup.connection import quiet_syft

    def one(entry: DatasiteEntry) -> Any:
        client = entry.login()
        return work(entry, client, _asset(entry, client))

    entries = [entry for entry in federation.datasites if sites is None or entry.name in sites]
    if not entries:
        return SiteResults({})
    results, left_out = {}, {}
    with quiet_syft(), ThreadPoolExecutor(max_workers=len(entries)) as pool:
        futures = {entry.name: pool.submit(one, entry) for entry in entries}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except FederationFileError:  # the data scientist's own configuration: not the site's failure
                raise
            except Exception as exc:  # one site's failure leaves it out; the others go on
                left_out[name] = _reason(exc)
    return SiteResults(results, left_out)


def submit(federation: Federation, task: str, label: str, max_runs: int) -> dict[str, str]:
    """Send the request for `task` under `label` where it was never sent; return site -> status
    ("approved", "pending", "rejected", or "unreachable: why" for a site that did not answer)."""
    from analyses.site_requests import ensure_request

    sent = _each_site(federation, lambda entry, client, asset: ensure_request(client, asset, task, label, max_runs))
    return {**sent, **{site: f"{UNREACHABLE}: {why}" for site, why in sent.left_out.items()}}


def submit_radiomics(federation: Federation, label: str, max_runs: int) -> dict[str, str]:
    """Request `radiomics_aggregates` at every site; site -> "approved", "pending", "rejected" or "unreachable: why"."""
    return submit(federation, TASK, label, max_runs)


def is_waiting(status: str | None) -> bool:
    """Whether a request status means the site's admin has yet to decide (not sent counts too)."""
    return status in (None, "pending", "not requested")


def run_everywhere(federation: Federation, task: str, label: str, params: dict[str, Any],
                   min_sites: int = DEFAULT_MIN_SITES) -> SiteResults:
    """Run the approved request at every site; see `run_on`."""
    return run_on(federation, task, label, {entry.name: params for entry in federation.datasites}, min_sites)


def run_on(federation: Federation, task: str, label: str, params_by_site: dict[str, dict[str, Any]],
           min_sites: int = DEFAULT_MIN_SITES) -> SiteResults:
    """Run the approved request at the sites given parameters (each with its own); a site that is
    down, denied the request or refuses the run is left out with why (`SiteResults.left_out`).

    Raises AwaitingApproval naming the sites whose admin has not decided yet, and SiteFailed if
    fewer than `min_sites` sites (or all, when fewer) answer."""
    from analyses.site_requests import request_status, call_site_task

    sites = [entry.name for entry in federation.datasites if entry.name in params_by_site]
    unknown = sorted(set(params_by_site) - {entry.name for entry in federation.datasites})
    if unknown:
        raise ValueError(f"parameters for site(s) not in the federation: {unknown}")

    def status(entry: DatasiteEntry, client: Any, asset: Any) -> str:
        return request_status(client, task, label) or "not requested"

    statuses = _each_site(federation, status, sites)
    waiting = {site: s for site, s in statuses.items() if is_waiting(s)}
    if waiting:
        raise AwaitingApproval(task, label, waiting)
    left_out = {site: f"{UNREACHABLE}: {why}" for site, why in statuses.left_out.items()}
    left_out.update({site: f"the site's admin {s} the request '{task}' (label '{label}')"
                     for site, s in statuses.items() if s != "approved"})

    def run(entry: DatasiteEntry, client: Any, asset: Any) -> Any:
        return call_site_task(client, asset, task, label, params_by_site[entry.name])

    answered = _each_site(federation, run, [site for site in sites if site not in left_out])
    results = SiteResults(answered, {**left_out, **answered.left_out})
    return require_sites(results, min_sites, len(sites), f"'{task}'")


def nyul_scale(federation: Federation, label: str, percentiles: list[float] | None = None,
               min_sites: int = DEFAULT_MIN_SITES) -> dict[str, Any]:
    """The Nyul standard scale fitted on the landmark summaries of the sites that answered, as
    `harmonization` wants it, plus "left_out": {site: why} for the others."""
    from analyses.harmonization.nyul import DEFAULT_PERCENTILES, fit_standard_scale

    percentiles = list(percentiles or DEFAULT_PERCENTILES)
    summaries = run_everywhere(federation, LANDMARKS_TASK, label, {"percentiles": percentiles}, min_sites)
    scale = {"nyul": fit_standard_scale(dict(summaries), percentiles=percentiles).to_params()}
    return {**scale, "left_out": summaries.left_out} if summaries.left_out else scale


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
    min_sites: int = DEFAULT_MIN_SITES,
) -> dict[str, Any]:
    """Run `radiomics_aggregates` at every site, write aggregates and the heterogeneity report to `out_dir`.

    Returns {"aggregates": {site: result}, "left_out": {site: why}, "heterogeneity": report,
    "files": {kind: path}}; the report covers the sites that answered. Raises AwaitingApproval
    (naming the sites) if a site has not decided on the request under `label`, SiteFailed if fewer
    than `min_sites` sites answer. `harmonization` may carry the "left_out" of `nyul_scale`: those
    sites' landmarks are not in the scale, which the written sites.json says.
    """
    from analyses.heterogeneity import heterogeneity_report, write_heatmap_png, write_table_csv

    params: dict[str, Any] = {"settings": settings}
    scale_left_out = (harmonization or {}).get("left_out", {})
    if harmonization is not None:
        harmonization = {k: v for k, v in harmonization.items() if k != "left_out"}
    optional = {"intensity_edges": intensity_edges, "feature_edges": feature_edges, "harmonization": harmonization, "dp": dp}
    params.update(jsonable({key: value for key, value in optional.items() if value is not None}))
    results = run_everywhere(federation, TASK, label, params, min_sites)

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
             "table": out_dir / "heterogeneity.csv", "sites": out_dir / "sites.json"}
    files["aggregates"].write_text(json.dumps(jsonable(dict(results)), indent=1, sort_keys=True))
    sites_record: dict[str, Any] = {"used": sorted(results), "left_out": results.left_out, "min_sites": min_sites}
    if scale_left_out:
        sites_record["left_out_of_nyul_scale"] = scale_left_out
    files["sites"].write_text(json.dumps(sites_record, indent=1, sort_keys=True))
    files["report"].write_text(json.dumps(jsonable(report), indent=1))
    write_table_csv(report, files["table"])
    if report["features"]:
        title = f"Site effects on radiomics features ({'harmonized' if harmonization else 'raw intensities'})"
        files["heatmap"] = write_heatmap_png(report, out_dir / "heterogeneity.png", title)
    return {"aggregates": dict(results), "left_out": results.left_out, "heterogeneity": report,
            "files": {k: str(v) for k, v in files.items()}}
