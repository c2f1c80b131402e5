"""The orchestrator's own check of a site's update before it is aggregated.

Sites already enforce the weights contract, but the orchestrator does not trust the wire: an
update whose names, shapes or values do not fit the model (NaN/Inf, a missing layer, a
non-positive sample count) would poison every site's next round, so it is rejected, logged,
and the round goes on with the others.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analyses.federation.strategy import SiteUpdate, Weights


class RejectedUpdate(ValueError):
    """A site update that must not be aggregated; the message says why (no values)."""


def check_update(site: str, result: Any, expected: dict[str, tuple[int, ...]]) -> SiteUpdate:
    """Turn a `local_train` result into a SiteUpdate, or raise RejectedUpdate."""
    if not isinstance(result, dict) or not isinstance(result.get("weights"), dict) or not isinstance(result.get("scalars"), dict):
        raise RejectedUpdate(f"{site}: result is not {{'weights': {{...}}, 'scalars': {{...}}}}")
    weights: Weights = result["weights"]
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise RejectedUpdate(f"{site}: weight names differ from the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in expected.items():
        value = weights[name]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise RejectedUpdate(f"{site}: weights['{name}'] is not a float array")
        if tuple(value.shape) != tuple(shape):
            raise RejectedUpdate(f"{site}: weights['{name}'] has shape {tuple(value.shape)}, the model has {tuple(shape)}")
        if not np.isfinite(value).all():
            raise RejectedUpdate(f"{site}: weights['{name}'] contains NaN or Inf")
    n_samples = result["scalars"].get("n_samples")
    loss = result["scalars"].get("train_loss")  # withheld by a site that noises its updates
    if not isinstance(n_samples, (int, float)) or not math.isfinite(n_samples) or n_samples <= 0:
        raise RejectedUpdate(f"{site}: n_samples must be a positive finite number")
    if loss is not None and (not isinstance(loss, (int, float)) or not math.isfinite(loss)):
        raise RejectedUpdate(f"{site}: train_loss is not finite")
    optional = {}
    for key in ("steps", "compute_seconds"):
        value = result["scalars"].get(key, 0.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RejectedUpdate(f"{site}: {key} must be a non-negative finite number")
        optional[key] = float(value)
    privacy = {key: float(value) for key, value in result["scalars"].items()
               if key.startswith("dp_") and isinstance(value, (int, float)) and math.isfinite(value)}
    return SiteUpdate(site=site, weights=weights, n_samples=float(n_samples), train_loss=None if loss is None else float(loss),
                      privacy=privacy, **optional)
