"""The noise filter: differential privacy for a request whose params carry `dp`.

Only the top-level "n" and the per-feature statistics under "features" whose feature has declared
bounds are released, with calibrated noise; every other section is withheld, because nothing
bounds one case's influence on it (a case adds any number of voxels to a voxel histogram, and
acquisition counts are not noised here). The epsilon is charged to the data scientist's budget
(`budget.py`) before the run.

How the noise is calibrated. Neighbouring data sets have the same number of cases n, one case
replaced by another ("bounded" DP), so n itself is released exactly. The task clips each feature
value x to the request's bounds [L, U] before aggregating, so for one feature:

- mean of n values: replacing one case moves the sum by at most U - L, so the sensitivity is (U - L) / n;
- sample variance (ddof=1): with the other n - 1 values fixed (mean m, sum of squared deviations
  Q), var = Q / (n - 1) + (x - m)^2 / n, so replacing x by y moves it by |(x - m)^2 - (y - m)^2| / n
  <= (U - L)^2 / n;
- histogram of the n values on the request's fixed edges: one case leaves one bin and enters
  another, so the L1 sensitivity is 2 and the L2 sensitivity is sqrt(2).

The request's epsilon (and delta) are split evenly over 3 statistics per declared feature, mean,
variance and histogram, whether or not a histogram is asked for, so the split depends on the
request alone (basic sequential composition: the released statistics together cost at most the
request's epsilon and delta). With k = 3 * (number of bounded features), each statistic gets
eps_i = epsilon / k and delta_i = delta / k, and each released value receives independent noise:

- "laplace": Laplace(0, b) with b = L1 sensitivity / eps_i (pure eps-DP);
- "gaussian": Normal(0, sigma) with sigma = L2 sensitivity * sqrt(2 ln(1.25 / delta_i)) / eps_i
  (Dwork & Roth 2014, Theorem A.1, which holds for eps_i < 1; a larger eps_i is refused).

Afterwards means are clipped to [L, U], variances to [0, max], histogram counts rounded and made
non-negative: post-processing, which costs no privacy. Noise comes from numpy's PCG64 seeded by the
operating system; like any floating-point Laplace sampler it is not hardened against attacks on
the low-order bits (Mironov 2012), which is acceptable for the epsilons used in research releases.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from datasite_setup.disclosure.released import Released

MECHANISMS = ("laplace", "gaussian")
STATISTICS_PER_FEATURE = 3  # mean, variance, histogram
_DP_KEYS = {"epsilon", "mechanism", "delta", "bounds"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dp_problems(dp: Any) -> str | None:
    """What is wrong with a request's `dp` parameter, or None.

    Form: {"epsilon": float > 0, "mechanism": "laplace" | "gaussian", "delta": float in (0, 1)
    (gaussian only), "bounds": {feature name: [low, high]}}.
    """
    if not isinstance(dp, dict):
        return "must be a dict with epsilon, mechanism and bounds"
    unknown = sorted(set(dp) - _DP_KEYS)
    if unknown:
        return f"unknown keys {unknown}; allowed: {sorted(_DP_KEYS)}"
    if not _is_number(dp.get("epsilon")) or dp["epsilon"] <= 0:
        return "'epsilon' must be a finite number > 0"
    if dp.get("mechanism") not in MECHANISMS:
        return f"'mechanism' must be one of {', '.join(MECHANISMS)}"
    bounds = dp.get("bounds")
    if not isinstance(bounds, dict) or not bounds:
        return "'bounds' must map each feature to release to [low, high]; features without bounds are withheld"
    for name, pair in bounds.items():
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_number(v) for v in pair) and pair[0] < pair[1]):
            return f"bounds of '{name}' must be [low, high] with finite low < high"
    statistics = STATISTICS_PER_FEATURE * len(bounds)
    if dp["mechanism"] == "gaussian":
        if not _is_number(dp.get("delta")) or not 0 < dp["delta"] < 1:
            return "the gaussian mechanism needs 'delta' in (0, 1)"
        if dp["epsilon"] / statistics >= 1:
            return (f"the gaussian mechanism's calibration holds for epsilon per statistic < 1; "
                    f"{dp['epsilon']:g} over {statistics} statistics is more (use laplace or more features)")
    elif "delta" in dp:
        return "'delta' is only used by the gaussian mechanism"
    return None


def dp_epsilon(params: dict[str, Any] | None) -> float | None:
    """The epsilon a request spends (None: it does not ask for differential privacy)."""
    if not params or "dp" not in params:
        return None
    return float(params["dp"]["epsilon"])


def add_noise(result: dict[str, Any], dp: dict[str, Any], rng: np.random.Generator, released: Released) -> dict[str, Any]:
    """Keep n and the bounded features, each with noise; withhold every other section."""
    bounds = dp["bounds"]
    statistics = STATISTICS_PER_FEATURE * len(bounds)
    eps = dp["epsilon"] / statistics
    delta = dp.get("delta", 0.0) / statistics
    features = result.get("features", {})
    released.dp_epsilon = float(dp["epsilon"])
    released.withheld_sections = sum(1 for key in result if key not in ("n", "features"))
    released.withheld_sections += sum(1 for name in features if name not in bounds)
    noisy = {}
    for name, group in features.items():
        if name in bounds:
            noisy[name] = _noisy_feature(group, *(float(v) for v in bounds[name]), dp["mechanism"], eps, delta, rng)
    return {"n": result["n"], "features": noisy} if "n" in result else {"features": noisy}


def _noise(sensitivity: float, mechanism: str, eps: float, delta: float, rng: np.random.Generator, size: int | None = None) -> Any:
    if mechanism == "laplace":
        return rng.laplace(0.0, sensitivity / eps, size)
    return rng.normal(0.0, sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / eps, size)


def _noisy_feature(group: dict[str, Any], low: float, high: float, mechanism: str, eps: float, delta: float,
                   rng: np.random.Generator) -> dict[str, Any]:
    n = int(group["n"])
    width = high - low
    noisy: dict[str, Any] = {"n": n}
    if "mean" in group:
        noisy["mean"] = float(np.clip(group["mean"] + _noise(width / n, mechanism, eps, delta, rng), low, high))
    if "var" in group:
        largest = width**2 / 4 * (n / (n - 1) if n > 1 else 1.0)
        noisy["var"] = float(np.clip(group["var"] + _noise(width**2 / n, mechanism, eps, delta, rng), 0.0, largest))
    if "hist" in group:
        counts = np.asarray(group["hist"], dtype=float)
        sensitivity = 2.0 if mechanism == "laplace" else math.sqrt(2.0)
        counts = counts + _noise(sensitivity, mechanism, eps, delta, rng, counts.size)
        noisy["hist"] = np.maximum(np.rint(counts), 0).astype(np.int64)
    return noisy
