"""Disclosure control: what of an aggregate result may leave this site. The one place these rules live.

Site tasks compute; they do not decide what is safe to release. Every site-task result that is a
set of aggregates (an `AggregatesContract`) passes through `protect` in the site's parent process,
after the task ran in isolation and before the output contract's final check, and a request that
asks for differential privacy is charged against its data scientist's budget (`PrivacyBudget`)
before it runs at all. The rules, in order:

1. Small groups are removed. A group (a dict with an "n") of fewer than `min_cohort` cases is
   deleted with everything beneath it. This is not an error: the rest is released, and only the
   number of groups removed is reported, never which.
2. Differential privacy, if the request's params carry `dp` (see `dp_problems` for its form).
   Only the top-level "n" and the per-feature statistics under "features" whose feature has
   declared bounds are released, with calibrated noise; every other section is withheld, because
   nothing bounds one case's influence on it (a case adds any number of voxels to a voxel
   histogram, and acquisition counts are not noised here).
3. Small histogram bins are zeroed. A 1-D integer array inside a group is a histogram of counts;
   a bin holding from 1 to `min_cohort - 1` counts is set to 0, so no bin singles out fewer than
   `min_cohort` cases. For a histogram of voxels this is a weaker guard (one case contributes many
   voxels), which is why rule 2 withholds those.

Differential privacy, how the noise is calibrated. Neighbouring data sets have the same number of
cases n, one case replaced by another ("bounded" DP), so n itself is released exactly. The task
clips each feature value x to the request's bounds [L, U] before aggregating, so for one feature:

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

The budget is charged before the run and never refunded: a failed run has seen the data too.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MECHANISMS = ("laplace", "gaussian")
STATISTICS_PER_FEATURE = 3  # mean, variance, histogram
_DP_KEYS = {"epsilon", "mechanism", "delta", "bounds"}


class BudgetExhausted(Exception):
    """A request whose epsilon exceeds what its data scientist has left; the message is safe to show."""


@dataclass
class Released:
    """What `protect` removed or altered, in counts only (for the result and the audit log)."""

    suppressed_groups: int = 0
    zeroed_bins: int = 0
    withheld_sections: int = 0
    dp_epsilon: float | None = None

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"suppressed_groups": self.suppressed_groups, "zeroed_bins": self.zeroed_bins}
        if self.dp_epsilon is not None:
            fields.update(dp_epsilon=self.dp_epsilon, withheld_sections=self.withheld_sections)
        return fields


# ---- the request's dp parameter ---------------------------------------------------------------------


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


# ---- the per-data-scientist budget ------------------------------------------------------------------


class PrivacyBudget:
    """The epsilon each data scientist has spent at this site, kept in `path` (JSON) across restarts.

    Charges are serialised with an exclusive lock on a sibling lock file (requests may run in
    several server threads) and written atomically (temporary file, fsync, rename), so a crash
    leaves either the old or the new ledger, never a torn one.
    """

    def __init__(self, path: Path, limit: float) -> None:
        self.path = Path(path)
        self.limit = float(limit)

    def spent(self, who: str) -> float:
        return float(self._read().get(who, 0.0))

    def charge(self, who: str, epsilon: float) -> float:
        """Record `epsilon` against `who`; return what remains, or raise BudgetExhausted."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ledger = self._read()
            spent = float(ledger.get(who, 0.0))
            remaining = self.limit - spent
            if epsilon > remaining + 1e-12:
                raise BudgetExhausted(
                    f"differential-privacy budget exhausted: this request needs epsilon {epsilon:g}, "
                    f"{max(remaining, 0.0):g} of this site's budget of {self.limit:g} remain for {who}"
                )
            ledger[who] = spent + epsilon
            self._write(ledger)
        return remaining - epsilon

    def _read(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        return dict(json.loads(self.path.read_text())["spent"])

    def _write(self, ledger: dict[str, float]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"limit": self.limit, "spent": ledger}, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---- protecting a result ----------------------------------------------------------------------------


def protect(result: Any, params: dict[str, Any], min_cohort: int,
            rng: np.random.Generator | None = None) -> tuple[Any, Released]:
    """The releasable part of an aggregates result (already shape-checked) and what was done to it.

    If the top level is itself a group, the counts of suppressed groups and zeroed bins are added
    to it, so the data scientist sees that something was held back.
    """
    released = Released()
    if _too_small(result, min_cohort):
        released.suppressed_groups = 1
        return {}, released
    result = _drop_small_groups(result, min_cohort, released)
    if "dp" in params:
        result = _add_noise(result, params["dp"], rng or np.random.default_rng(), released)
    _zero_small_bins(result, min_cohort, released)
    if "n" in result:
        result["suppressed_groups"] = released.suppressed_groups
        result["zeroed_bins"] = released.zeroed_bins
    return result, released


def _too_small(node: Any, min_cohort: int) -> bool:
    return isinstance(node, dict) and "n" in node and node["n"] < min_cohort


def _drop_small_groups(node: dict[str, Any], min_cohort: int, released: Released) -> dict[str, Any]:
    kept = {}
    for key, child in node.items():
        if _too_small(child, min_cohort):
            released.suppressed_groups += 1
        elif isinstance(child, dict):
            kept[key] = _drop_small_groups(child, min_cohort, released)
        else:
            kept[key] = child
    return kept


def _zero_small_bins(node: dict[str, Any], min_cohort: int, released: Released) -> None:
    for child in node.values():
        if isinstance(child, dict):
            _zero_small_bins(child, min_cohort, released)
        elif isinstance(child, np.ndarray) and child.ndim == 1 and child.dtype.kind in "iu" and "n" in node:
            small = (child > 0) & (child < min_cohort)
            released.zeroed_bins += int(small.sum())
            child[small] = 0


def _add_noise(result: dict[str, Any], dp: dict[str, Any], rng: np.random.Generator, released: Released) -> dict[str, Any]:
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
