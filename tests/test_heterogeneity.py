"""Site-heterogeneity statistics from aggregates agree with the same statistics on raw values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from analyses.heterogeneity import (
    anova_from_aggregates,
    heterogeneity_report,
    histogram_distance,
    standardized_mean_difference,
    write_heatmap_png,
    write_table_csv,
)

EDGES = np.linspace(0.0, 1000.0, 65)


def summary(values: np.ndarray) -> dict:
    return {"n": len(values), "mean": float(np.mean(values)), "var": float(np.var(values, ddof=1))}


def test_anova_equals_scipy_on_raw_values() -> None:
    rng = np.random.default_rng(0)
    raw = {"a": rng.normal(0, 1, 12), "b": rng.normal(0.5, 2, 30), "c": rng.normal(-0.2, 1.5, 7)}
    f, p = anova_from_aggregates({site: summary(values) for site, values in raw.items()})
    expected = stats.f_oneway(*raw.values())
    assert f == pytest.approx(expected.statistic, rel=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)


def test_anova_refuses_a_single_group() -> None:
    with pytest.raises(ValueError, match="at least 2 groups"):
        anova_from_aggregates({"a": {"n": 5, "mean": 1.0, "var": 1.0}})


def test_smd_is_hedges_g() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 10), rng.normal(0, 2, 25)
    pooled_sd = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    cohens_d = (a.mean() - b.mean()) / pooled_sd
    hedges_g = cohens_d * (1 - 3 / (4 * (len(a) + len(b)) - 9))
    assert standardized_mean_difference(summary(a), summary(b)) == pytest.approx(hedges_g, rel=1e-12)
    assert standardized_mean_difference(summary(b), summary(a)) == pytest.approx(-hedges_g, rel=1e-12)


def test_histogram_distances_equal_scipy() -> None:
    rng = np.random.default_rng(2)
    counts_a, _ = np.histogram(rng.normal(400, 80, 5000), EDGES)
    counts_b, _ = np.histogram(rng.normal(470, 120, 3000), EDGES)
    centres = (EDGES[:-1] + EDGES[1:]) / 2
    wasserstein = histogram_distance(counts_a, counts_b, EDGES, "wasserstein")
    assert wasserstein == pytest.approx(stats.wasserstein_distance(centres, centres, counts_a, counts_b), rel=1e-12)
    assert wasserstein == pytest.approx(70, abs=10)
    js = histogram_distance(counts_a, counts_b, EDGES, "jensen_shannon")
    assert js == pytest.approx(jensenshannon(counts_a, counts_b, base=2), rel=1e-12)
    assert histogram_distance(counts_a, counts_a, EDGES, "jensen_shannon") == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="bins"):
        histogram_distance(counts_a[:-1], counts_b, EDGES)


def synthetic_federation(seed: int = 3, shifted: str = "hospital-c") -> tuple[dict, dict]:
    """Four sites, 6 features, 40 cases each; `shifted` reads every feature and intensity higher."""
    rng = np.random.default_rng(seed)
    aggregates, histograms = {}, {}
    for site in ("hospital-a", "hospital-b", "hospital-c", "hospital-d"):
        offset = 1.5 if site == shifted else 0.0
        aggregates[site] = {f"original_firstorder_f{j}": summary(rng.normal(offset, 1, 40)) for j in range(6)}
        counts, _ = np.histogram(rng.normal(400 + 150 * offset, 80, 20000), EDGES)
        histograms[site] = {"n": 40, "counts": counts, "edges": EDGES}
    return aggregates, histograms


def test_report_finds_the_shifted_site() -> None:
    aggregates, histograms = synthetic_federation()
    report = heterogeneity_report(aggregates, histograms)
    features = report["features"]
    assert all(entry["significant"] and entry["p_adjusted"] >= entry["p"] for entry in features.values())
    assert report["share_significant"] == 1.0
    assert all("hospital-c" in entry["max_smd_pair"] for entry in features.values())
    for kind in ("wasserstein", "jensen_shannon"):
        mean_to_others = report["intensity"][f"{kind}_mean_to_others"]
        assert max(mean_to_others, key=mean_to_others.get) == "hospital-c"
    assert max(report["site_mean_abs_smd"], key=report["site_mean_abs_smd"].get) == "hospital-c"
    matrix = np.array(report["intensity"]["wasserstein"])
    np.testing.assert_allclose(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 0)


def test_no_site_effect_is_mostly_not_significant() -> None:
    aggregates, _ = synthetic_federation(seed=4, shifted="nobody")
    report = heterogeneity_report(aggregates)
    assert report["n_significant"] <= 1
    assert report["intensity"] is None


def test_suppressed_features_are_skipped_per_site() -> None:
    aggregates, _ = synthetic_federation()
    del aggregates["hospital-c"]["original_firstorder_f0"]
    aggregates["hospital-b"]["original_firstorder_f0"]["n"] = 1
    for site in ("hospital-a", "hospital-b", "hospital-d"):
        del aggregates[site]["original_firstorder_f1"]
    aggregates["hospital-a"]["original_shape_only_here"] = {"n": 40, "mean": 3.0, "var": 1.0}
    report = heterogeneity_report(aggregates)
    f0 = report["features"]["original_firstorder_f0"]
    assert f0["testable"] and f0["sites"] == ["hospital-a", "hospital-d"]
    assert f0["site_smd"]["hospital-c"] is None and f0["site_smd"]["hospital-b"] is None
    for lonely in ("original_firstorder_f1", "original_shape_only_here"):
        entry = report["features"][lonely]
        assert not entry["testable"] and entry["p"] is None and not entry["significant"]
    assert report["n_testable"] == 5


def test_unusable_aggregates_name_the_site() -> None:
    aggregates, _ = synthetic_federation()
    aggregates["hospital-d"]["original_firstorder_f2"]["var"] = float("nan")
    with pytest.raises(ValueError, match="feature 'original_firstorder_f2': site 'hospital-d'"):
        heterogeneity_report(aggregates)


def test_histograms_on_different_edges_are_refused() -> None:
    aggregates, histograms = synthetic_federation()
    histograms["hospital-b"] = {**histograms["hospital-b"], "edges": EDGES * 2}
    with pytest.raises(ValueError, match="hospital-b"):
        heterogeneity_report(aggregates, histograms)


def test_suppressed_histograms_are_skipped_and_bad_ones_named() -> None:
    aggregates, histograms = synthetic_federation()
    histograms["hospital-a"] = {**histograms["hospital-a"], "counts": np.zeros(EDGES.size - 1)}
    intensity = heterogeneity_report(aggregates, histograms)["intensity"]
    assert intensity["skipped"] == ["hospital-a"] and "hospital-a" not in intensity["wasserstein_mean_to_others"]
    histograms["hospital-b"] = {**histograms["hospital-b"], "counts": -histograms["hospital-b"]["counts"]}
    with pytest.raises(ValueError, match="site 'hospital-b'"):
        heterogeneity_report(aggregates, histograms)


def test_heatmap_and_table_are_written(tmp_path: Path) -> None:
    aggregates, histograms = synthetic_federation()
    del aggregates["hospital-a"]["original_firstorder_f3"]
    report = heterogeneity_report(aggregates, histograms)
    png = write_heatmap_png(report, tmp_path / "heterogeneity.png", "Site effect per feature")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    table = write_table_csv(report, tmp_path / "heterogeneity.csv").read_text().splitlines()
    assert table[0].startswith("feature,n_sites,testable,f,p,p_adjusted,significant")
    assert len(table) == 1 + 6
