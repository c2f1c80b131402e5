"""Execution budgets for approved code, enforced by the site (syft 0.9.5 does not).

Measured on syft 0.9.5: `UserCodeService.is_execution_allowed` calls the output policy's
`is_valid()` and ignores its answer, so code approved with `OutputPolicyExecuteCount(limit=2)`
ran a third and fourth time. The server entry point installs `enforce_execution_budgets`, which
refuses a run once the executions stored for the request reach the smaller of the requested limit
and the admin's cap (`datasite-admin approve ID --max-runs N`, kept in `data_dir/execution_caps.json`
so it survives restarts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CAPS_FILE = "execution_caps.json"


def read_caps(data_dir: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((data_dir / CAPS_FILE).read_text()).items()}
    except FileNotFoundError:
        return {}


def set_cap(data_dir: Path, code_id: str, max_runs: int) -> None:
    """Record the admin's cap for one approved code; written atomically."""
    caps = read_caps(data_dir)
    caps[code_id] = max_runs
    tmp = data_dir / (CAPS_FILE + ".tmp")
    tmp.write_text(json.dumps(caps, indent=2, sort_keys=True))
    os.replace(tmp, data_dir / CAPS_FILE)


def runs_used(output_policy: Any, context: Any) -> int:
    return int(output_policy.count(context))


def allowed_runs(code_id: str, limit: int | None, data_dir: Path) -> int | None:
    """The runs a code may have: its requested limit, lowered by the admin's cap; None = no count."""
    cap = read_caps(data_dir).get(code_id)
    if limit is None:
        return cap
    return limit if cap is None else min(limit, cap)


def enforce_execution_budgets(data_dir: Path) -> None:
    """Patch syft's execution check so a used-up budget refuses the run with a clear message."""
    from syft.service.code.user_code_service import IsExecutionAllowedEnum, UserCodeService
    from syft.types.errors import SyftException

    original = UserCodeService.is_execution_allowed
    if getattr(original, "_medfed_budget", False):
        return

    def is_execution_allowed(self: Any, code: Any, context: Any, output_policy: Any) -> Any:
        verdict = original(self, code, context, output_policy)
        if verdict is not IsExecutionAllowedEnum.ALLOWED:
            return verdict
        allowed = allowed_runs(str(code.id.no_dash), getattr(output_policy, "limit", None), data_dir)
        used = runs_used(output_policy, context)
        if allowed is not None and used >= allowed:
            raise SyftException(
                public_message=(
                    f"execution budget used up for '{code.service_func_name}': {used} of {allowed} runs; "
                    "ask the site's admin for a new approval"
                )
            )
        return verdict

    is_execution_allowed._medfed_budget = True  # type: ignore[attr-defined]
    UserCodeService.is_execution_allowed = is_execution_allowed
