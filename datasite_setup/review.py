"""The clinic admin's review of code requests: list, show (with a static audit), approve, deny.

The same functions back `datasite-admin` and the admin notebook. Every decision is appended to
`data_dir/audit.log` (one JSON object per line: when, who, what, which request, why).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from datasite_setup.connection import quiet_syft
from datasite_setup.code_audit import Finding, audit_source
from datasite_setup.execution_limits import allowed_runs, set_cap
from datasite_setup.site_config import SiteConfig
from datasite_setup.thin_requests import parse_thin_request

AUDIT_LOG = "audit.log"


class ReviewError(RuntimeError):
    """A review action that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class RequestSummary:
    id: str
    status: str
    requested_by: str
    requested_at: str
    function: str
    inputs: dict[str, str]
    output_policy: str
    runs_used: int
    runs_allowed: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestDetail:
    summary: RequestSummary
    code: str
    kind: str  # "site task" or "custom code"
    task: dict[str, Any] | None = None  # name, summary, parameters, source hash, enabled here
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            **self.summary.to_dict(),
            "code": self.code,
            "kind": self.kind,
            "task": self.task,
            "findings": [f.to_dict() for f in self.findings],
        }


def _task_description(config: SiteConfig, name: str) -> dict[str, Any]:
    from analyses.site_tasks import TASKS

    task = TASKS.get(name)
    if task is None:
        return {"name": name, "installed": False, "enabled": False}
    enabled = config.enabled_tasks is None or name in config.enabled_tasks
    return {
        "name": name,
        "installed": True,
        "enabled": enabled,
        "summary": task.summary,
        "parameters": {key: spec.doc for key, spec in task.params.items()},
        "source_hash": task.source_hash(),
        "source": task.source(),
    }


def list_tasks(config: SiteConfig) -> list[dict[str, Any]]:
    """Every site task this installation provides, whether this site enables it, and its hash."""
    from analyses.site_tasks import TASKS

    rows = []
    for name in sorted(TASKS):
        described = _task_description(config, name)
        described.pop("source")
        rows.append(described)
    return rows


def approval_problem(config: SiteConfig, code: str) -> str | None:
    """Why this site must not approve the code, or None. Custom code needs `allow_custom_code`."""
    thin = parse_thin_request(code)
    if thin is None:
        if config.allow_custom_code:
            return None
        return "this is custom code, and this site allows only site tasks (set allow_custom_code = true to change that)"
    task = _task_description(config, thin.task)
    if not task["installed"]:
        return f"site task '{thin.task}' is not installed at this site"
    if not task["enabled"]:
        return f"site task '{thin.task}' is not enabled at this site ([site] enabled_tasks)"
    return None


def _status_name(request: Any) -> str:
    return str(request.status).rsplit(".", 1)[-1].lower()


def _inputs(code: Any) -> dict[str, str]:
    kwargs = next(iter(code.input_policy_init_kwargs.values()), {}) if code.input_policy_init_kwargs else {}
    return {name: type(kind).__name__ if not isinstance(kind, type) else kind.__name__ for name, kind in kwargs.items()}


def _runs_used(code: Any) -> int:
    policy = code.output_policy
    if policy is None or not hasattr(policy, "count"):
        return 0
    return int(policy.count())


def summarise(config: SiteConfig, request: Any) -> RequestSummary:
    code = request.code
    policy_kwargs = {k: v for k, v in (code.output_policy_init_kwargs or {}).items() if k != "id"}
    policy = code.output_policy_type.__name__ if code.output_policy_type else "none"
    return RequestSummary(
        id=str(request.id.no_dash),
        status=_status_name(request),
        requested_by=str(request.requesting_user_email),
        requested_at=str(request.request_time),
        function=code.service_func_name,
        inputs=_inputs(code),
        output_policy=f"{policy}({', '.join(f'{k}={v}' for k, v in policy_kwargs.items())})",
        runs_used=_runs_used(code),
        runs_allowed=allowed_runs(str(code.id.no_dash), policy_kwargs.get("limit"), config.data_dir),
    )


