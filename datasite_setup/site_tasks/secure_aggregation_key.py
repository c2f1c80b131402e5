"""Site task `secure_aggregation_key`: this site's signed public key for one secure-aggregation session.

It reads no case and needs the site's secret seed, so the site's parent process answers it
(`at_parent`), never an isolated child. The key is derived from the seed, the data scientist and
the session (`datasite_setup/secure_aggregation/keys.py`), signed by the site's identity key whose
public half the other sites pinned; the orchestrator relays every participant's key to the others
in the session's `local_train` requests. Only a site with `[secure_aggregation]` answers.
"""

from __future__ import annotations

import re
from typing import Any

from datasite_setup.site_tasks.task import ParentFacts, Param, SiteTask

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def session_key(params: dict[str, Any], facts: ParentFacts) -> dict[str, str]:
    return facts.keys.session_key(facts.who, params["session"])


TASK = SiteTask(
    name="secure_aggregation_key",
    summary="this site's signed public key for one secure-aggregation session (reads no case)",
    params={"session": Param(str, "the session id (1-200 letters, digits or ._:-)",
                             check=lambda v: None if _SESSION_ID.match(v) else "must be 1-200 letters, digits or ._:-")},
    run=None,
    contract=None,
    at_parent=session_key,
)
