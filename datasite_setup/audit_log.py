"""The site's audit log, `data_dir/audit.log`: one JSON object per line, for the admin only.

Review decisions, every run's outcome and every refused run land here with their real reason,
so the admin can answer a data scientist who quotes a refusal's reference. Runs finish on
concurrent server threads, so each entry is one `write` to a file opened for appending: lines
never interleave.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILE = "audit.log"


def append(data_dir: Path, event: dict[str, Any]) -> None:
    """Add one entry, stamped with the time in UTC."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **event}
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(data_dir: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first."""
    try:
        text = (data_dir / FILE).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]
