"""Execution budgets for approved code, enforced by the site (syft 0.9.5 does not).

Measured on syft 0.9.5: `UserCodeService.is_execution_allowed` calls the output policy's
`is_valid()` and ignores its answer, so code approved with `OutputPolicyExecuteCount(limit=2)`
ran a third and fourth time. syft also counts a run only once its output is stored, after the
run: three simultaneous calls against a limit of one all passed the check and all ran.

The server entry point installs `enforce_execution_budgets`. Before a run starts, it *reserves*
the run in `data_dir/execution_runs.json` under a lock (a thread lock for the server's own
threads, `flock` for any other process), refusing once the runs started reach the smaller of the
requested limit and the admin's cap (`datasite-admin approve ID --max-runs N`, kept in
`data_dir/execution_caps.json`). A reserved run counts whatever happens next: a run that fails
or is refused has still been attempted on the private data. Both files survive restarts.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasite_setup import audit_log

CAPS_FILE = "execution_caps.json"
RUNS_FILE = "execution_runs.json"
_LOCK_FILE = "execution_runs.lock"
_THREAD_LOCK = threading.Lock()


def _read_counts(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}


def _write_counts(path: Path, counts: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(counts, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_caps(data_dir: Path) -> dict[str, int]:
    return _read_counts(data_dir / CAPS_FILE)


def set_cap(data_dir: Path, code_id: str, max_runs: int) -> None:
    """Record the admin's cap for one approved code; written atomically."""
    with _ledger_lock(data_dir):
        caps = read_caps(data_dir)
        caps[code_id] = max_runs
        _write_counts(data_dir / CAPS_FILE, caps)


def allowed_runs(code_id: str, limit: int | None, data_dir: Path) -> int | None:
    """The runs a code may have: its requested limit, lowered by the admin's cap; None = no count."""
    cap = read_caps(data_dir).get(code_id)
    if limit is None:
        return cap
    return limit if cap is None else min(limit, cap)


@contextmanager
def _ledger_lock(data_dir: Path) -> Iterator[None]:
    """Exclusive access to the run ledger: the server's request threads share one process, where
    `flock` on separately opened files excludes too, but the thread lock keeps that cheap."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(data_dir / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def runs_started(data_dir: Path, code_id: str, stored_outputs: int = 0) -> int:
    """Runs started for a code: the ledger's count, or syft's stored outputs if higher (code that
    ran before the ledger existed)."""
    return max(_read_counts(data_dir / RUNS_FILE).get(code_id, 0), stored_outputs)


@dataclass(frozen=True)
class Reservation:
    granted: bool
    used: int  # runs started before this one
    allowed: int | None


def reserve_run(data_dir: Path, code_id: str, limit: int | None, stored_outputs: int = 0) -> Reservation:
    """Count one more run of `code_id` unless its budget is used up; check and count are one step."""
    with _ledger_lock(data_dir):
        allowed = allowed_runs(code_id, limit, data_dir)
        used = runs_started(data_dir, code_id, stored_outputs)
        if allowed is not None and used >= allowed:
            return Reservation(False, used, allowed)
        counts = _read_counts(data_dir / RUNS_FILE)
        counts[code_id] = used + 1
        _write_counts(data_dir / RUNS_FILE, counts)
    return Reservation(True, used, allowed)


def _requester(context: Any) -> str:
    try:
        return context.server.services.user.get_current_user(context=context).email
    except Exception:  # an admin context has no user record; the key identifies it
        return str(context.credentials)


def enforce_execution_budgets(data_dir: Path) -> None:
    """Patch syft's execution check so every allowed run is reserved first and a used-up budget
    refuses the run with a clear message (the budget is not data, so it may be named)."""
    from syft.service.code.user_code_service import IsExecutionAllowedEnum, UserCodeService
    from syft.types.errors import SyftException

    original = UserCodeService.is_execution_allowed
    if getattr(original, "_medfed_budget", False):
        return

    def is_execution_allowed(self: Any, code: Any, context: Any, output_policy: Any) -> Any:
        verdict = original(self, code, context, output_policy)
        if verdict is not IsExecutionAllowedEnum.ALLOWED:
            return verdict
        code_id = str(code.id.no_dash)
        stored = int(output_policy.count(context)) if hasattr(output_policy, "count") else 0
        reservation = reserve_run(data_dir, code_id, getattr(output_policy, "limit", None), stored)
        if not reservation.granted:
            audit_log.append(data_dir, {
                "action": "refused-run-budget", "code": code_id, "what": code.service_func_name,
                "requested_by": _requester(context),
                "why": f"run budget used up: {reservation.used} of {reservation.allowed} runs started",
            })
            raise SyftException(
                public_message=(
                    f"execution budget used up for '{code.service_func_name}': "
                    f"{reservation.used} of {reservation.allowed} runs; ask the site's admin for a new approval"
                )
            )
        return verdict

    is_execution_allowed._medfed_budget = True  # type: ignore[attr-defined]
    UserCodeService.is_execution_allowed = is_execution_allowed
