"""How different are the sites? Site effects on radiomics features, from per-site aggregates only.

Before harmonizing (or pooling) features across hospitals, a reviewer wants to know whether the sites
differ at all, in which features, and which site is the outlier. Everything here runs at the data
scientist's side on what the sites return:

    aggregates            {site: {feature: {"n": int, "mean": float, "var": float (ddof=1), ...}}}
    intensity_histograms  {site: {"n": cases, "counts": [B], "edges": [B + 1]}}

A feature a site did not report (suppressed because too few cases had it) is simply absent at that
site; it is tested across the remaining sites, and reported as not testable with fewer than two.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

Summary = Mapping[str, Any]


# ---- statistics from (n, mean, var) --------------------------------------------------------------


def _moments(group: str, summary: Summary) -> tuple[int, float, float]:
    """(n, mean, var) of one group, with a ValueError naming it when they cannot be used."""
    n, mean = int(summary["n"]), float(summary["mean"])
    var = float(summary["var"]) if n > 1 else 0.0
    if n < 1 or not np.isfinite(mean) or not np.isfinite(var) or var < 0:
        raise ValueError(f"site '{group}' has unusable aggregates n={n}, mean={mean}, var={var}")
    return n, mean, var


def anova_from_aggregates(groups: Mapping[str, Summary]) -> tuple[float, float]:
    """One-way ANOVA across groups (sites): (F, p), exactly as scipy.stats.f_oneway on the raw values.

    The between- and within-group sums of squares need only each group's n, mean and sample variance:
    SS_between = sum n_g (mean_g - grand mean)^2 and SS_within = sum (n_g - 1) var_g.
    With no within-group spread F is infinite (p = 0) unless the means agree too (F, p are NaN).
    """
    if len(groups) < 2:
        raise ValueError(f"ANOVA needs at least 2 groups, got {list(groups)}")
    n, mean, var = (np.array(column) for column in zip(*(_moments(g, s) for g, s in groups.items())))
    df_between, df_within = len(groups) - 1, int(n.sum()) - len(groups)
    if df_within < 1:
        raise ValueError(f"ANOVA needs more cases than groups, got {int(n.sum())} cases in {len(groups)} groups")
    grand_mean = (n * mean).sum() / n.sum()
    ss_between = (n * (mean - grand_mean) ** 2).sum()
    ss_within = ((n - 1) * var).sum()
    if ss_within == 0:
        return (float("inf"), 0.0) if ss_between > 0 else (float("nan"), float("nan"))
    f = (ss_between / df_between) / (ss_within / df_within)
    return float(f), float(stats.f.sf(f, df_between, df_within))


def standardized_mean_difference(a: Summary, b: Summary) -> float:
    """Hedges' g of a minus b: the mean difference in pooled-SD units, corrected for small-sample bias.

    Cohen's d with the pooled SD sqrt(((n_a - 1) var_a + (n_b - 1) var_b) / (n_a + n_b - 2)), times
    J = 1 - 3 / (4 (n_a + n_b) - 9); site cohorts are often small enough for d's upward bias to matter.
    """
    n_a, mean_a, var_a = _moments("a", a)
    n_b, mean_b, var_b = _moments("b", b)
    if n_a + n_b < 3:
        raise ValueError(f"a standardized mean difference needs at least 3 cases in total, got {n_a + n_b}")
    pooled_sd = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    if pooled_sd == 0:
        raise ValueError("both groups have zero variance: the standardized mean difference is undefined")
    correction = 1.0 - 3.0 / (4.0 * (n_a + n_b) - 9.0)
    return float(correction * (mean_a - mean_b) / pooled_sd)


def _pooled_summary(groups: Mapping[str, Summary]) -> tuple[float, float]:
    """(mean, SD) of all groups' cases together: total SS = within-group SS + between-group SS."""
    n, mean, var = (np.array(column) for column in zip(*(_moments(g, s) for g, s in groups.items())))
    grand_mean = (n * mean).sum() / n.sum()
    total_ss = ((n - 1) * var).sum() + (n * (mean - grand_mean) ** 2).sum()
    return float(grand_mean), float(np.sqrt(total_ss / (n.sum() - 1)))


