"""A site's side of one secure-aggregation session: the checks before training, the mask after.

A `local_train` request in a session carries `secure_aggregation`: {"session": id, "peers":
{site: its signed session key, as `secure_aggregation_key` handed it out}}. Before the run the
site checks the session (its own key is in it, every other participant is a pinned peer whose key
verifies, at least `min_participants` sites, `sessions.py`'s rules); after the run it encodes its
contribution, the weights times its sample count (so the sum over the session divided by the
summed counts is FedAvg's mean), masks it (`masks.py`) and records the session. The sample count
and the other scalars leave as they are: the data scientist learns how much each site trained,
not on what.
"""

from __future__ import annotations

import re
from typing import Any

from datasite_setup.secure_aggregation import masks
from datasite_setup.secure_aggregation.keys import PeerKeyRefused, SiteKeys
from datasite_setup.secure_aggregation.sessions import SessionLedger, weights_digest
from datasite_setup.site_config import SecureAggregationSettings

SESSION_PARAM = "secure_aggregation"
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def session_problem(session: Any, settings: SecureAggregationSettings, keys: SiteKeys, who: str,
                    sent: dict[str, Any], ledger: SessionLedger) -> str | None:
    """Why this site will not mask an update for `session` (None: it will)."""
    if not (isinstance(session, dict) and set(session) == {"session", "peers"} and isinstance(session["peers"], dict)):
        return "secure_aggregation must be {'session': id, 'peers': {site: signed session key}}"
    if not (isinstance(session["session"], str) and _SESSION_ID.match(session["session"])):
        return "secure_aggregation['session'] must be 1-200 letters, digits or ._:-"
    participants = sorted(session["peers"])
    if len(participants) < settings.min_participants:
        return (f"a secure-aggregation session here needs at least {settings.min_participants} sites, "
                f"this one has {len(participants)}")
    try:
        keys.shared_secrets(who, session["session"], session["peers"], settings.peers)
    except PeerKeyRefused as exc:
        return str(exc)
    return ledger.problem(who, session["session"], weights_digest(sent), participants)


def masked_update(result: dict[str, Any], sent: dict[str, Any], session: dict[str, Any], settings: SecureAggregationSettings,
                  keys: SiteKeys, who: str, ledger: SessionLedger) -> dict[str, Any]:
    """The training result as it leaves in a session: the masked contribution and the scalars.
    Raises SessionRefused if a concurrent run used the session or the weights meanwhile."""
    shared = keys.shared_secrets(who, session["session"], session["peers"], settings.peers)
    count = float(result["scalars"]["n_samples"])
    contribution = masks.encode({name: count * value.astype("float64") for name, value in result["weights"].items()})
    hidden = masks.masked(contribution, session["session"], keys.site, shared)
    ledger.record(who, session["session"], weights_digest(sent), sorted(session["peers"]))
    return {"weights": hidden, "scalars": dict(result["scalars"])}
