"""The clip norm a federation asks its sites to bound their updates by, at sites that noise updates.

A site with update privacy (`[privacy.update_dp]`) clips every update to the norm the request names
(`dp_clip`, else its own default) and adds noise proportional to it, so the privacy of a release
does not depend on the norm, only the utility: too large and the noise drowns the updates, too
small and clipping throws most of each update away. A fixed norm (`TrainingPlan.dp_clip`) is the
plain choice. Adaptive clipping (Andrew et al. 2021, `TrainingPlan.dp_clip_quantile`) follows a
target quantile gamma of the sites' update norms instead: each site releases, with noise, whether
its update was within the norm (`dp_unclipped`), and after each round

    C <- C * exp(-eta * (mean of the released bits - gamma))

(geometric update, eta = `ADAPTIVE_CLIP_LR`). The norm used in each round is in the round's
record (`update_dp.clip`), so a resumed run continues from the last round's next norm.
"""

from __future__ import annotations

import math
from typing import Any

ADAPTIVE_CLIP_LR = 0.2  # Andrew et al.'s eta_C


class ClipBitMissing(RuntimeError):
    """Adaptive clipping needs every site's noisy within-clip bit; one site released none."""


def clip_for_round(plan_clip: float, quantile: float, history: list[dict[str, Any]]) -> float:
    """The norm to ask for in the next round: the plan's (0: each site's own default) for a fixed
    clip, else the adaptive norm carried on from the last round that recorded one."""
    if quantile <= 0:
        return plan_clip
    for record in reversed(history):
        if "update_dp" in record and "next_clip" in record["update_dp"]:
            return float(record["update_dp"]["next_clip"])
    return plan_clip


def next_clip(clip: float, quantile: float, bits: dict[str, float]) -> float:
    """Andrew et al.'s geometric step from `clip` toward the `quantile` of the sites' update norms."""
    if not bits:
        return clip
    return clip * math.exp(-ADAPTIVE_CLIP_LR * (sum(bits.values()) / len(bits) - quantile))


def round_record(clip: float, quantile: float, privacy: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The round's `update_dp` record: the norm asked for, what each site released about its noise
    and spent budget, and (adaptive) the norm for the next round. Raises ClipBitMissing when an
    adaptive plan meets a site that does not release the bit."""
    record: dict[str, Any] = {"clip": clip, "sites": privacy}
    if quantile > 0:
        missing = sorted(site for site, fields in privacy.items() if "dp_unclipped" not in fields)
        if missing:
            raise ClipBitMissing(f"adaptive clipping needs each site's noisy within-clip bit; {', '.join(missing)} released "
                                 "none (its [privacy.update_dp] has no clip_bit_noise): use a fixed --dp-clip")
        bits = {site: fields["dp_unclipped"] for site, fields in privacy.items()}
        record.update(unclipped=sum(bits.values()) / len(bits) if bits else None, next_clip=next_clip(clip, quantile, bits))
    return record