def _code_requests(admin: Any) -> list[Any]:
    return [r for r in admin.requests.get_all() if getattr(r, "code", None) is not None]


def list_requests(config: SiteConfig, admin: Any, status: str | None = None) -> list[RequestSummary]:
    """Pending and past code requests, oldest first; `status` filters (pending/approved/rejected)."""
    summaries = [summarise(config, r) for r in _code_requests(admin)]
    if status:
        summaries = [s for s in summaries if s.status == status]
    return sorted(summaries, key=lambda s: s.requested_at)


def find_request(admin: Any, request_id: str) -> Any:
    """The request whose id starts with `request_id` (a unique prefix is enough)."""
    wanted = request_id.replace("-", "").lower()
    matches = [r for r in _code_requests(admin) if str(r.id.no_dash).startswith(wanted)]
    if not matches:
        raise ReviewError(f"no code request with id {request_id!r}; list them with: datasite-admin requests")
    if len(matches) > 1:
        raise ReviewError(f"id prefix {request_id!r} matches {len(matches)} requests; give more characters")
    return matches[0]


def show_request(config: SiteConfig, admin: Any, request_id: str) -> RequestDetail:
    request = find_request(admin, request_id)
    code = request.code.raw_code
    thin = parse_thin_request(code)
    if thin is None:
        return RequestDetail(summary=summarise(config, request), code=code, kind="custom code", findings=audit_source(code))
    return RequestDetail(
        summary=summarise(config, request), code=code, kind="site task", task=_task_description(config, thin.task)
    )


def _log_decision(config: SiteConfig, action: str, summary: RequestSummary, **extra: Any) -> None:
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "admin": config.admin_email,
        "action": action,
        "request": summary.id,
        "function": summary.function,
        "requested_by": summary.requested_by,
        **extra,
    }
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with open(config.data_dir / AUDIT_LOG, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def read_audit_log(config: SiteConfig) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (config.data_dir / AUDIT_LOG).read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def approve(config: SiteConfig, admin: Any, request_id: str, max_runs: int | None = None) -> RequestSummary:
    """Approve a pending request, optionally capping its runs below what it asked for."""
    import syft as sy

    request = find_request(admin, request_id)
    before = summarise(config, request)
    if before.status != "pending":
        raise ReviewError(f"request {before.id[:8]} is {before.status}, not pending; nothing changed")
    problem = approval_problem(config, request.code.raw_code)
    if problem:
        raise ReviewError(f"request {before.id[:8]} cannot be approved: {problem}")
    if max_runs is not None:
        if max_runs < 1:
            raise ReviewError("--max-runs must be at least 1")
        set_cap(config.data_dir, str(request.code.id.no_dash), max_runs)
    with quiet_syft():
        outcome = request.approve(approve_nested=True)
    if isinstance(outcome, sy.SyftError):
        raise ReviewError(f"approval of {before.id[:8]} failed: {outcome.message}")
    after = summarise(config, find_request(admin, request_id))
    _log_decision(config, "approve", after, max_runs=after.runs_allowed)
    return after


def deny(config: SiteConfig, admin: Any, request_id: str, reason: str) -> RequestSummary:
    """Deny a request with a reason the data scientist will read."""
    import syft as sy

    if not reason.strip():
        raise ReviewError("a denial needs a reason the data scientist can act on (--reason)")
    request = find_request(admin, request_id)
    before = summarise(config, request)
    if before.status == "rejected":
        raise ReviewError(f"request {before.id[:8]} is already denied")
    with quiet_syft():
        outcome = request.deny(reason=reason)
    if isinstance(outcome, sy.SyftError):
        raise ReviewError(f"denial of {before.id[:8]} failed: {outcome.message}")
    after = summarise(config, find_request(admin, request_id))
    _log_decision(config, "deny", after, reason=reason)
    return after
