"""Distributed ComBat gives pooled neuroCombat's harmonized values, from site aggregates only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat

from analyses.harmonization import (
    CombatModel,
    apply_combat,
    combat_site_moments,
    combat_site_residuals,
    encode_covariates,
    fit_combat_distributed,
)
from analyses.heterogeneity import anova_from_aggregates

SITES = {"hospital-b": 23, "hospital-a": 41, "hospital-c": 12}
P = 7
TOLERANCE = 1e-6


def synthetic_sites(seed: int) -> dict[str, dict]:
    """Three sites with their own shift and scale per feature, an age and a sex effect.

    Ages are whole years because neuroCombat casts continuous covariates to float32; whole numbers
    survive that cast exactly, so both sides regress on identical covariates.
    """
    rng = np.random.default_rng(seed)
    age_effect, sex_effect = rng.normal(0, 0.05, P), rng.normal(0, 1.0, P)
    base = rng.normal(10, 3, P)
    sites = {}
    for s, (site, n) in enumerate(SITES.items()):
        age = rng.integers(20, 80, n).astype(float)
        sex = rng.choice(["F", "M"], n)
        shift, scale = rng.normal(0, 2, P) * (s + 1), rng.uniform(0.5, 2.5, P)
        noise = rng.normal(0, 1, (n, P)) * scale
        features = base + shift + np.outer(age, age_effect) + np.outer(sex == "M", sex_effect) + noise
        sites[site] = {"features": features, "age": age, "sex": sex}
    return sites


def pooled_neurocombat(sites: dict[str, dict], with_covariates: bool) -> dict[str, np.ndarray]:
    frames = [pd.DataFrame({"site": site, "age": d["age"], "sex": d["sex"]}) for site, d in sites.items()]
    covars = pd.concat(frames, ignore_index=True)
    pooled = np.vstack([d["features"] for d in sites.values()])
    kwargs = {"categorical_cols": ["sex"], "continuous_cols": ["age"]} if with_covariates else {}
    harmonized = neuroCombat(dat=pooled.T, covars=covars, batch_col="site", **kwargs)["data"].T
    bounds = np.cumsum([0, *(len(d["age"]) for d in sites.values())])
    return {site: harmonized[bounds[i] : bounds[i + 1]] for i, site in enumerate(sites)}


def site_covariates(d: dict, with_covariates: bool) -> np.ndarray | None:
    if not with_covariates:
        return None
    return encode_covariates({"age": d["age"], "sex": d["sex"]}, continuous=["age"], categorical={"sex": ["F", "M"]})


@pytest.mark.parametrize("with_covariates", [True, False], ids=["age+sex", "no-covariates"])
@pytest.mark.parametrize("seed", [0, 1])
def test_distributed_combat_matches_pooled_neurocombat(with_covariates: bool, seed: int) -> None:
    sites = synthetic_sites(seed)
    expected = pooled_neurocombat(sites, with_covariates)
    site_data = {site: (d["features"], site_covariates(d, with_covariates)) for site, d in sites.items()}
    model = fit_combat_distributed(site_data)
    for site, (features, covariates) in site_data.items():
        harmonized = apply_combat(features, covariates, model, site)
        relative = np.abs(harmonized - expected[site]) / np.abs(expected[site])
        assert relative.max() < TOLERANCE, f"{site}: max relative deviation {relative.max():.2e}"


def site_effect_p_values(per_site: dict[str, np.ndarray]) -> np.ndarray:
    """[p] one-way ANOVA p-value of the site effect on each feature, from per-site aggregates."""
    return np.array([
        anova_from_aggregates(
            {site: {"n": len(y), "mean": y[:, j].mean(), "var": y[:, j].var(ddof=1)} for site, y in per_site.items()}
        )[1]
        for j in range(P)
    ])


def test_harmonization_removes_the_site_effect() -> None:
    sites = synthetic_sites(2)
    site_data = {site: (d["features"], site_covariates(d, True)) for site, d in sites.items()}
    model = fit_combat_distributed(site_data)
    harmonized = {site: apply_combat(y, x, model, site) for site, (y, x) in site_data.items()}
    assert (site_effect_p_values({site: y for site, (y, _) in site_data.items()}) < 0.01).sum() >= P - 1
    assert site_effect_p_values(harmonized).min() > 0.05


def test_sites_send_only_aggregates() -> None:
    features = np.random.default_rng(3).normal(size=(15, 4))
    covariates = np.random.default_rng(4).normal(size=(15, 2))
    moments = combat_site_moments(features, covariates)
    residuals = combat_site_residuals(features, covariates, intercept=np.zeros(4), beta=np.zeros((2, 4)))
    assert {k: np.shape(v) for k, v in moments.items()} == {"n": (), "XtX": (3, 3), "XtY": (3, 4)}
    assert {k: np.shape(v) for k, v in residuals.items()} == {"n": (), "mean": (4,), "ss": (4,)}


def test_model_travels_as_plain_params_and_a_site_gets_only_its_own_effects() -> None:
    sites = synthetic_sites(0)
    site_data = {site: (d["features"], site_covariates(d, True)) for site, d in sites.items()}
    model = fit_combat_distributed(site_data)
    params = model.to_params("hospital-a")
    assert params["sites"] == ["hospital-a"] and len(params["gamma_star"]) == 1
    features, covariates = site_data["hospital-a"]
    np.testing.assert_allclose(
        apply_combat(features, covariates, CombatModel.from_params(params), "hospital-a"),
        apply_combat(features, covariates, model, "hospital-a"),
    )
    with pytest.raises(ValueError, match="hospital-b"):
        apply_combat(*site_data["hospital-b"], CombatModel.from_params(params), "hospital-b")


def test_inconsistent_sites_are_named() -> None:
    rng = np.random.default_rng(5)
    site_data = {"a": (rng.normal(size=(10, 3)), None), "b": (rng.normal(size=(10, 4)), None)}
    with pytest.raises(ValueError, match="site 'b'"):
        fit_combat_distributed(site_data)
    with pytest.raises(ValueError, match="at least 2 cases"):
        fit_combat_distributed({"a": (rng.normal(size=(1, 3)), None), "b": (rng.normal(size=(5, 3)), None)})


def test_covariate_confounded_with_site_is_refused() -> None:
    rng = np.random.default_rng(6)
    site_data = {
        "a": (rng.normal(size=(10, 3)), encode_covariates({"sex": ["M"] * 10}, categorical={"sex": ["F", "M"]})),
        "b": (rng.normal(size=(10, 3)), encode_covariates({"sex": ["F"] * 10}, categorical={"sex": ["F", "M"]})),
    }
    with pytest.raises(ValueError, match="confounded with site"):
        fit_combat_distributed(site_data)


def test_unknown_category_is_named() -> None:
    with pytest.raises(ValueError, match="'sex'.*'X'"):
        encode_covariates({"sex": ["F", "X"]}, categorical={"sex": ["F", "M"]})
