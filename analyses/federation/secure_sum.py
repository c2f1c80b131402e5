"""The orchestrator's side of secure aggregation: relay the session keys, sum the masked updates.

A round in a session (`TrainingPlan.secure_aggregation`): every participating site hands out its
signed public key for a fresh session id (`secure_aggregation_key`); the orchestrator sends all
the keys with each site's `local_train`; each site returns its contribution (weights times its
sample count) masked so that only the sum over the session can be read
(`datasite_setup/secure_aggregation/`). The sum modulo 2^64, decoded and divided by the summed
sample counts, is FedAvg's sample-weighted mean, which the strategy then aggregates as one update:
this is exact for strategies whose aggregation needs only that mean (`Strategy.sums_only`: FedAvg,
FedProx, FedAdam/FedAdagrad/FedYogi). FedBN keeps site-local layers and SCAFFOLD per-site control
variates, and local-only never sums: they cannot run in a session. Per-site training scalars (sample
counts, steps, loss) still come back per site. A site that does not answer leaves masks that do
not cancel: the round fails (`SessionIncomplete`), nothing is aggregated, and rerunning the command
redoes it in a new session.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np

from analyses.federation.strategy import SiteUpdate, Weights
from datasite_setup.secure_aggregation import masks


class SessionIncomplete(RuntimeError):
    """A session without every participant's masked update: it cannot be unmasked."""


def new_session(label: str, round_no: int) -> str:
    """A session id never used before: the plan's label, the round and a random part."""
    return f"{label}.r{round_no}.{secrets.token_hex(6)}"[-200:]


def summed_update(results: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> SiteUpdate:
    """One update holding the sample-weighted mean of the sites' masked contributions."""
    total, count, steps, seconds, losses = None, 0.0, 0.0, 0.0, []
    for site, result in sorted(results.items()):
        weights = result.get("weights") if isinstance(result, dict) else None
        scalars = result.get("scalars") if isinstance(result, dict) else None
        if not isinstance(weights, dict) or set(weights) != set(expected) or not isinstance(scalars, dict):
            raise SessionIncomplete(f"{site}: its answer is not a masked update of the model's weights")
        for name, shape in expected.items():
            value = weights[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.uint64 or tuple(value.shape) != tuple(shape):
                raise SessionIncomplete(f"{site}: weights['{name}'] is not a masked uint64 array of shape {tuple(shape)}")
        n = scalars.get("n_samples")
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise SessionIncomplete(f"{site}: n_samples must be a positive finite number")
        total = masks.add(total, weights)
        count += float(n)
        steps += float(scalars.get("steps", 0.0))
        seconds = max(seconds, float(scalars.get("compute_seconds", 0.0)))
        if isinstance(scalars.get("train_loss"), (int, float)):
            losses.append(float(scalars["train_loss"]) * float(n))
    mean: Weights = {name: (value / count).astype(np.float32) for name, value in masks.decode(total).items()}
    if not all(np.isfinite(v).all() for v in mean.values()):
        raise SessionIncomplete("the session's sum does not decode to finite weights")
    return SiteUpdate(site="secure-sum", weights=mean, n_samples=count, train_loss=sum(losses) / count if losses else None,
                      steps=steps, compute_seconds=seconds)
