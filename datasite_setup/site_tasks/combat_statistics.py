"""Site task `combat_statistics`: the site's part of distributed ComBat on radiomics features.

ComBat (see `analyses.harmonization.combat`) removes each site's additive and multiplicative effect
on every feature. Distributed, it needs three calls of this task under one approval, each on the
same cases with the same pyradiomics settings (so each call sees the same per-case features):

- stage "moments":    n and the sums X'X, X'Y of the site's design [1 | covariates] and features;
- stage "residuals":  n, per-feature mean and sum of squares of the residuals from the pooled fit
                      the data scientist computed from every site's moments (`fit` = this site's
                      intercept and the covariate effects);
- stage "harmonized": n and per-feature n/mean/variance of the features after ComBat with the model
                      fitted from every site's residuals (`fit` = the model with only this site's
                      effects), so the heterogeneity after harmonization can be measured.

A case is used when its mask is not empty; a case without a lesion is a fact of the data set,
counted in "skipped". Any other reason to leave a case out would be the request's choice (a
covariate level it does not list, settings pyradiomics refuses the lesion under, a feature that
is not finite for it), and two runs differing by one case give that case's features, so such a
run is refused as a whole. Only sums and aggregates leave; the per-case features and their
harmonized values stay inside the run. With n <= k design columns X'Y would determine the cases,
so the task refuses cohorts below max(min_cohort, k + 3); and each covariate level's row of X'Y is
the sum of the features of the cases at that level (the reference level's is the intercept row
minus the others), so every level held by from 1 to min_cohort - 1 of the used cases is refused
too. Matrices travel flattened (row-major) because the aggregates contract carries only 1-D arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from datasite_setup.site_tasks.harmonized_cases import HARMONIZATION_PARAM, standardized
from datasite_setup.site_tasks.radiomics_aggregates import (  # same contract: aggregates, 1-D arrays of <= MAX_BINS
    MAX_BINS, SETTINGS_PARAM, contract, extract, feature_extractor,
)
from datasite_setup.site_tasks.task import (
    Cohort, Param, Release, SiteFacts, SiteTask, TaskRefusal, feature_quantity,
)

STAGES = ("moments", "residuals", "harmonized")
MAX_FEATURES = 128
CATEGORICAL = ("PatientSex",)
CONTINUOUS = ("PatientAge",)
MAX_DESIGN_COLUMNS = MAX_BINS // MAX_FEATURES  # k * p numbers of X'Y fit the contract's array bound


def features_problems(features: list[Any]) -> str | None:
    if not 1 <= len(features) <= MAX_FEATURES:
        return f"must list 1 to {MAX_FEATURES} feature names"
    if not all(isinstance(name, str) and name for name in features) or len(set(features)) != len(features):
        return "feature names must be distinct, non-empty strings"
    return None


def stage_problems(stage: str) -> str | None:
    return None if stage in STAGES else f"must be one of {', '.join(STAGES)}"


def covariates_problems(covariates: dict[str, Any]) -> str | None:
    """{"categorical": {field: [levels, reference first]}, "continuous": [field, ...]} from the case metadata."""
    if set(covariates) - {"categorical", "continuous"}:
        return "may only hold 'categorical' and 'continuous'"
    categorical = covariates.get("categorical", {})
    continuous = covariates.get("continuous", [])
    if not isinstance(categorical, dict) or not isinstance(continuous, list):
        return "'categorical' must map fields to level lists and 'continuous' must list fields"
    unknown = [f for f in categorical if f not in CATEGORICAL] + [f for f in continuous if f not in CONTINUOUS]
    if unknown:
        return f"unknown covariate field(s) {unknown}; categorical: {list(CATEGORICAL)}, continuous: {list(CONTINUOUS)}"
    for name, levels in categorical.items():
        if not isinstance(levels, list) or len(levels) < 2 or len(set(map(str, levels))) != len(levels):
            return f"'{name}' needs a list of at least 2 distinct levels"
    columns = 1 + sum(len(levels) - 1 for levels in categorical.values()) + len(continuous)
    if columns > MAX_DESIGN_COLUMNS:
        return f"the design would have {columns} columns, at most {MAX_DESIGN_COLUMNS} are allowed"
    return None


def _age_years(value: Any) -> float:
    """DICOM age strings as de-identification keeps them ("063Y", ">=90Y"); NaN when not in years."""
    text = str(value or "").strip().lstrip(">=")
    return float(text[:-1]) if text.endswith("Y") and text[:-1].isdigit() else math.nan


def _covariate_row(metadata: dict[str, Any], covariates: dict[str, Any]) -> list[float] | None:
    row: list[float] = []
    for name, levels in covariates.get("categorical", {}).items():
        value = str(metadata.get(name, ""))
        if value not in map(str, levels):
            return None
        row += [float(value == str(level)) for level in levels[1:]]
    for name in covariates.get("continuous", []):
        value = _age_years(metadata.get(name))
        if not math.isfinite(value):
            return None
        row.append(value)
    return row


def _site_arrays(cases: list[dict[str, Any]], params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(features [n, p], covariates [n, q], positions of the used cases) over the cases with a lesion.

    Raises TaskRefusal when a case with a lesion cannot be used.
    """
    from datasite_setup.harmonization.nyul import StandardScale

    extractor = feature_extractor(params["settings"])
    scale = StandardScale.from_params(params["harmonization"]["nyul"]) if "harmonization" in params else None
    covariates = params.get("covariates", {})
    rows, design, used = [], [], []
    for i, case in enumerate(cases):
        if not np.any(case["mask"]):
            continue
        row = _covariate_row(case["metadata"], covariates)
        if row is None:
            raise TaskRefusal(f"case #{i} has no listed level (or no value) of a requested covariate; "
                              "the site releases no ComBat statistics that leave a case out")
        try:
            values = extract(extractor, standardized(case, scale) if scale is not None else case)
        except ValueError as exc:  # pyradiomics' refusal of an ROI too small for the settings
            raise TaskRefusal(f"pyradiomics refused case #{i} with these settings ({exc})") from None
        picked = [values.get(name, math.nan) for name in params["features"]]
        if not all(math.isfinite(v) for v in picked):
            raise TaskRefusal(f"a requested feature is missing or not finite for case #{i}")
        rows.append(picked)
        design.append(row)
        used.append(i)
    n, p = len(rows), len(params["features"])
    return np.array(rows, float).reshape(n, p), np.array(design, float).reshape(n, -1), used


