"""Distributed ComBat through the `combat_statistics` site task, in-process (no server).

Each site's three calls run the installed task on that site's cases only, and every result passes
the task's output contract; the data scientist's rounds (`combat_rounds`) see nothing else. The
model they fit must equal ComBat fitted from the sites' per-case features directly
(`fit_combat_distributed`, itself equal to pooled neuroCombat in test_harmonization_combat), and
the harmonized aggregates must be those of the harmonized per-case features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from analyses.combat_run import combat_rounds, common_features
from analyses.harmonization.combat import CombatModel, apply_combat, fit_combat_distributed
from datasite_setup.site_tasks import TASKS, SiteFacts, run_installed_task
from datasite_setup.site_tasks.combat_statistics import MAX_FEATURES
from datasite_setup.site_tasks.radiomics_aggregates import case_features
from tests.test_radiomics_features import SETTINGS, make_case

SITES = ("hospital-a", "hospital-b", "hospital-c")
MIN_COHORT = 3
TASK = TASKS["combat_statistics"]
SEX = {"categorical": {"PatientSex": ["F", "M"]}}


def site_cases(index: int, n: int = 6) -> list[dict[str, Any]]:
    """A site whose scanner scales and shifts intensities its own way, plus one lesion-free case."""
    cases = []
    for i in range(n):
        case = make_case(seed=i + 3 * index)
        case["image"] = case["image"] * (1.0 + 0.4 * index) + 50.0 * index
        case["metadata"] = {**case["metadata"], "PatientSex": "FM"[(i + index) % 2]}
        cases.append(case)
    empty = make_case(seed=99, lesion=False)
    return cases + [empty]


@pytest.fixture(scope="module")
def fleet() -> dict[str, list[dict[str, Any]]]:
    return {site: site_cases(i) for i, site in enumerate(SITES)}


@pytest.fixture(scope="module")
def features(fleet: dict[str, list[dict[str, Any]]]) -> list[str]:
    first = case_features(fleet[SITES[0]][0], SETTINGS)
    return sorted(name for name in first if name.startswith("original_firstorder_"))[:8]


def call_sites(fleet: dict[str, list[dict[str, Any]]]):
    def call(params_by_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
        results = {}
        for site, params in params_by_site.items():
            assert TASK.problems(params) == []
            result = run_installed_task("combat_statistics", fleet[site], params, MIN_COHORT)
            TASK.contract(params, SiteFacts(min_cohort=MIN_COHORT)).check(result)
            results[site] = result
        return results

    return call


def direct(fleet: dict[str, list[dict[str, Any]]], features: list[str], with_sex: bool) -> dict[str, tuple]:
    """site -> (per-case features [n, p], covariates) computed here from the private cases."""
    data = {}
    for site, cases in fleet.items():
        used = [c for c in cases if c["mask"].any()]
        y = np.array([[case_features(c, SETTINGS)[f] for f in features] for c in used])
        x = np.array([[float(c["metadata"]["PatientSex"] == "M")] for c in used]) if with_sex else None
        data[site] = (y, x)
    return data


@pytest.mark.parametrize("with_sex", [False, True], ids=["no-covariates", "sex"])
def test_rounds_through_the_task_reproduce_combat_on_the_per_case_features(fleet, features, with_sex: bool) -> None:
    base = {"settings": SETTINGS, "features": features, **({"covariates": SEX} if with_sex else {})}
    fitted = combat_rounds(call_sites(fleet), list(SITES), base)

    data = direct(fleet, features, with_sex)
    expected = fit_combat_distributed(data)
    model = CombatModel.from_params(fitted["model"])
    for field in ("grand_mean", "beta", "var_pooled", "gamma_star", "delta_star"):
        np.testing.assert_allclose(getattr(model, field), getattr(expected, field), rtol=1e-9, atol=1e-12, err_msg=field)
    for site, (y, x) in data.items():
        harmonized = apply_combat(y, x, expected, site)
        got = fitted["harmonized"][site]
        assert got["n"] == y.shape[0] == 6 and got["skipped"] == 1
        for j, name in enumerate(features):
            assert got["features"][name]["mean"] == pytest.approx(harmonized[:, j].mean(), rel=1e-9)
            assert got["features"][name]["var"] == pytest.approx(harmonized[:, j].var(ddof=1), rel=1e-9)


def test_harmonized_site_means_move_together(fleet, features) -> None:
    fitted = combat_rounds(call_sites(fleet), list(SITES), {"settings": SETTINGS, "features": features})
    mean = "original_firstorder_Mean"
    raw = [np.mean([case_features(c, SETTINGS)[mean] for c in fleet[s] if c["mask"].any()]) for s in SITES]
    after = [fitted["harmonized"][s]["features"][mean]["mean"] for s in SITES]
    assert np.ptp(after) < 0.2 * np.ptp(raw)


def test_nothing_per_case_leaves_a_stage(fleet, features) -> None:
    """Moments are sums (X'X, X'Y), residuals and harmonized results are per-feature aggregates."""
    params = {"settings": SETTINGS, "features": features, "covariates": SEX, "stage": "moments"}
    moments = run_installed_task("combat_statistics", fleet["hospital-a"], params, MIN_COHORT)
    assert set(moments) == {"n", "skipped", "XtX", "XtY"}
    assert moments["XtX"].shape == (4,) and moments["XtY"].shape == (2 * len(features),)


def test_a_cohort_too_small_once_unusable_cases_are_dropped_is_refused(fleet, features) -> None:
    """Five cases pass the site's minimum cohort of 5, but one has no lesion: 4 usable are too few."""
    cases = fleet["hospital-a"][:4] + fleet["hospital-a"][-1:]
    params = {"settings": SETTINGS, "features": features, "stage": "moments"}
    with pytest.raises(ValueError, match="4 usable cases; ComBat statistics need at least 5"):
        run_installed_task("combat_statistics", cases, params, min_cohort=5)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"stage": "everything"}, "must be one of moments"),
        ({"features": []}, "1 to 128"),
        ({"features": ["a", "a"]}, "distinct"),
        ({"features": [f"f{i}" for i in range(MAX_FEATURES + 1)]}, "1 to 128"),
        ({"covariates": {"categorical": {"PatientName": ["a", "b"]}}}, "unknown covariate"),
        ({"covariates": {"categorical": {"PatientSex": ["F"]}}}, "at least 2 distinct levels"),
        ({"settings": {"featureClass": {"nonsense": None}}}, "pyradiomics"),
    ],
)
def test_bad_parameters_are_refused_before_anything_runs(change: dict, words: str) -> None:
    params = {"settings": SETTINGS, "features": ["original_firstorder_Mean"], "stage": "moments", **change}
    assert words in " ".join(TASK.problems(params))


