"""Distributed ComBat across the federation: three calls of the `combat_statistics` site task.

    moments at every site  ->  pooled regression (here)
    residuals at every site ->  ComBat model: pooled variance, empirical-Bayes site effects (here)
    harmonized at every site -> per-feature aggregates after ComBat, for the heterogeneity report

Each site receives only what it needs: its own intercept in round 2, the model with only its own
site effects in round 3. The model (pooled location and scale, every site's effects) stays with
the data scientist; it holds no per-case value. One approval per site covers the three calls.

A site left out of the first call (down, refusing, denied) takes no part in the fit; a site that
answered the first call but not the second is dropped and the regression refitted from the others'
moments before their residuals are asked again (its moments must not shape a model it cannot be
harmonized with); one missing from the third has no harmonized aggregates. Every such site is in
the result's "left_out" with why. Fewer than `min_sites` sites raise SiteFailed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from analyses.federation_file import Federation
from analyses.radiomics_run import DEFAULT_MIN_SITES, SiteFailed, jsonable, run_on

TASK = "combat_statistics"
RUNS_PER_FIT = 3


def _moments(result: dict[str, Any], p: int) -> dict[str, Any]:
    """A site's flattened moments as `pooled_regression` takes them."""
    xtx = np.asarray(result["XtX"], float)
    k = int(round(len(xtx) ** 0.5))
    if k * k != len(xtx) or len(result["XtY"]) != k * p:
        raise ValueError(f"moments of {k} design columns and {p} features do not fit X'X {len(xtx)}, X'Y {len(result['XtY'])}")
    return {"n": int(result["n"]), "XtX": xtx.reshape(k, k), "XtY": np.asarray(result["XtY"], float).reshape(k, p)}


def fit_combat(
    federation: Federation,
    settings: dict[str, Any],
    features: list[str],
    label: str,
    covariates: dict[str, Any] | None = None,
    harmonization: dict[str, Any] | None = None,
    min_sites: int = DEFAULT_MIN_SITES,
    sites: list[str] | None = None,
) -> dict[str, Any]:
    """Fit ComBat across the sites (default all; `sites` names a subset, e.g. those whose raw
    features came back) and measure the harmonized features there.

    Returns {"model": CombatModel params, "harmonized": {site: {"n", "features": {name: {n, mean,
    var}}}}, "n": {site: cases used}, "left_out": {site: why}}. Raises AwaitingApproval if a site
    has not decided on the request, SiteFailed if fewer than `min_sites` sites answer.
    """
    base: dict[str, Any] = {"settings": settings, "features": list(features)}
    if covariates:
        base["covariates"] = covariates
    if harmonization:
        base["harmonization"] = jsonable(harmonization)
    sites = sites if sites is not None else [entry.name for entry in federation.datasites]
    return combat_rounds(lambda params_by_site: run_on(federation, TASK, label, params_by_site, min_sites), sites, base,
                         min_sites)


def combat_rounds(call_sites: Callable[[dict[str, dict[str, Any]]], dict[str, Any]], sites: list[str],
                  base: dict[str, Any], min_sites: int = 1) -> dict[str, Any]:
    """The three rounds, given how to call the sites (site -> parameters in, site -> result out;
    the result may carry `left_out`, site -> why, as `radiomics_run.SiteResults` does)."""
    from analyses.harmonization.combat import fit_combat_model, pooled_regression

    p = len(base["features"])
    left_out: dict[str, str] = {}

    def call(params_by_site: dict[str, dict[str, Any]], stage: str) -> dict[str, Any]:
        results = call_sites(params_by_site)
        reasons = getattr(results, "left_out", {})
        for site in params_by_site:
            if site not in results:
                left_out[site] = f"{stage}: {reasons.get(site, 'no answer')}"
        if len(results) < min(min_sites, len(sites)):
            raise SiteFailed(f"ComBat {stage}: {len(results)} of {len(sites)} sites answered, min_sites is {min_sites} ("
                             + "; ".join(f"{s}: {why}" for s, why in sorted(left_out.items())) + ")")
        return results

    moments = call({site: {**base, "stage": "moments"} for site in sites}, "moments")
    active = sorted(moments)
    while True:
        regression = pooled_regression({site: _moments(moments[site], p) for site in active})
        residuals = call({site: {**base, "stage": "residuals", "fit": jsonable(regression.site_params(site))}
                          for site in active}, "residuals")
        if set(residuals) >= set(active):
            break
        active = [site for site in active if site in residuals]
    model = fit_combat_model(regression, {site: {"n": int(r["n"]), "mean": np.asarray(r["mean"], float),
                                                 "ss": np.asarray(r["ss"], float)} for site, r in residuals.items()
                                          if site in active})
    harmonized = call({site: {**base, "stage": "harmonized", "fit": model.to_params(site)} for site in active}, "harmonized")
    return {"model": model.to_params(), "harmonized": dict(harmonized), "n": {site: int(moments[site]["n"]) for site in active},
            "left_out": left_out}


def common_features(aggregates: dict[str, dict[str, Any]], limit: int) -> list[str]:
    """Features every site returned with a spread (a constant feature has no site effect to remove),
    sorted, at most `limit` of them."""
    per_site = [{name for name, g in result.get("features", {}).items() if g.get("var", 0) > 0}
                for result in aggregates.values()]
    return sorted(set.intersection(*per_site))[:limit] if per_site else []


def harmonize_and_report(
    federation: Federation,
    settings: dict[str, Any],
    raw_aggregates: dict[str, dict[str, Any]],
    out_dir: Path,
    label: str,
    covariates: dict[str, Any] | None = None,
    min_sites: int = DEFAULT_MIN_SITES,
) -> dict[str, Any]:
    """ComBat on the features of a raw radiomics run (the sites that answered it); the
    heterogeneity report after it, in `out_dir`, with the sites left out and why."""
    from analyses.heterogeneity import heterogeneity_report, write_heatmap_png, write_table_csv
    from datasite_setup.site_tasks.combat_statistics import MAX_FEATURES

    features = common_features(raw_aggregates, MAX_FEATURES)
    if not features:
        raise ValueError("no feature was returned with a spread by every site; nothing for ComBat to harmonize")
    fitted = fit_combat(federation, settings, features, label, covariates=covariates, min_sites=min_sites,
                        sites=sorted(raw_aggregates))
    report = heterogeneity_report({site: r["features"] for site, r in fitted["harmonized"].items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": out_dir / "combat_model.json", "report": out_dir / "heterogeneity.json",
             "table": out_dir / "heterogeneity.csv"}
    files["model"].write_text(json.dumps({"features": features, "covariates": covariates or {}, "n": fitted["n"],
                                          "left_out": fitted["left_out"], "model": fitted["model"]}, indent=1))
    files["report"].write_text(json.dumps(jsonable(report), indent=1))
    write_table_csv(report, files["table"])
    if report["features"]:
        files["heatmap"] = write_heatmap_png(report, out_dir / "heterogeneity.png", "Site effects after ComBat")
    return {"features": features, "heterogeneity": report, "model": fitted["model"], "left_out": fitted["left_out"],
            "files": {k: str(v) for k, v in files.items()}}
