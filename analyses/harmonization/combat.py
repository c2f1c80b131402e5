"""Distributed ComBat: the harmonization neuroCombat computes on pooled cases, from site aggregates only.

ComBat (Johnson et al. 2007; Fortin et al. 2018) models feature j of case i at site s as

    y_ij = alpha_j + x_i . beta_j + gamma_sj + delta_sj * e_ij

and removes the additive (gamma) and multiplicative (delta) site effects after shrinking them towards
their across-feature averages (empirical Bayes), while keeping the covariate effects beta. Pooled ComBat
needs every case in one place; Chen et al. ("Distributed ComBat", NeuroImage 2022) showed that every
quantity it estimates is a function of per-site sums. The protocol here:

    round 1, site   combat_site_moments     n, X'X and X'Y of the site's [1 | covariates] design
    central         pooled_regression       site intercepts, covariate effects beta, grand mean alpha
    round 2, site   combat_site_residuals   n, per-feature mean and sum of squares of its residuals
    central         fit_combat_model        pooled variance, empirical-Bayes gamma* and delta* per site
    site            apply_combat            the site's harmonized features, which stay at the site

Two site rounds suffice where Chen et al. use three: each site has its own intercept in the regression,
so a site's residuals already determine both its share of the pooled variance and the mean and variance
of its standardized data (a shift and a rescaling of the same residuals).

The numbers are neuroCombat 0.2.12's (parametric empirical Bayes, mean_only=False, no reference batch),
including its conventions: the grand mean weights each site's intercept by its share of cases, the
pooled variance divides by the total number of cases, and the EB iteration stops on neuroCombat's own
relative-change rule. One deliberate difference: neuroCombat rounds continuous covariates to float32,
here they stay float64 (the tests use whole-number ages, which both represent exactly).

The site rounds and the harmonization itself are `datasite_setup.harmonization.combat`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from datasite_setup.harmonization.combat import (
    CombatModel,
    apply_combat,
    combat_site_moments,
    combat_site_residuals,
    site_index,
)

__all__ = [
    "CombatModel", "PooledRegression", "apply_combat", "combat_site_moments", "combat_site_residuals",
    "fit_combat_distributed", "fit_combat_model", "pooled_regression",
]

EB_CONVERGENCE = 1e-4
EB_MAX_ITERATIONS = 10_000
MAX_CONDITION = 1e12


@dataclass(frozen=True)
class PooledRegression:
    """The pooled least-squares fit of features on [site indicators | covariates].

    site_intercepts: [k, p], one row per site in `sites` order; beta: [q, p]; sample_sizes: [k].
    """

    sites: tuple[str, ...]
    site_intercepts: np.ndarray
    beta: np.ndarray
    sample_sizes: np.ndarray

    @property
    def grand_mean(self) -> np.ndarray:
        """[p]: neuroCombat's alpha, the site intercepts averaged with weights n_site / N."""
        weights = self.sample_sizes / self.sample_sizes.sum()
        return weights @ self.site_intercepts

    def site_params(self, site: str) -> dict[str, list]:
        """What round 2 sends to `site`: its own intercept and beta, not the other sites' intercepts."""
        return {"intercept": self.site_intercepts[site_index(self.sites, site)].tolist(), "beta": self.beta.tolist()}


def _check_moment_shapes(moments: Mapping[str, Mapping[str, Any]]) -> tuple[int, int]:
    """(q, p) common to every site's moments, or a ValueError naming the site that disagrees."""
    if len(moments) < 2:
        raise ValueError(f"ComBat needs at least 2 sites, got {len(moments)}")
    shapes = {site: np.shape(m["XtY"]) for site, m in moments.items()}
    first_site, (rows, p) = next(iter(shapes.items()))
    for site, shape in shapes.items():
        if shape != (rows, p):
            raise ValueError(
                f"site '{site}' sent XtY of shape {shape}, site '{first_site}' sent {(rows, p)}: "
                "sites must use the same features and covariates in the same order"
            )
        if np.shape(moments[site]["XtX"]) != (rows, rows):
            shape = np.shape(moments[site]["XtX"])
            raise ValueError(f"site '{site}' sent XtX of shape {shape}, expected {(rows, rows)}")
    return rows - 1, p


def pooled_regression(moments: Mapping[str, Mapping[str, Any]]) -> PooledRegression:
    """Central, after round 1: solve the pooled normal equations assembled from the site moments.

    The pooled design is [one indicator column per site | covariates] with no global intercept, as in
    neuroCombat; its X'X and X'Y are block sums of the sites' [1 | covariates] moments.
    """
    q, p = _check_moment_shapes(moments)
    sites = tuple(moments)
    k = len(sites)
    xtx = np.zeros((k + q, k + q))
    xty = np.zeros((k + q, p))
    for s, site in enumerate(sites):
        site_xtx = np.asarray(moments[site]["XtX"], dtype=float)
        site_xty = np.asarray(moments[site]["XtY"], dtype=float)
        xtx[s, s] = site_xtx[0, 0]
        xtx[s, k:] = xtx[k:, s] = site_xtx[0, 1:]
        xtx[k:, k:] += site_xtx[1:, 1:]
        xty[s] = site_xty[0]
        xty[k:] += site_xty[1:]
    if np.linalg.cond(xtx) > MAX_CONDITION:
        raise ValueError(
            "the pooled design [site indicators | covariates] is singular: a covariate is constant, "
            "duplicates another, or is confounded with site (e.g. a category present at one site only)"
        )
    coefficients = np.linalg.solve(xtx, xty)
    sizes = np.array([int(moments[site]["n"]) for site in sites], dtype=float)
    return PooledRegression(sites=sites, site_intercepts=coefficients[:k], beta=coefficients[k:], sample_sizes=sizes)


