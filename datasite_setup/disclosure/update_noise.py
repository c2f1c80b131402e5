"""The update-noise filter: client-level differential privacy on every model update that leaves the site.

A site whose config has a `[privacy.update_dp]` table applies it to every result of a task whose
contract is a weights contract (`local_train`), whatever the request asks: the update (the weights
returned minus the weights the request sent, over every exchanged float entry, normalisation
statistics included) is clipped to L2 norm C and Gaussian noise of standard deviation
sigma = noise_multiplier * C is added to each coordinate before the weights leave (DP-FedAvg,
McMahan et al. 2018, with the noise added by each site rather than by a trusted aggregator).

Calibration. Two data sets that differ in one patient can give any two clipped updates, so the L2
sensitivity is 2C and one release is a Gaussian mechanism with noise multiplier
sigma / 2C = noise_multiplier / 2. The request may choose C (`dp_clip`, for adaptive clipping):
sigma scales with it, so the privacy of a release does not depend on C. With adaptive clipping
(`clip_bit_noise` set) the site also releases whether the update was within C, as the bit plus
Gaussian noise of standard deviation clip_bit_noise (sensitivity 1; Andrew et al. 2021); the two
Gaussian mechanisms of one release compose to one of multiplier
(noise_multiplier^-2 * 4 + clip_bit_noise^-2)^-1/2 (`release_multiplier`). The rounds are
composed by Opacus' RDP accountant (`update_accountant.py`) and charged to the data scientist's
epsilon budget before each run.

Scalars. Of the task's scalars only counts and time (samples, steps, seconds, pseudo-labelled
cases) leave: they describe how much data a site has, which its dataset's listing shows anyway,
not what is in it. The training loss depends on the images with no bound and is withheld.
Noise comes from numpy's PCG64 seeded by the operating system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

RELEASED_SCALARS = frozenset({"n_samples", "steps", "compute_seconds", "pseudo_labelled_cases"})
DP_SCALARS = frozenset({"dp_clip", "dp_noise_std", "dp_unclipped", "dp_epsilon_round", "dp_epsilon_spent"})


@dataclass(frozen=True)
class UpdateNoise:
    """A site's update privacy: noise multiplier, default clip norm, the delta its epsilons are
    stated at, and (for adaptive clipping) the noise on the released within-clip bit."""

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    clip_bit_noise: float | None = None

    def release_multiplier(self) -> float:
        """The noise multiplier of one release as a single Gaussian mechanism, for the accountant."""
        inverse_square = (2.0 / self.noise_multiplier) ** 2
        if self.clip_bit_noise is not None:
            inverse_square += self.clip_bit_noise ** -2
        return inverse_square ** -0.5

    def protect(self, result: dict[str, Any], sent: dict[str, Any], clip: float,
                rng: np.random.Generator | None = None) -> dict[str, Any]:
        """The releasable form of a weights result trained from `sent`: the clipped, noised update
        added back to `sent`, and only the scalars that may leave plus what was done."""
        rng = rng or np.random.default_rng()
        names = sorted(result["weights"])
        update = {name: np.asarray(result["weights"][name], np.float64) - np.asarray(sent[name], np.float64) for name in names}
        norm = math.sqrt(sum(float(np.square(u).sum()) for u in update.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        sigma = self.noise_multiplier * clip
        weights = {name: (np.asarray(sent[name], np.float64) + scale * update[name] + rng.normal(0.0, sigma, update[name].shape))
                   .astype(np.float32) for name in names}
        scalars = {k: v for k, v in result["scalars"].items() if k in RELEASED_SCALARS}
        scalars.update(dp_clip=float(clip), dp_noise_std=float(sigma))
        if self.clip_bit_noise is not None:
            scalars["dp_unclipped"] = float(norm <= clip) + float(rng.normal(0.0, self.clip_bit_noise))
        return {"weights": weights, "scalars": scalars}


def update_noise_problems(params: dict[str, Any], update_dp: UpdateNoise | None) -> str | None:
    """What the site refuses in a request's update-privacy parameter (`dp_clip`), or None."""
    if "dp_clip" not in params:
        return None
    if update_dp is None:
        return "this site does not add differential privacy to model updates; send the request without 'dp_clip'"
    return None
