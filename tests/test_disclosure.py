"""Disclosure control at the site (`datasite_setup.disclosure`) and its place in `run_request`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from datasite_setup.disclosure import PrivacyBudget, BudgetExhausted, dp_epsilon, dp_problems, protect
from datasite_setup.site_config import SiteConfigError, load_site_config
from tests.conftest import write_site_config

LAPLACE = {"epsilon": 1.5, "mechanism": "laplace", "bounds": {"f": [0.0, 10.0]}}


def aggregates() -> dict:
    return {
        "n": 6,
        "features": {
            "f": {"n": 6, "mean": 5.0, "var": 4.0, "hist": np.array([0, 1, 3, 2], np.int64)},
            "g": {"n": 1, "mean": 2.0, "var": 0.0},
        },
        "intensity": {"n": 6, "counts": np.array([1, 0, 40, 2], np.int64)},
        "acquisition": {"Manufacturer": {"GE": {"n": 5}, "Philips": {"n": 1}}},
    }


def test_small_groups_are_removed_and_counted_not_named() -> None:
    result, released = protect(aggregates(), {}, min_cohort=2)
    assert set(result["features"]) == {"f"}
    assert result["acquisition"]["Manufacturer"] == {"GE": {"n": 5}}
    assert released.suppressed_groups == 2 and result["suppressed_groups"] == 2


def test_a_result_whose_whole_cohort_is_too_small_releases_nothing() -> None:
    result, released = protect({"n": 1, "features": {"f": {"n": 1, "mean": 3.0}}}, {}, min_cohort=2)
    assert result == {} and released.suppressed_groups == 1


def test_histogram_bins_below_the_minimum_cohort_are_zeroed() -> None:
    result, released = protect(aggregates(), {}, min_cohort=3)
    assert result["features"]["f"]["hist"].tolist() == [0, 0, 3, 0]
    assert result["intensity"]["counts"].tolist() == [0, 0, 40, 0]
    assert released.zeroed_bins == 4 and result["zeroed_bins"] == 4


def test_float_arrays_are_not_histograms() -> None:
    result, _ = protect({"n": 5, "mean": np.array([0.5, 1.0])}, {}, min_cohort=3)
    assert result["mean"].tolist() == [0.5, 1.0]


def test_dp_releases_only_bounded_features_with_noise_and_clipping() -> None:
    rng = np.random.default_rng(0)
    result, released = protect(aggregates(), {"dp": LAPLACE}, min_cohort=2, rng=rng)
    assert set(result) == {"n", "features", "suppressed_groups", "zeroed_bins"}
    assert set(result["features"]) == {"f"}
    group = result["features"]["f"]
    assert group["n"] == 6 and 0.0 <= group["mean"] <= 10.0 and 0.0 <= group["var"] <= 100 / 4 * 6 / 5
    assert group["hist"].dtype.kind == "i" and (group["hist"] >= 0).all()
    assert released.dp_epsilon == 1.5 and released.withheld_sections == 2


@pytest.mark.parametrize("mechanism, delta", [("laplace", None), ("gaussian", 1e-5)])
def test_dp_noise_has_the_documented_scale(mechanism: str, delta: float | None) -> None:
    """Mean: sensitivity (U-L)/n; epsilon split over 3 statistics per bounded feature."""
    dp = {"epsilon": 0.9, "mechanism": mechanism, "bounds": {"f": [0.0, 10.0]}}
    if delta:
        dp["delta"] = delta
    rng = np.random.default_rng(1)
    base = {"n": 500, "features": {"f": {"n": 500, "mean": 5.0, "var": 4.0}}}  # noise well inside the bounds
    means = np.array([protect(json.loads(json.dumps(base)), {"dp": dp}, 2, rng)[0]["features"]["f"]["mean"]
                      for _ in range(4000)])
    eps_i, sensitivity = 0.9 / 3, 10.0 / 500
    if mechanism == "laplace":
        expected_sd = np.sqrt(2) * sensitivity / eps_i
    else:
        expected_sd = sensitivity * np.sqrt(2 * np.log(1.25 / (delta / 3))) / eps_i
    assert means.std() == pytest.approx(expected_sd, rel=0.08)
    assert means.mean() == pytest.approx(5.0, abs=4 * expected_sd / np.sqrt(len(means)))


@pytest.mark.parametrize(
    "dp, words",
    [
        ({"epsilon": 0, "mechanism": "laplace", "bounds": {"f": [0, 1]}}, "epsilon"),
        ({"epsilon": 1, "mechanism": "exponential", "bounds": {"f": [0, 1]}}, "mechanism"),
        ({"epsilon": 1, "mechanism": "laplace", "bounds": {}}, "bounds"),
        ({"epsilon": 1, "mechanism": "laplace", "bounds": {"f": [1, 0]}}, "low < high"),
        ({"epsilon": 1, "mechanism": "gaussian", "bounds": {"f": [0, 1]}}, "delta"),
        ({"epsilon": 6, "mechanism": "gaussian", "delta": 1e-5, "bounds": {"f": [0, 1]}}, "per statistic < 1"),
        ({"epsilon": 1, "mechanism": "laplace", "delta": 0.1, "bounds": {"f": [0, 1]}}, "only used"),
        ({"epsilon": 1, "mechanism": "laplace", "bounds": {"f": [0, 1]}, "seed": 3}, "unknown keys"),
    ],
)
def test_bad_dp_parameters_are_refused_with_a_reason(dp: dict, words: str) -> None:
    assert words in (dp_problems(dp) or "")


def test_valid_dp_parameters_pass_and_cost_their_epsilon() -> None:
    assert dp_problems(LAPLACE) is None
    assert dp_epsilon({"dp": LAPLACE}) == 1.5 and dp_epsilon({"settings": {}}) is None


def test_budget_is_charged_persisted_and_refused_past_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "privacy_budget.json"
    assert PrivacyBudget(path, 2.0).charge("ds@uni.example", 1.5) == pytest.approx(0.5)
    again = PrivacyBudget(path, 2.0)  # a restarted site reads the ledger back
    assert again.spent("ds@uni.example") == 1.5 and again.spent("other@uni.example") == 0.0
    with pytest.raises(BudgetExhausted, match="needs epsilon 1, 0.5 of this site's budget of 2 remain"):
        again.charge("ds@uni.example", 1.0)
    assert again.charge("other@uni.example", 2.0) == 0.0
    assert json.loads(path.read_text())["spent"] == {"ds@uni.example": 1.5, "other@uni.example": 2.0}
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_charges_never_overspend(tmp_path: Path) -> None:
    budget = PrivacyBudget(tmp_path / "privacy_budget.json", 10.0)
    accepted: list[bool] = []

    def charge() -> None:
        try:
            budget.charge("ds@uni.example", 1.0)
            accepted.append(True)
        except BudgetExhausted:
            accepted.append(False)

    threads = [threading.Thread(target=charge) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(accepted) == 10 and budget.spent("ds@uni.example") == 10.0


def test_site_config_reads_and_checks_the_dp_budget(tmp_path: Path) -> None:
    assert load_site_config(write_site_config(tmp_path / "a", "site-a", 8081)).privacy.dp_epsilon_budget == 10.0
    custom = write_site_config(tmp_path / "b", "site-b", 8081, extra="dp_epsilon_budget = 3\n")
    assert load_site_config(custom).privacy.dp_epsilon_budget == 3.0
    for bad in ("-1.0", '"lots"', "inf"):
        path = write_site_config(tmp_path / "c", "site-c", 8081, extra=f"dp_epsilon_budget = {bad}\n")
        with pytest.raises(SiteConfigError, match="dp_epsilon_budget"):
            load_site_config(path)


# ---- run_request: the parent applies the rules whatever the task returns ------------------------------


def thin_code(task: str) -> SimpleNamespace:
    import inspect

    from analyses.site_requests import thin_function

    return SimpleNamespace(raw_code=inspect.getsource(thin_function(task, "unit")))


def tiny_cases(n: int) -> list[dict]:
    rng = np.random.default_rng(3)
    cases = []
    for i in range(n):
        mask = np.zeros((6, 12, 12), np.uint8)
        mask[1:5, 3:9, 3:9] = 1
        cases.append({
            "case_id": f"case-{i}", "image": rng.normal(100 + 10 * i, 5, (6, 12, 12)).astype(np.float32), "mask": mask,
            "spacing": [3.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0], "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
            "metadata": {"Manufacturer": "GE" if i < 3 else "Philips", "SliceThickness": 3.0},
        })
    return cases


def test_run_request_suppresses_small_groups_and_charges_dp_before_running(tmp_path: Path) -> None:
    from datasite_setup.site_execution import SiteRefusal, run_request

    config = load_site_config(write_site_config(tmp_path, "site-unit", 8081, min_cohort=3, extra="dp_epsilon_budget = 1.0\n"))
    config.data_dir.mkdir(parents=True)
    code = thin_code("radiomics_aggregates")
    params = {"settings": {"featureClass": {"firstorder": ["Mean"]}}, "intensity_edges": [0.0, 100.0, 200.0]}
    result = run_request(config, code, {"cases": tiny_cases(4), "params": params}, "ds@uni.example")
    assert result["acquisition"]["Manufacturer"] == {"GE": {"n": 3}}  # Philips (1 case) suppressed
    assert result["suppressed_groups"] == 1

    dp = {"epsilon": 1.0, "mechanism": "laplace", "bounds": {"original_firstorder_Mean": [0.0, 200.0]}}
    noisy = run_request(config, code, {"cases": tiny_cases(4), "params": {**params, "dp": dp}}, "ds@uni.example")
    assert set(noisy["features"]) == {"original_firstorder_Mean"} and "acquisition" not in noisy
    with pytest.raises(SiteRefusal, match="budget exhausted"):
        run_request(config, code, {"cases": tiny_cases(4), "params": {**params, "dp": dp}}, "ds@uni.example")
    log = [json.loads(line) for line in (config.data_dir / "audit.log").read_text().splitlines()]
    assert [e["action"] for e in log] == ["ran", "charged-budget", "ran", "refused-budget"]
    assert log[0]["suppressed_groups"] == 1 and log[2]["dp_epsilon"] == 1.0


def test_a_site_chooses_its_filters_and_one_without_noise_refuses_dp_before_running(tmp_path: Path) -> None:
    from datasite_setup.site_execution import SiteRefusal, run_request

    result, released = protect(aggregates(), {}, min_cohort=3, filters=("histogram_bins",))
    assert result["acquisition"]["Manufacturer"]["Philips"] == {"n": 1}  # no min-count rule at this site
    assert released.suppressed_groups == 0 and result["intensity"]["counts"].tolist() == [0, 0, 40, 0]

    extra = 'filters = ["min_count", "histogram_bins", "release_ledger"]\n'
    config = load_site_config(write_site_config(tmp_path, "site-unit", 8081, min_cohort=3, extra=extra))
    config.data_dir.mkdir(parents=True)
    params = {"settings": {"featureClass": {"firstorder": ["Mean"]}}, "dp": LAPLACE}
    with pytest.raises(SiteRefusal, match="does not offer differentially private releases"):
        run_request(config, thin_code("radiomics_aggregates"), {"cases": tiny_cases(4), "params": params}, "ds@uni.example")
    assert not (config.data_dir / "privacy_budget.json").exists()
