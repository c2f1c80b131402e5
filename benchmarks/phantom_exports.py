"""Phantom DICOM exports that benchmarks reuse between runs (`.cache/`, git-ignored).

Writing a few hundred phantom series takes minutes; a benchmark run should time the site, not
the phantom writer. An export is written under a temporary name and renamed when complete, so an
interrupted write is never reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import CACHE


def cached_export(name: str, profile: Any, n_cases: int, seed: int) -> Path:
    """The export `CACHE/name` of `n_cases` phantom cases of `profile` (a ScannerProfile), written once."""
    from domains.brain_mr_segmentation.phantom import write_phantom_site

    folder = CACHE / name
    if not (folder / ".complete").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        write_phantom_site(profile, partial, n_cases=n_cases, seed=seed)
        (partial / ".complete").write_text(json.dumps({"generation_s": round(time.perf_counter() - started, 2)}))
        partial.rename(folder)
    return folder
