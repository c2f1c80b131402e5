"""Distributed ComBat, the site's half: the sums a site sends and the harmonization it applies.

Round 1 (`combat_site_moments`) sends n, X'X and X'Y of the site's design; round 2
(`combat_site_residuals`) sends per-feature residual aggregates against the pooled fit; with the
fitted `CombatModel` the site harmonizes its own features (`apply_combat`), which stay at the site.
The pooled fit and the empirical-Bayes step are `analyses.harmonization.combat`.

Only n, sums and cross-products ever leave a site, never a per-case value. A site should still refuse
a round when its cohort is too small for those sums to hide individual cases: with n <= q + 1 cases,
X'Y determines each case's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


def _as_site_arrays(features: Any, covariates: Any | None, min_cases: int) -> tuple[np.ndarray, np.ndarray]:
    """Check one site's private inputs: features [n, p] and covariates [n, q] (q may be 0 or None)."""
    y = np.asarray(features, dtype=float)
    if y.ndim != 2:
        raise ValueError(f"features must be a 2-D array [cases, features], got shape {y.shape}")
    n = y.shape[0]
    if n < min_cases:
        raise ValueError(f"ComBat needs at least {min_cases} cases at a site here, got {n}")
    x = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"covariates must be [cases, covariates] with {n} rows, got shape {x.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("features contain NaN or infinite values; ComBat needs every feature of every case")
    if not np.all(np.isfinite(x)):
        raise ValueError("covariates contain NaN or infinite values")
    return y, x


def combat_site_moments(features: np.ndarray, covariates: np.ndarray | None = None) -> dict[str, Any]:
    """Site side, round 1: the normal-equation sums of the site's share of the pooled regression.

    features: [n, p]; covariates: [n, q], already numerically encoded (see `encode_covariates`).
    Returns {"n": int, "XtX": [(1+q) x (1+q)], "XtY": [(1+q) x p]} for the design [1 | covariates];
    the leading 1 becomes this site's indicator column in the pooled ComBat design.
    """
    y, x = _as_site_arrays(features, covariates, min_cases=2)
    design = np.hstack([np.ones((y.shape[0], 1)), x])
    return {"n": int(y.shape[0]), "XtX": design.T @ design, "XtY": design.T @ y}


def site_index(sites: tuple[str, ...], site: str) -> int:
    """Row of `site` in a fit over `sites`, or a ValueError naming the sites that took part."""
    if site not in sites:
        raise ValueError(f"site '{site}' took no part in the ComBat fit (sites: {', '.join(sites)})")
    return sites.index(site)


def combat_site_residuals(
    features: np.ndarray, covariates: np.ndarray | None, intercept: Any, beta: Any
) -> dict[str, Any]:
    """Site side, round 2: how far the site's cases sit from the pooled fit, as per-feature aggregates.

    intercept: [p] and beta: [q, p] from `PooledRegression.site_params`. Returns {"n": int,
    "mean": [p] mean residual (zero up to rounding), "ss": [p] sum of squared deviations of the
    residuals from that mean}; ss / (n - 1) is the site's residual variance.
    """
    y, x = _as_site_arrays(features, covariates, min_cases=2)
    (n, p), q = y.shape, x.shape[1]
    intercept, beta = np.asarray(intercept, dtype=float), np.asarray(beta, dtype=float)
    if intercept.shape != (p,) or beta.size != q * p:
        raise ValueError(
            f"the pooled fit has intercept {intercept.shape} and beta {beta.shape}, "
            f"this site has {p} features and {q} covariates"
        )
    beta = beta.reshape(q, p)
    residuals = y - intercept - x @ beta
    mean = residuals.mean(axis=0)
    return {"n": n, "mean": mean, "ss": ((residuals - mean) ** 2).sum(axis=0)}


@dataclass(frozen=True)
class CombatModel:
    """Everything a site needs to harmonize its features: pooled location/scale and its site effects.

    grand_mean: [p]; beta: [q, p]; var_pooled: [p]; gamma_star, delta_star: [k, p] in `sites` order.
    """

    sites: tuple[str, ...]
    grand_mean: np.ndarray
    beta: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray

    def to_params(self, site: str | None = None) -> dict[str, Any]:
        """Plain lists for a site-task parameter; with `site`, only that site's own site effects."""
        if site is None:
            sites, rows = list(self.sites), slice(None)
        else:
            index = site_index(self.sites, site)
            sites, rows = [site], slice(index, index + 1)
        return {
            "sites": sites,
            "grand_mean": self.grand_mean.tolist(),
            "beta": self.beta.tolist(),
            "var_pooled": self.var_pooled.tolist(),
            "gamma_star": self.gamma_star[rows].tolist(),
            "delta_star": self.delta_star[rows].tolist(),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CombatModel:
        p = len(params["grand_mean"])
        return cls(
            sites=tuple(params["sites"]),
            grand_mean=np.asarray(params["grand_mean"], dtype=float),
            beta=np.asarray(params["beta"], dtype=float).reshape(-1, p),
            var_pooled=np.asarray(params["var_pooled"], dtype=float),
            gamma_star=np.asarray(params["gamma_star"], dtype=float).reshape(-1, p),
            delta_star=np.asarray(params["delta_star"], dtype=float).reshape(-1, p),
        )


def apply_combat(features: np.ndarray, covariates: np.ndarray | None, model: CombatModel, site: str) -> np.ndarray:
    """Site side: harmonized features [n, p]; covariate effects are kept, the site's effects removed.

    y* = (standardized y - gamma*_site) / sqrt(delta*_site) * sqrt(var_pooled) + alpha + x beta.
    The result stays at the site: it is per-case data.
    """
    y, x = _as_site_arrays(features, covariates, min_cases=1)
    s = site_index(model.sites, site)
    if y.shape[1] != model.grand_mean.shape[0] or x.shape[1] != model.beta.shape[0]:
        raise ValueError(
            f"site '{site}' has {y.shape[1]} features and {x.shape[1]} covariates, "
            f"the model {model.grand_mean.shape[0]} and {model.beta.shape[0]}"
        )
    location = model.grand_mean + x @ model.beta
    sd_pooled = np.sqrt(model.var_pooled)
    standardized = (y - location) / sd_pooled
    return (standardized - model.gamma_star[s]) / np.sqrt(model.delta_star[s]) * sd_pooled + location