def _pooled_variance(residuals: Mapping[str, Mapping[str, Any]], sites: tuple[str, ...]) -> np.ndarray:
    """[p]: mean squared residual over all N cases (neuroCombat divides by N, not N - k - q).

    A feature with no residual variance anywhere gets neuroCombat's substitute, the median of the
    "variance is non-zero" indicators across features (1.0 unless most features are constant).
    """
    total_n = sum(int(residuals[site]["n"]) for site in sites)
    squares = sum(
        np.asarray(residuals[site]["ss"]) + int(residuals[site]["n"]) * np.asarray(residuals[site]["mean"]) ** 2
        for site in sites
    )
    var_pooled = squares / total_n
    var_pooled[var_pooled == 0] = np.median(var_pooled != 0)
    return var_pooled


def _eb_priors(gamma_hat: np.ndarray, delta_hat: np.ndarray) -> tuple[float, float, float, float]:
    """One site's hyper-parameters, pooled across its p features: gamma ~ N(gamma_bar, t2),
    delta ~ InverseGamma(a, b) fitted by the method of moments (neuroCombat's aprior/bprior)."""
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    return gamma_hat.mean(), gamma_hat.var(ddof=1), (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2


def _empirical_bayes(
    site: str, gamma_hat: np.ndarray, delta_hat: np.ndarray, spread: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """One site's gamma* and delta* [p]: neuroCombat's `it_sol` fixed-point iteration, on aggregates.

    `spread` [p] is the sum of squared deviations of the site's standardized data from their mean; the
    per-case sum of squares around a candidate gamma that `it_sol` needs is spread + n (gamma_hat - gamma)^2.
    `delta_hat` has zero variances replaced by 1, as neuroCombat's convert_zeroes does, while `spread`
    keeps the raw value. The stopping rule copies neuroCombat's, sign of the denominator included.
    """
    gamma_bar, t2, a, b = _eb_priors(gamma_hat, delta_hat)
    gamma_old, delta_old = gamma_hat.copy(), delta_hat.copy()
    for _ in range(EB_MAX_ITERATIONS):
        gamma_new = (t2 * n * gamma_hat + delta_old * gamma_bar) / (t2 * n + delta_old)
        sum2 = spread + n * (gamma_hat - gamma_new) ** 2
        delta_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        change = max((abs(gamma_new - gamma_old) / gamma_old).max(), (abs(delta_new - delta_old) / delta_old).max())
        if not change > EB_CONVERGENCE:  # neuroCombat loops `while change > conv`
            return gamma_new, delta_new
        gamma_old, delta_old = gamma_new, delta_new
    raise ValueError(f"site '{site}': empirical Bayes did not converge in {EB_MAX_ITERATIONS} iterations")


def fit_combat_model(regression: PooledRegression, residuals: Mapping[str, Mapping[str, Any]]) -> CombatModel:
    """Central, after round 2: pooled variance, each site's standardized mean and variance, and EB.

    A site's standardized data are (y - alpha - x beta) / sqrt(var_pooled) = (intercept_site - alpha +
    residual) / sqrt(var_pooled), so its mean (gamma_hat) and variance (delta_hat) follow from the
    residual aggregates without another round.
    """
    missing = [site for site in regression.sites if site not in residuals]
    if missing:
        raise ValueError(f"no round-2 residual statistics from site(s) {', '.join(missing)}")
    if regression.site_intercepts.shape[1] < 2:
        raise ValueError("ComBat's empirical Bayes pools site effects across features; it needs at least 2 features")
    var_pooled = _pooled_variance(residuals, regression.sites)
    gamma_star, delta_star = [], []
    for s, site in enumerate(regression.sites):
        n, n_round_1 = int(residuals[site]["n"]), int(regression.sample_sizes[s])
        if n != n_round_1:
            raise ValueError(f"site '{site}' reported {n} cases in round 2 but {n_round_1} in round 1")
        offset = regression.site_intercepts[s] - regression.grand_mean + np.asarray(residuals[site]["mean"])
        gamma_hat = offset / np.sqrt(var_pooled)
        spread = np.asarray(residuals[site]["ss"]) / var_pooled
        delta_hat = spread / (n - 1)
        delta_hat[delta_hat == 0] = 1.0
        site_gamma, site_delta = _empirical_bayes(site, gamma_hat, delta_hat, spread, n)
        gamma_star.append(site_gamma)
        delta_star.append(site_delta)
    return CombatModel(
        sites=regression.sites,
        grand_mean=regression.grand_mean,
        beta=regression.beta,
        var_pooled=var_pooled,
        gamma_star=np.array(gamma_star),
        delta_star=np.array(delta_star),
    )


def fit_combat_distributed(site_data: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> CombatModel:
    """Run both rounds in one process, for tests and demos: {site: (features [n, p], covariates [n, q])}.

    Each site function sees only its own arrays and the central functions only what the sites return,
    exactly as they would across the federation.
    """
    regression = pooled_regression({site: combat_site_moments(y, x) for site, (y, x) in site_data.items()})
    residuals = {
        site: combat_site_residuals(y, x, **regression.site_params(site)) for site, (y, x) in site_data.items()
    }
    return fit_combat_model(regression, residuals)
