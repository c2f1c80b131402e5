"""The release ledger: per data scientist, which cohorts of each quantity this site has released.

Single answers can each be safe and still disclose a case together (`differencing.py`), so the site
remembers, for every data scientist, the set of cases behind every released part of every result,
and refuses a release that together with the earlier ones would single out fewer than
`min_cohort` cases. A quantity is what per-case value is aggregated (the task's name for it, e.g.
"radiomics_feature/original_firstorder_Mean" or "cohort_summary/lesion"), never a group's level:
the GE group of one request and the Signa group of another aggregate the same values.

Cases are stored as salted hashes of their pseudonymous ids (HMAC-SHA256 under a random salt kept
in `secrets/`), each distinct cohort once; nothing here is ever released. The file is JSON under
the data dir (`release_ledger.json`), so a restart keeps it; checks and records of concurrent runs
are serialised by a file lock, so of two runs that conflict only the first to finish is released::

    {"format": 1,
     "cohorts": {"<cohort digest>": ["<case hash>", ...]},
     "released": {"<data scientist>": {"<quantity>": ["<cohort digest>", ...]}}}

A release over a cohort already recorded for the quantity adds nothing and writes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from datasite_setup.disclosure import locked_json
from datasite_setup.disclosure.cohorts import CohortRecord, LedgerRefused
from datasite_setup.disclosure.differencing import conflict

FORMAT = 1
LEDGER_FILE = "release_ledger.json"
SALT_FILE = "release_ledger_salt"


def _digest(hashes: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()[:24]


def site_salt(secrets_dir: Path) -> bytes:
    """The site's ledger salt, created once (0600) by whichever run needs it first."""
    path = secrets_dir / SALT_FILE
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    salt = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex())
    return salt


class ReleaseLedger:
    """The released cohorts of every quantity, per data scientist, in `path` (JSON) across restarts."""

    def __init__(self, path: Path, salt: bytes) -> None:
        self.path = Path(path)
        self._salt = salt
        self._hashes: dict[str, str] = {}

    @classmethod
    def at_site(cls, data_dir: Path) -> ReleaseLedger:
        return cls(data_dir / LEDGER_FILE, site_salt(data_dir / "secrets"))

    def case_hash(self, case_id: str) -> str:
        if case_id not in self._hashes:
            self._hashes[case_id] = hmac.new(self._salt, case_id.encode(), hashlib.sha256).hexdigest()[:16]
        return self._hashes[case_id]

    def released(self, who: str, quantity: str) -> list[frozenset[str]]:
        """The hashed cohorts recorded for `who` and `quantity`, oldest first."""
        content = locked_json.read(self.path) or {}
        digests = content.get("released", {}).get(who, {}).get(quantity, [])
        return [frozenset(content["cohorts"][d]) for d in digests]

    def record(self, who: str, records: Iterable[CohortRecord], min_cohort: int) -> int:
        """Check `records` against what `who` was released before and record them; return how many
        cohorts are new. Raise LedgerRefused (nothing recorded) if any would single out cases."""
        hashed: dict[frozenset[str], tuple[str, frozenset[str]]] = {}
        by_quantity: dict[str, dict[str, frozenset[str]]] = {}
        for record in records:
            if record.case_ids not in hashed:
                cohort = frozenset(self.case_hash(c) for c in record.case_ids)
                hashed[record.case_ids] = (_digest(cohort), cohort)
            digest, cohort = hashed[record.case_ids]
            by_quantity.setdefault(record.quantity, {})[digest] = cohort
        with locked_json.exclusive(self.path):
            content = locked_json.read(self.path) or {"format": FORMAT, "cohorts": {}, "released": {}}
            stored = content["cohorts"]
            mine = content["released"].get(who, {})
            added: dict[str, list[str]] = {}
            verdicts: dict[tuple[tuple[str, ...], tuple[str, ...]], str | None] = {}
            for quantity, cohorts in by_quantity.items():
                known = tuple(mine.get(quantity, []))
                fresh = tuple(d for d in cohorts if d not in known)
                if not fresh:
                    continue
                if (known, fresh) not in verdicts:
                    earlier = [frozenset(stored[d]) for d in known]
                    verdicts[known, fresh] = conflict(earlier, [cohorts[d] for d in fresh], min_cohort)
                if verdicts[known, fresh] is not None:
                    raise LedgerRefused(f"quantity '{quantity}': {verdicts[known, fresh]}")
                added[quantity] = list(fresh)
            if added:
                for quantity, digests in added.items():
                    stored.update({d: sorted(by_quantity[quantity][d]) for d in digests if d not in stored})
                    mine.setdefault(quantity, []).extend(digests)
                content["released"][who] = mine
                locked_json.write(self.path, content)
        return sum(len(d) for d in added.values())
