"""One JSON file that several server threads (or processes) read and rewrite: the budget and the ledger.

A change is read-check-write under an exclusive lock on a sibling lock file, so two runs finishing
at once cannot both pass a check that only one of them should; the file is replaced atomically
(temporary file, fsync, rename), so a crash leaves either the old or the new content, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock of `path` (its sibling `.lock` file) for the block."""
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read(path: Path) -> Any:
    """The file's content, or None when it does not exist yet."""
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write(path: Path, content: Any) -> None:
    """Replace the file atomically; call with the lock held."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(content, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