# ---- histograms ----------------------------------------------------------------------------------


def _checked_edges(edges: Any) -> np.ndarray:
    edges = np.asarray(edges, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be a strictly increasing 1-D array of at least 2 values")
    return edges


def _probabilities(name: str, counts: Any, n_bins: int) -> np.ndarray:
    """[B] counts normalised to sum 1, or a ValueError naming the histogram."""
    values = np.asarray(counts, dtype=float)
    if values.shape != (n_bins,):
        raise ValueError(f"histogram {name} has {values.size} bins, the edges define {n_bins}")
    if np.any(values < 0) or not np.all(np.isfinite(values)) or values.sum() == 0:
        raise ValueError(f"histogram {name} must have non-negative, finite counts with a positive total")
    return values / values.sum()


def _distance(p: np.ndarray, q: np.ndarray, edges: np.ndarray, kind: str) -> float:
    if kind == "wasserstein":
        centres = (edges[:-1] + edges[1:]) / 2
        return float(stats.wasserstein_distance(centres, centres, p, q))
    if kind == "jensen_shannon":
        return float(jensenshannon(p, q, base=2))
    raise ValueError(f"unknown histogram distance '{kind}', use 'wasserstein' or 'jensen_shannon'")


def histogram_distance(
    counts_a: Any, counts_b: Any, edges: Any, kind: Literal["wasserstein", "jensen_shannon"] = "wasserstein"
) -> float:
    """Distance between two histograms on the same bins.

    "wasserstein": earth mover's distance (W1) with each bin's mass at its centre, in intensity units:
    how far, on average, intensity has to move to turn one site's distribution into the other's.
    "jensen_shannon": Jensen-Shannon *distance* (the square root of the divergence, base 2), in [0, 1]:
    how much the shapes differ, whatever the units; a metric, unlike the divergence.
    """
    edges = _checked_edges(edges)
    p, q = _probabilities("a", counts_a, edges.size - 1), _probabilities("b", counts_b, edges.size - 1)
    return _distance(p, q, edges, kind)


def _common_edges(histograms: Mapping[str, Summary]) -> np.ndarray:
    """The bin edges every site used; sites must histogram on agreed edges for distances to mean anything."""
    first_site, first = next(iter(histograms.items()))
    edges = _checked_edges(first["edges"])
    for site, histogram in histograms.items():
        if not np.array_equal(np.asarray(histogram["edges"], dtype=float), edges):
            raise ValueError(f"site '{site}' used different histogram edges from site '{first_site}'")
    return edges


def histogram_distances(histograms: Mapping[str, Summary]) -> dict[str, Any] | None:
    """Pairwise site distance matrices [k, k] for both kinds, and each site's mean distance to the others.

    A site whose histogram is empty (every bin suppressed) is left out and listed under "skipped";
    with fewer than 2 sites left there is nothing to compare and the result is None.
    """
    if not histograms:
        return None
    edges = _common_edges(histograms)
    skipped = [site for site, histogram in histograms.items() if np.sum(histogram["counts"]) == 0]
    sites = [site for site in histograms if site not in skipped]
    if len(sites) < 2:
        return None
    probabilities = [_probabilities(f"of site '{site}'", histograms[site]["counts"], edges.size - 1) for site in sites]
    result: dict[str, Any] = {"sites": sites, "skipped": skipped}
    for kind in ("wasserstein", "jensen_shannon"):
        matrix = np.zeros((len(sites), len(sites)))
        for i, j in itertools.combinations(range(len(sites)), 2):
            matrix[i, j] = matrix[j, i] = _distance(probabilities[i], probabilities[j], edges, kind)
        result[kind] = matrix.tolist()
        mean_to_others = matrix.sum(axis=1) / (len(sites) - 1)
        result[f"{kind}_mean_to_others"] = dict(zip(sites, mean_to_others.tolist()))
    return result


# ---- the report ----------------------------------------------------------------------------------


def _usable_sites(aggregates: Mapping[str, Mapping[str, Summary]], feature: str) -> dict[str, Summary]:
    """The sites that reported `feature` with at least 2 cases (a variance); the others are skipped."""
    return {
        site: features[feature]
        for site, features in aggregates.items()
        if feature in features and int(features[feature]["n"]) >= 2
    }


def _feature_entry(feature: str, groups: Mapping[str, Summary], sites: Sequence[str]) -> dict[str, Any]:
    """ANOVA, largest pairwise Hedges' g and each site's SMD against the pooled mean, for one feature.

    A site's SMD against the pooled mean is (site mean - mean of all reporting sites' cases) / SD of
    those cases: where the site sits within the federation, comparable across features.
    Not testable: fewer than 2 sites reported it, or it has no variation at all (ANOVA undefined).
    """
    entry: dict[str, Any] = {"sites": list(groups), "n_sites": len(groups), "testable": False}
    entry.update(f=None, p=None, p_adjusted=None, significant=False, max_abs_smd=None, max_smd_pair=None)
    entry["site_smd"] = {site: None for site in sites}
    if len(groups) < 2:
        return entry
    try:
        f, p = anova_from_aggregates(groups)
    except ValueError as error:
        raise ValueError(f"feature '{feature}': {error}") from error
    if np.isnan(f):
        return entry
    entry.update(testable=True, f=f, p=p)
    pooled_mean, pooled_sd = _pooled_summary(groups)
    if pooled_sd > 0:
        entry["site_smd"].update({site: (float(g["mean"]) - pooled_mean) / pooled_sd for site, g in groups.items()})
    pairs = [
        (abs(standardized_mean_difference(groups[a], groups[b])), (a, b))
        for a, b in itertools.combinations(groups, 2)
        if float(groups[a]["var"]) > 0 or float(groups[b]["var"]) > 0
    ]
    if pairs:
        smd, pair = max(pairs)
        entry.update(max_abs_smd=smd, max_smd_pair=list(pair))
    return entry


def heterogeneity_report(
    aggregates: Mapping[str, Mapping[str, Summary]],
    intensity_histograms: Mapping[str, Summary] | None = None,
    alpha: float = 0.05,
    correction: Literal["fdr_bh", "none"] = "fdr_bh",
) -> dict[str, Any]:
    """Per-feature site effects and, given intensity histograms, how far each site is from the others.

    A feature is significant when its p-value, Benjamini-Hochberg adjusted across the testable features
    by default, is below `alpha`: radiomics extracts ~100 features, and unadjusted tests would flag
    about 5 of them at 0.05 even without any site effect. `correction="none"` keeps raw p-values.

    Returns plain lists, dicts, floats and None (for what could not be computed), ready for JSON:
    {"sites", "features": {feature: {"sites", "n_sites", "testable", "f", "p", "p_adjusted",
    "significant", "max_abs_smd", "max_smd_pair", "site_smd": {site: SMD vs pooled mean}}},
    "n_testable", "n_significant", "share_significant", "site_mean_abs_smd", "alpha", "correction",
    "intensity": histogram_distances(...), None without 2 non-empty site histograms}.
    """
    if correction not in ("fdr_bh", "none"):
        raise ValueError(f"unknown correction '{correction}', use 'fdr_bh' or 'none'")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    sites = list(aggregates)
    feature_names = dict.fromkeys(feature for features in aggregates.values() for feature in features)
    features = {name: _feature_entry(name, _usable_sites(aggregates, name), sites) for name in feature_names}
    tested = [name for name, entry in features.items() if entry["testable"]]
    raw = [features[name]["p"] for name in tested]
    adjusted = stats.false_discovery_control(raw, method="bh") if correction == "fdr_bh" and raw else raw
    for name, p_adjusted in zip(tested, adjusted):
        features[name].update(p_adjusted=float(p_adjusted), significant=bool(p_adjusted < alpha))
    n_significant = sum(entry["significant"] for entry in features.values())
    return {
        "sites": sites,
        "features": features,
        "n_testable": len(tested),
        "n_significant": n_significant,
        "share_significant": n_significant / len(tested) if tested else None,
        "site_mean_abs_smd": _site_mean_abs_smd(features, sites),
        "alpha": alpha,
        "correction": correction,
        "intensity": histogram_distances(intensity_histograms or {}),
    }


def _site_mean_abs_smd(features: Mapping[str, Mapping[str, Any]], sites: Sequence[str]) -> dict[str, float | None]:
    """Per site, the mean |SMD vs pooled mean| over the features it reported: which site stands out."""
    result: dict[str, float | None] = {}
    for site in sites:
        values = [abs(entry["site_smd"][site]) for entry in features.values() if entry["site_smd"][site] is not None]
        result[site] = float(np.mean(values)) if values else None
    return result


# ---- outputs for reviewers -----------------------------------------------------------------------


def smd_matrix(report: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(sites, features, [sites, features] SMD vs pooled mean, NaN where a site did not report)."""
    sites, features = list(report["sites"]), list(report["features"])
    values = np.full((len(sites), len(features)), np.nan)
    for j, feature in enumerate(features):
        for i, site in enumerate(sites):
            smd = report["features"][feature]["site_smd"][site]
            if smd is not None:
                values[i, j] = smd
    return sites, features, values


def write_heatmap_png(report: Mapping[str, Any], path: Path, title: str) -> Path:
    """Sites x features heatmap of each site's SMD against the pooled mean; '*' marks significant features.

    A diverging scale centred on 0 shows direction and size of a site's offset; grey cells are features
    the site did not report. The figure grows with the number of features so labels stay readable.
    Drawn on a bare matplotlib Figure (rendered by Agg), not pyplot: works headless and leaves the
    caller's backend alone.
    """
    import matplotlib
    from matplotlib.figure import Figure

    sites, features, values = smd_matrix(report)
    if not features:
        raise ValueError("the report has no features to draw")
    labels = [f"{f} *" if report["features"][f]["significant"] else f for f in features]
    limit = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0, 0.1)
    width = min(max(6.0, 0.28 * len(features) + 3.0), 60.0)
    height = 0.45 * len(sites) + 0.09 * max(len(label) for label in labels) + 1.8
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots()
    colormap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks(range(len(features)), labels, rotation=90, fontsize=8)
    axes.set_yticks(range(len(sites)), sites, fontsize=9)
    correction = "BH-adjusted " if report["correction"] == "fdr_bh" else ""
    axes.set_xlabel(f"feature (* site effect significant, {correction}p < {report['alpha']:g}; grey: not reported)")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="SMD vs pooled mean (SD units)", shrink=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def write_table_csv(report: Mapping[str, Any], path: Path) -> Path:
    """One row per feature: ANOVA, adjusted p, significance, largest pairwise g, and each site's SMD."""
    sites = list(report["sites"])
    columns = ["feature", "n_sites", "testable", "f", "p", "p_adjusted", "significant", "max_abs_smd", "max_smd_pair"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns + [f"smd_{site}" for site in sites])
        for name, entry in report["features"].items():
            pair = " vs ".join(entry["max_smd_pair"]) if entry["max_smd_pair"] else ""
            row = [name, entry["n_sites"], entry["testable"], *(entry[c] for c in columns[3:8]), pair]
            writer.writerow(["" if v is None else v for v in row + [entry["site_smd"][s] for s in sites]])
    return path
