"""Federated Nyul-Udupa standardization brings different scanners' intensities onto one scale."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from analyses.harmonization import StandardScale, case_landmarks, fit_standard_scale, site_landmark_summary, standardize

SCANNERS = {"hospital-a": (1.0, 0.0, 1.0), "hospital-b": (3.0, 200.0, 0.8), "hospital-c": (0.5, 50.0, 1.3)}
CASES = {"hospital-a": 4, "hospital-b": 6, "hospital-c": 3}


def tissue_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 20^3 'head': dark background, a body of three tissue classes in varying proportions, its mask."""
    image = rng.normal(5.0, 2.0, (20, 20, 20)).clip(0)
    grid = np.indices(image.shape) - 9.5
    body = (grid**2).sum(axis=0) < 8.5**2
    tissue = rng.choice([100.0, 180.0, 260.0], size=body.sum(), p=rng.dirichlet([8, 8, 8]))
    image[body] = tissue + rng.normal(0, 12, body.sum())
    return image, body


def scanner(image: np.ndarray, gain: float, offset: float, gamma: float) -> np.ndarray:
    """A scanner's monotone, nonlinear intensity response to the same underlying tissue."""
    return gain * np.clip(image, 0, None) ** gamma + offset


def federation(seed: int = 0) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return {
        site: [
            (scanner(image, *SCANNERS[site]), mask) for image, mask in (tissue_image(rng) for _ in range(CASES[site]))
        ]
        for site in SCANNERS
    }


def site_foreground(cases: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([image[mask] for image, mask in cases])


def standardized_image(image: np.ndarray, mask: np.ndarray, scale: StandardScale) -> np.ndarray:
    return standardize(image, case_landmarks(image, mask, scale.percentiles), scale)


def summary(cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    return site_landmark_summary([case_landmarks(image, mask) for image, mask in cases])


def mean_pairwise_wasserstein(sites: dict[str, np.ndarray]) -> float:
    return float(np.mean([wasserstein_distance(sites[a], sites[b]) for a, b in itertools.combinations(sites, 2)]))


def test_standardization_removes_scanner_differences() -> None:
    sites = federation()
    summaries = {site: summary(cases) for site, cases in sites.items()}
    scale = fit_standard_scale(summaries, scale=(0.0, 100.0))
    standardized = {
        site: [(standardized_image(image, mask, scale), mask) for image, mask in cases]
        for site, cases in sites.items()
    }
    raw = {site: site_foreground(cases) for site, cases in sites.items()}
    harmonized = {site: site_foreground(cases) for site, cases in standardized.items()}
    before, after = mean_pairwise_wasserstein(raw), mean_pairwise_wasserstein(harmonized)
    raw_range = np.ptp(np.concatenate(list(raw.values())))
    after_range = np.ptp(np.concatenate(list(harmonized.values())))
    assert after / after_range < (before / raw_range) / 20, f"W1 before {before:.1f}, after {after:.2f}"
    linear = mean_pairwise_wasserstein({site: rescaled_1_99(values) for site, values in raw.items()})
    assert after < linear / 2, f"piecewise W1 {after:.2f} vs linear 1-99% rescaling {linear:.2f}"


def rescaled_1_99(values: np.ndarray) -> np.ndarray:
    """The linear baseline: each site's 1st and 99th percentiles sent to 0 and 100; cannot undo gamma."""
    low, high = np.percentile(values, [1.0, 99.0])
    return (values - low) / (high - low) * 100.0


def test_standard_scale_spans_the_requested_range() -> None:
    sites = federation(1)
    summaries = {site: summary(cases) for site, cases in sites.items()}
    scale = fit_standard_scale(summaries, scale=(10.0, 90.0))
    assert scale.landmarks[0] == pytest.approx(10.0) and scale.landmarks[-1] == pytest.approx(90.0)
    assert np.all(np.diff(scale.landmarks) > 0)


def test_mapping_is_monotone_and_extrapolates_linearly() -> None:
    image, mask = federation(2)["hospital-b"][0]
    landmarks = case_landmarks(image, mask)
    scale = StandardScale(percentiles=[1.0, 50.0, 99.0], landmarks=[0.0, 30.0, 100.0])
    three = case_landmarks(image, mask, scale.percentiles)
    values = np.linspace(image.min() - 100, image.max() + 100, 2001)
    mapped = standardize(values, three, scale)
    assert np.all(np.diff(mapped) > 0)
    np.testing.assert_allclose(standardize(three, three, scale), scale.landmarks)
    beyond = standardize(three[-1] + np.array([10.0, 20.0]), three, scale)
    slope = (100.0 - 30.0) / (three[-1] - three[1])
    np.testing.assert_allclose(beyond, 100.0 + slope * np.array([10.0, 20.0]))
    assert landmarks.shape == (11,)


def test_foreground_without_mask_is_above_the_image_mean() -> None:
    image, mask = federation(3)["hospital-a"][0]
    expected = np.percentile(image[image > image.mean()], [5.0, 50.0, 95.0])
    np.testing.assert_allclose(case_landmarks(image, None, [5.0, 50.0, 95.0]), expected)


def test_scale_round_trips_through_plain_params() -> None:
    scale = StandardScale(percentiles=[1.0, 50.0, 99.0], landmarks=[0.0, 42.5, 100.0], scale=(0.0, 100.0))
    params = scale.to_params()
    assert all(isinstance(v, list) and all(isinstance(x, float) for x in v) for v in params.values())
    assert StandardScale.from_params(params) == scale


def test_site_summary_holds_aggregates_only() -> None:
    cases = [np.array([1.0, 2.0, 4.0]), np.array([3.0, 4.0, 8.0])]
    assert site_landmark_summary(cases) == {"n": 2, "mean": [2.0, 3.0, 6.0], "var": [2.0, 2.0, 8.0]}


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="site 'hospital-x'.*3 landmarks"):
        fit_standard_scale({"hospital-x": {"n": 3, "mean": [1.0, 2.0, 3.0], "var": [0.0] * 3}})
    with pytest.raises(ValueError, match="strictly increasing"):
        standardize(np.zeros(3), np.array([1.0, 1.0, 2.0]), StandardScale([1.0, 50.0, 99.0], [0.0, 50.0, 100.0]))
    with pytest.raises(ValueError, match="empty"):
        case_landmarks(np.ones((4, 4)), np.zeros((4, 4)))
