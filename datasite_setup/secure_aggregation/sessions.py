"""What a site remembers of the secure-aggregation sessions it masked updates for, per data scientist.

Two rules, checked and recorded under one lock before a masked update leaves:
- a session is used once: a mask repeated over two updates would give away their difference;
- the weights a round trains from are masked for one set of participants only: the same weights
  summed over {A, B, C} and again over {B, C} would give away A's update by subtraction. A session
  over the same participants again (a round redone after a site dropped and came back) is fine.
Nothing here is released; the file is JSON under the data dir (`secure_aggregation.json`)::

    {"format": 1, "who": {"<data scientist>": {"sessions": ["<session>", ...],
                                               "weights": {"<sha256 of the weights>": ["<site>", ...]}}}}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from datasite_setup.disclosure import locked_json

FORMAT = 1
SESSIONS_FILE = "secure_aggregation.json"


class SessionRefused(ValueError):
    """A session this site will not mask for; the message is safe to show."""


def weights_digest(weights: dict[str, Any]) -> str:
    """SHA-256 over the names, shapes and float32 bytes of the weights a round trains from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(np.asarray(weights[name], np.float32))
        digest.update(name.encode() + b"|" + str(array.shape).encode() + b"|")
        digest.update(array.tobytes())
    return digest.hexdigest()


class SessionLedger:
    """The sessions and weights each data scientist has had masked updates for, in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def at_site(cls, data_dir: Path) -> SessionLedger:
        return cls(data_dir / SESSIONS_FILE)

    def problem(self, who: str, session: str, weights: str, participants: list[str]) -> str | None:
        """Why this session may not be masked for (None: it may)."""
        return _problem((locked_json.read(self.path) or {}).get("who", {}).get(who, {}), session, weights, participants)

    def record(self, who: str, session: str, weights: str, participants: list[str]) -> None:
        """Check again under the lock and record; SessionRefused when a concurrent run got there first."""
        with locked_json.exclusive(self.path):
            content = locked_json.read(self.path) or {"format": FORMAT, "who": {}}
            mine = content["who"].setdefault(who, {"sessions": [], "weights": {}})
            if issue := _problem(mine, session, weights, participants):
                raise SessionRefused(issue)
            mine["sessions"].append(session)
            mine["weights"].setdefault(weights, sorted(participants))
            locked_json.write(self.path, content)


def _problem(mine: dict[str, Any], session: str, weights: str, participants: list[str]) -> str | None:
    if session in mine.get("sessions", []):
        return f"secure-aggregation session '{session}' was used before; every session masks once"
    earlier = mine.get("weights", {}).get(weights)
    if earlier is not None and earlier != sorted(participants):
        return ("these weights were masked before for other participants "
                f"({', '.join(earlier)}); a round over them must keep its participants")
    return None
