"""Sample-level differential privacy for training: the site's DP-SGD settings and what leaves with them.

A site whose config has a `[privacy.sample_dp]` table trains every `local_train` with DP-SGD
(`site_tasks/dp_sgd.py`), whatever the request asks: Poisson-sampled batches, each sample's
gradient clipped to `max_grad_norm`, Gaussian noise of standard deviation
noise_multiplier * max_grad_norm on each step's sum. The weights it returns are then
differentially private per training sample; the run reports its sampling rate and step count,
which the site composes with the data scientist's earlier uses (`update_accountant.py`) and charges
to her budget before the weights leave. Only counts and time leave beside the weights (the run
computes no releasable loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RELEASED_SCALARS = frozenset({"n_samples", "steps", "compute_seconds", "pseudo_labelled_cases", "dp_sample_rate",
                              "dp_noise_multiplier"})


class SampleNoiseMismatch(ValueError):
    """A DP-SGD run that does not report the site's own noise, or no sampling rate: nothing leaves."""


@dataclass(frozen=True)
class SampleNoise:
    """A site's DP-SGD: noise multiplier, per-sample clip norm, and the delta its epsilons hold at."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5

    def for_task(self) -> list[float]:
        """What the isolated run is told (`SiteFacts.sample_dp`)."""
        return [self.noise_multiplier, self.max_grad_norm]

    def uses(self, scalars: dict[str, Any]) -> list[tuple[float, float, int]]:
        """The accountant's uses of one run, from the scalars it returned; SampleNoiseMismatch when
        the run did not train with this site's noise."""
        rate, steps, multiplier = scalars.get("dp_sample_rate"), scalars.get("steps"), scalars.get("dp_noise_multiplier")
        if multiplier != self.noise_multiplier or not isinstance(rate, float) or not 0 < rate <= 1 or not isinstance(steps, float):
            raise SampleNoiseMismatch("the run did not report DP-SGD with this site's noise multiplier and a sampling rate")
        return [(self.noise_multiplier, rate, int(steps))]

    def released(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"weights": result["weights"], "scalars": {k: v for k, v in result["scalars"].items() if k in RELEASED_SCALARS}}