def _level_members(cases: list[dict[str, Any]], used: list[int], covariates: dict[str, Any]) -> dict[tuple[str, str], list[int]]:
    """(covariate, level) -> positions of the used cases at that level, for every listed level."""
    return {
        (name, str(level)): [i for i in used if str(cases[i]["metadata"].get(name, "")) == str(level)]
        for name, levels in covariates.get("categorical", {}).items()
        for level in levels
    }


def release(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> Release:
    from datasite_setup.harmonization.combat import CombatModel, apply_combat, combat_site_moments, combat_site_residuals

    y, x, used = _site_arrays(cases, params)
    needed = max(site.min_cohort, x.shape[1] + 3)
    if y.shape[0] < needed:
        raise TaskRefusal(f"{y.shape[0]} usable cases; ComBat statistics need at least {needed} here")
    levels = _level_members(cases, used, params.get("covariates", {}))
    if any(0 < len(members) < site.min_cohort for members in levels.values()):
        raise TaskRefusal(f"a covariate level is held by fewer than {site.min_cohort} of the used cases; "
                          "its row of X'Y would be their features")
    cohorts = [Cohort((), feature_quantity(name), tuple(used)) for name in params["features"]]
    stage, fit = params["stage"], params.get("fit", {})
    skipped = len(cases) - len(used)
    if stage == "moments":
        moments = combat_site_moments(y, x)
        cohorts += [Cohort((), feature_quantity(name), tuple(members))
                    for name in params["features"] for members in levels.values() if members]
        result = {"n": moments["n"], "skipped": skipped, "XtX": np.ravel(moments["XtX"]), "XtY": np.ravel(moments["XtY"])}
    elif stage == "residuals":
        residuals = combat_site_residuals(y, x, fit["intercept"], fit["beta"])
        result = {"n": residuals["n"], "skipped": skipped, "mean": residuals["mean"], "ss": residuals["ss"]}
    else:
        model = CombatModel.from_params(fit)
        harmonized = apply_combat(y, x, model, model.sites[0])
        result = {
            "n": int(y.shape[0]),
            "skipped": skipped,
            "features": {
                name: {"n": int(y.shape[0]), "mean": float(column.mean()), "var": float(column.var(ddof=1))}
                for name, column in zip(params["features"], harmonized.T)
            },
        }
    return Release(result, tuple(cohorts))


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    return release(cases, params, site).result


TASK = SiteTask(
    name="combat_statistics",
    summary="distributed ComBat on radiomics features: design moments, residual sums, or harmonized "
    "per-feature n/mean/variance (aggregates only)",
    params={
        "settings": SETTINGS_PARAM,
        "features": Param(list, f"names of the features to harmonize (at most {MAX_FEATURES})", check=features_problems),
        "stage": Param(str, "moments, residuals or harmonized", check=stage_problems),
        "fit": Param(dict, "residuals: this site's intercept and beta; harmonized: the ComBat model with this "
                     "site's effects", required=False),
        "covariates": Param(dict, "design covariates from the case metadata (PatientSex levels, PatientAge)",
                            required=False, check=covariates_problems),
        "harmonization": HARMONIZATION_PARAM,
    },
    run=run,
    release=release,
    contract=contract,
    notes=(
        "Only n, design sums and per-feature aggregates leave; per-case features stay inside the run.",
        "Three stages under one approval: moments, then residuals, then harmonized aggregates.",
    ),
)