def test_common_features_are_those_every_site_returned_with_a_spread() -> None:
    aggregates = {
        "a": {"features": {"x": {"n": 5, "var": 1.0}, "y": {"n": 5, "var": 0.0}, "z": {"n": 5, "var": 2.0}}},
        "b": {"features": {"x": {"n": 5, "var": 1.0}, "y": {"n": 5, "var": 3.0}}},
    }
    assert common_features(aggregates, 10) == ["x"]


def test_a_covariate_level_held_by_fewer_than_min_cohort_cases_is_refused(fleet, features) -> None:
    """One woman among six: her row of X'Y would be her features."""
    from datasite_setup.site_tasks import TaskRefusal

    cases = [{**case, "metadata": {**case["metadata"], "PatientSex": "F" if i == 0 else "M"}}
             for i, case in enumerate(fleet["hospital-a"])]
    params = {"settings": SETTINGS, "features": features, "covariates": SEX, "stage": "moments"}
    with pytest.raises(TaskRefusal, match="covariate level is held by fewer than 3"):
        run_installed_task("combat_statistics", cases, params, MIN_COHORT)
    no_sex = {"settings": SETTINGS, "features": features, "stage": "moments"}
    assert run_installed_task("combat_statistics", cases, no_sex, MIN_COHORT)["n"] == 6


def test_a_case_the_request_would_leave_out_refuses_the_run(fleet, features) -> None:
    """A level the request does not list would silently drop that case: the whole run is refused instead."""
    from datasite_setup.site_tasks import TaskRefusal

    cases = [{**case, "metadata": {**case["metadata"], "PatientSex": "O" if i == 0 else case["metadata"].get("PatientSex")}}
             for i, case in enumerate(fleet["hospital-a"])]
    params = {"settings": SETTINGS, "features": features, "covariates": SEX, "stage": "moments"}
    with pytest.raises(TaskRefusal, match="no listed level"):
        run_installed_task("combat_statistics", cases, params, MIN_COHORT)
    with pytest.raises(TaskRefusal, match="not finite"):
        run_installed_task("combat_statistics", fleet["hospital-a"],
                           {"settings": SETTINGS, "features": ["not_a_feature"], "stage": "moments"}, MIN_COHORT)


def test_moments_name_the_cases_behind_each_level_for_the_release_ledger(fleet, features) -> None:
    from datasite_setup.site_tasks.task import feature_quantity

    params = {"settings": SETTINGS, "features": features[:1], "covariates": SEX, "stage": "moments"}
    release = TASK.run_with_cohorts(fleet["hospital-a"], params, SiteFacts(min_cohort=MIN_COHORT))
    assert {c.cases for c in release.cohorts} == {(0, 1, 2, 3, 4, 5), (1, 3, 5), (0, 2, 4)}  # all, F, M
    assert {c.quantity for c in release.cohorts} == {feature_quantity(features[0])}
