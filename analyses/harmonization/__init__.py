"""Federated harmonization: removing scanner and site effects with aggregates only.

`combat` harmonizes extracted features (distributed ComBat); `nyul` standardizes image intensities
(Nyul-Udupa landmarks). In both, sites send summaries and the data scientist sends back parameters;
harmonized per-case values never leave their site.
"""

from analyses.harmonization.combat import (
    CombatModel,
    PooledRegression,
    apply_combat,
    combat_site_moments,
    combat_site_residuals,
    fit_combat_distributed,
    fit_combat_model,
    pooled_regression,
)
from analyses.harmonization.covariates import encode_covariates
from analyses.harmonization.nyul import (
    StandardScale,
    case_landmarks,
    fit_standard_scale,
    site_landmark_summary,
    standardize,
)

__all__ = [
    "CombatModel",
    "PooledRegression",
    "StandardScale",
    "apply_combat",
    "case_landmarks",
    "combat_site_moments",
    "combat_site_residuals",
    "encode_covariates",
    "fit_combat_distributed",
    "fit_combat_model",
    "fit_standard_scale",
    "pooled_regression",
    "site_landmark_summary",
    "standardize",
]
