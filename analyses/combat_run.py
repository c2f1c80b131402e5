"""Distributed ComBat across the federation: three calls of the `combat_statistics` site task.

    moments at every site  ->  pooled regression (here)
    residuals at every site ->  ComBat model: pooled variance, empirical-Bayes site effects (here)
    harmonized at every site -> per-feature aggregates after ComBat, for the heterogeneity report

Each site receives only what it needs: its own intercept in round 2, the model with only its own
site effects in round 3. The model (pooled location and scale, every site's effects) stays with
the data scientist; it holds no per-case value. One approval per site covers the three calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from analyses.federation_file import Federation
from analyses.radiomics_run import jsonable, run_on

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
) -> dict[str, Any]:
    """Fit ComBat across the sites and measure the harmonized features there.

    Returns {"model": CombatModel params, "harmonized": {site: {"n", "features": {name: {n, mean,
    var}}}}, "n": {site: cases used}}. Raises AwaitingApproval if a site has not approved.
    """
    base: dict[str, Any] = {"settings": settings, "features": list(features)}
    if covariates:
        base["covariates"] = covariates
    if harmonization:
        base["harmonization"] = jsonable(harmonization)
    sites = [entry.name for entry in federation.datasites]
    return combat_rounds(lambda params_by_site: run_on(federation, TASK, label, params_by_site), sites, base)


def combat_rounds(call_sites: Callable[[dict[str, dict[str, Any]]], dict[str, Any]], sites: list[str],
                  base: dict[str, Any]) -> dict[str, Any]:
    """The three rounds, given how to call the sites (site -> parameters in, site -> result out)."""
    from analyses.harmonization.combat import fit_combat_model, pooled_regression

    p = len(base["features"])
    moments = call_sites({site: {**base, "stage": "moments"} for site in sites})
    regression = pooled_regression({site: _moments(result, p) for site, result in moments.items()})
    residuals = call_sites({site: {**base, "stage": "residuals", "fit": jsonable(regression.site_params(site))}
                            for site in sites})
    model = fit_combat_model(regression, {site: {"n": int(r["n"]), "mean": np.asarray(r["mean"], float),
                                                 "ss": np.asarray(r["ss"], float)} for site, r in residuals.items()})
    harmonized = call_sites({site: {**base, "stage": "harmonized", "fit": model.to_params(site)} for site in sites})
    return {"model": model.to_params(), "harmonized": harmonized, "n": {site: int(r["n"]) for site, r in moments.items()}}


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
) -> dict[str, Any]:
    """ComBat on the features of a raw radiomics run; the heterogeneity report after it, in `out_dir`."""
    from analyses.heterogeneity import heterogeneity_report, write_heatmap_png, write_table_csv
    from datasite_setup.site_tasks.combat_statistics import MAX_FEATURES

    features = common_features(raw_aggregates, MAX_FEATURES)
    if not features:
        raise ValueError("no feature was returned with a spread by every site; nothing for ComBat to harmonize")
    fitted = fit_combat(federation, settings, features, label, covariates=covariates)
    report = heterogeneity_report({site: r["features"] for site, r in fitted["harmonized"].items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": out_dir / "combat_model.json", "report": out_dir / "heterogeneity.json",
             "table": out_dir / "heterogeneity.csv"}
    files["model"].write_text(json.dumps({"features": features, "covariates": covariates or {}, "n": fitted["n"],
                                          "model": fitted["model"]}, indent=1))
    files["report"].write_text(json.dumps(jsonable(report), indent=1))
    write_table_csv(report, files["table"])
    if report["features"]:
        files["heatmap"] = write_heatmap_png(report, out_dir / "heterogeneity.png", "Site effects after ComBat")
    return {"features": features, "heterogeneity": report, "model": fitted["model"],
            "files": {k: str(v) for k, v in files.items()}}
