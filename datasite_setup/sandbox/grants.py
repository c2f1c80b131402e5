"""Which paths the child may read and write: shared by Landlock and the audit hook."""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib")
SYSTEM_READABLE = (
    "/dev/zero", "/dev/urandom", "/dev/random", "/proc/cpuinfo", "/sys/devices/system/cpu", "/usr/share/zoneinfo",
)
DEVICES_RW = ("/dev/null",)


def carve(roots: list[str], forbidden: list[str]) -> list[str]:
    """The roots with every forbidden path cut out, by replacing a root that holds one with its other entries.

    Landlock only grants, it cannot deny below a grant; the site's data dir may well sit next to
    the project's packages, so the grant has to go around it.
    """
    out: list[str] = []
    for root in roots:
        if any(root == f or root.startswith(f.rstrip("/") + "/") for f in forbidden):
            continue
        inside = [f for f in forbidden if f.startswith(root.rstrip("/") + "/")]
        if not inside:
            out.append(root)
            continue
        try:
            children = sorted(os.path.join(root, name) for name in os.listdir(root))
        except OSError:
            continue
        out.extend(carve(children, inside))
    return out


def readable_roots(forbidden: list[str]) -> list[str]:
    """What Python code may read: the Python installation, the project's packages (not its whole
    root: site configs and data dirs may sit there too) and a few system files, minus `forbidden`."""
    project = [str(p) for p in PROJECT_ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"]
    python = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]}
    return carve(sorted(python) + sorted(project) + list(SYSTEM_READABLE), forbidden)
