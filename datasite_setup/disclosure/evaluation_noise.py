"""The evaluation-noise filter: differential privacy on every evaluation that leaves the site.

Why. An evaluation is a sum over cases of a function of the model's output and the case's label,
and the data scientist chooses the model. A model that outputs a constant c turns a regression
domain's error sums into sum_i |c - y_i|; a few dozen evaluations at different c give every
patient's label (the slope of that sum in c counts the labels below c). No rule about cohorts sees
it: every evaluation covers the same, large enough cohort. Only noise bounds what such queries
learn, so a site that holds labels it must not give out (patient weight and height, say) sets
`[privacy.evaluation_dp]`, and every `evaluate` result then leaves noised, whatever the request.

How. The domain declares `evaluation_bounds`: for each of its evaluation counts, the most one case
can add (the domain clips each case's contribution to [0, bound] before summing; a bound of 0
marks a count that does not depend on what is in the case, such as the number of cases, which is
released exactly: neighbouring data sets have the same cases count, one case replaced). A domain
that declares none is refused at such a site. Dividing each noised count by its bound gives a
vector that one case moves by at most 1 per coordinate, so by at most sqrt(K) in L2 over the K
noised counts; Gaussian noise of standard deviation noise_multiplier * sqrt(K) on each divided
coordinate makes one evaluation a Gaussian mechanism of multiplier `noise_multiplier`. The site
charges it before the run to the data scientist's epsilon budget through the same RDP accountant as
model updates (`update_accountant.py`). Released counts are rounded and floored at 0, and the
metrics are recomputed from them (post-processing, free of privacy cost); the scalars carry the
noise multiplier, and `n_cases` (how many cases were scored) leaves as it is. Noise comes from
numpy's PCG64 seeded by the operating system.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

NOISE_SCALAR = "dp_noise_multiplier"
CASES_SCALAR = "n_cases"  # how many cases the evaluation covered: public, like the dataset's listing


@dataclass(frozen=True)
class EvaluationNoise:
    """A site's evaluation privacy: the noise multiplier of one evaluation and the delta its
    epsilons are stated at."""

    noise_multiplier: float
    delta: float = 1e-5

    def protect(self, result: Mapping[str, float], bounds: Mapping[str, float],
                metrics_from_counts: Callable[[dict[str, int]], dict[str, float]],
                rng: np.random.Generator | None = None) -> dict[str, float]:
        """The releasable form of an evaluation: its bounded counts noised, its public counts as they
        are, the metrics recomputed from them; nothing else of `result` leaves."""
        rng = rng or np.random.default_rng()
        noised = sorted(key for key, bound in bounds.items() if bound > 0)
        scale = self.noise_multiplier * math.sqrt(len(noised))
        counts = {key: int(result[key]) for key, bound in bounds.items() if bound == 0}
        for key in noised:
            counts[key] = max(0, int(round(float(result[key]) + rng.normal(0.0, scale * bounds[key]))))
        metrics = metrics_from_counts(dict(counts))
        cases = {CASES_SCALAR: float(result[CASES_SCALAR])} if CASES_SCALAR in result else {}
        return {**{k: float(v) for k, v in counts.items()}, **{k: float(v) for k, v in metrics.items()}, **cases,
                NOISE_SCALAR: float(self.noise_multiplier)}


def evaluation_noise_problem(domain: Any) -> str | None:
    """Why `domain`'s evaluations cannot be released with noise (None when they can): it must say
    how much one case adds to each of its counts."""
    bounds = getattr(domain, "evaluation_bounds", None)
    if not bounds:
        return (f"this site releases evaluations only with differential-privacy noise, and domain {domain.name} does "
                "not bound what one case adds to its evaluation counts")
    if not any(bound > 0 for bound in bounds.values()):
        return f"domain {domain.name} declares no count that depends on a case's contents; nothing to noise"
    return None
