"""A domain's metrics over several sites, from their evaluation counts summed.

Counts are additive, so the sum over sites is the count of the union and the metric taken from it
is exact. Only counts every site released are summed: a site that noises its evaluations
(`[privacy.evaluation_dp]`) withholds some (liver CT's voxel counts), and the metrics that need
them are then absent from the pool rather than computed from part of the sites.
"""

from __future__ import annotations

from domains.domain import Domain


def pooled_metrics(domain: Domain, per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """`domain`'s metrics from the counts of `per_site` summed, with `n_cases`; empty without sites."""
    if not per_site:
        return {}
    shared = set.intersection(*(set(m) for m in per_site.values()))
    counts = {key: sum(m[key] for m in per_site.values()) for key in sorted(shared)}
    pooled = {k: float(v) for k, v in domain.metrics_from_counts(counts).items()}
    pooled["n_cases"] = counts.get("n_cases", 0.0)
    return pooled
