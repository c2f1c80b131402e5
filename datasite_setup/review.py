"""The clinic admin's review of code requests: list, show (with a static audit), approve, deny.

The same functions back `datasite-admin` and the admin notebook. Every decision is appended to
`data_dir/audit.log` (`audit_log`: when, who, what, which request, why), beside every run's
outcome, so `show` can list a request's runs with the real reason for each refusal. For custom
code, `show` also states what one run can carry out: the names its code returns (the only ones
the site releases), how many float values that is, and how many bits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from datasite_setup import audit_log
from datasite_setup.connection import quiet_syft
from datasite_setup.code_audit import Finding, audit_source
from datasite_setup.disclosure.locked_json import read as read_json
from datasite_setup.execution_limits import allowed_runs, runs_started, set_cap
from datasite_setup.output_contracts import FLOAT_BITS
from datasite_setup.return_flow import read_returns
from datasite_setup.site_config import SiteConfig
from datasite_setup.thin_requests import parse_thin_request

# syft's MixedInputPolicy marks an input the data scientist passes herself `UserOwned`; the
# site's assets (`Matches`) are the private inputs.
_OWN_INPUT_KINDS = frozenset({"UserOwned"})


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
class OutputCapacity:
    """What one run of custom code can carry out, and all its approved runs together."""

    names: list[str]  # literal names the code returns: the only ones the site releases
    names_readable: bool  # False: some returned value has no literal name, and is never released
    values_per_run: int
    bits_per_run: int  # values x 64, plus one: whether the run released anything at all
    runs_allowed: int | None
    bits_total: int | None  # None: no limit on runs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestDetail:
    summary: RequestSummary
    code: str
    kind: str  # "site task" or "custom code"
    task: dict[str, Any] | None = None  # name, summary, parameters, source hash, enabled here
    findings: list[Finding] = field(default_factory=list)
    output: OutputCapacity | None = None  # custom code only
    runs: list[dict[str, Any]] = field(default_factory=list)  # outcome and reason of each run, from the audit log

    def to_dict(self) -> dict:
        return {
            **self.summary.to_dict(),
            "code": self.code,
            "kind": self.kind,
            "task": self.task,
            "findings": [f.to_dict() for f in self.findings],
            "output": None if self.output is None else self.output.to_dict(),
            "runs": self.runs,
        }


def _task_description(config: SiteConfig, name: str) -> dict[str, Any]:
    from datasite_setup.site_tasks import TASKS

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
    from datasite_setup.site_tasks import TASKS

    rows = []
    for name in sorted(TASKS):
        described = _task_description(config, name)
        described.pop("source")
        rows.append(described)
    return rows


def privacy_budgets(config: SiteConfig) -> dict[str, Any]:
    """The site's differential-privacy settings and, per data scientist who has spent any, the
    budget spent and left, and the epsilon of the Gaussian releases she has had - noised model
    updates, DP-SGD runs and noised evaluations - RDP-composed (`gaussian_epsilon`), with their
    uses as (noise multiplier, sample rate, count)."""
    from datasite_setup.disclosure import PrivacyBudget, UpdateAccountant

    privacy = config.privacy
    budget = PrivacyBudget(config.data_dir / "privacy_budget.json", privacy.dp_epsilon_budget)
    delta = next((dp.delta for dp in (privacy.update_dp, privacy.sample_dp, privacy.evaluation_dp) if dp is not None), 1e-5)
    accountant = UpdateAccountant.at_site(config.data_dir, delta)
    people = sorted(set((read_json(budget.path) or {}).get("spent", {})) | set((read_json(accountant.path) or {}).get("history", {})))
    return {
        "limit": budget.limit,
        "update_dp": None if privacy.update_dp is None else asdict(privacy.update_dp),
        "sample_dp": None if privacy.sample_dp is None else asdict(privacy.sample_dp),
        "evaluation_dp": None if privacy.evaluation_dp is None else asdict(privacy.evaluation_dp),
        "data_scientists": [{"email": who, "spent": round(budget.spent(who), 6), "remaining": round(budget.limit - budget.spent(who), 6),
                             "gaussian_epsilon": round(accountant.epsilon(who), 6), "gaussian_uses": accountant.history(who)}
                            for who in people],
    }


def _custom_code_problem(config: SiteConfig, code: str) -> str | None:
    """Custom code whose results the site could never release is not worth an approval."""
    returns = read_returns(code)
    if returns is None:
        return "no function could be read from this code"
    if not returns.names_readable:
        return ("it returns values whose names are not string literals in a returned dict literal, and the site "
                "releases only names it can read at review (see the static audit)")
    if len(returns.names) > config.custom_code_max_values:
        return (f"it returns {len(returns.names)} named values and this site releases at most "
                f"{config.custom_code_max_values} per run ([site] custom_code_max_values)")
    return None


def approval_problem(config: SiteConfig, code: str) -> str | None:
    """Why this site must not approve the code, or None. Custom code needs `allow_custom_code`
    and returned names the site can read."""
    thin = parse_thin_request(code)
    if thin is None:
        if config.allow_custom_code:
            return _custom_code_problem(config, code)
        return "this is custom code, and this site allows only site tasks (set allow_custom_code = true to change that)"
    task = _task_description(config, thin.task)
    if not task["installed"]:
        return f"site task '{thin.task}' is not installed at this site"
    if not task["enabled"]:
        return f"site task '{thin.task}' is not enabled at this site ([site] enabled_tasks)"
    return None


def _policy_problem(code: Any) -> str | None:
    """A user-defined policy's class body would run inside the server on approval: only syft's
    built-in policies are approved (the server's door refuses others at submission; this covers
    requests stored before it, or sent by an admin account)."""
    from datasite_setup.server_door import builtin_policies, policy_label

    inputs, outputs = builtin_policies()
    for policy_type, allowed in ((code.input_policy_type, inputs), (code.output_policy_type, outputs)):
        if policy_type not in allowed:
            return (f"it uses the user-defined policy {policy_label(policy_type)}; this site approves only "
                    "syft's built-in policies")
    return None


def _status_name(request: Any) -> str:
    return str(request.status).rsplit(".", 1)[-1].lower()


def _inputs(code: Any) -> dict[str, str]:
    kwargs = next(iter(code.input_policy_init_kwargs.values()), {}) if code.input_policy_init_kwargs else {}
    return {name: type(kind).__name__ if not isinstance(kind, type) else kind.__name__ for name, kind in kwargs.items()}


def _policy_name(policy_type: Any) -> str:
    """A request's policy, named without touching it: a built-in policy is a class; a user-defined
    one (sy.CustomOutputPolicy / UserPolicy) is an object carrying its class's name and code."""
    if policy_type is None:
        return "none"
    if isinstance(policy_type, type):
        return policy_type.__name__
    return f"user-defined {getattr(policy_type, 'class_name', None) or type(policy_type).__name__}"


def _runs_used(code: Any) -> int:
    if not isinstance(code.output_policy_type, type):
        return 0  # a user-defined policy: `code.output_policy` would run its code in this process
    policy = code.output_policy
    if policy is None or not hasattr(policy, "count"):
        return 0
    return int(policy.count())


def _runs_started(config: SiteConfig, code: Any) -> int:
    """Runs started, failed ones included (the site's ledger), or syft's stored outputs if more."""
    return runs_started(config.data_dir, str(code.id.no_dash), _runs_used(code))


def summarise(config: SiteConfig, request: Any) -> RequestSummary:
    code = request.code
    policy_kwargs = {k: v for k, v in (code.output_policy_init_kwargs or {}).items() if k != "id"}
    policy = _policy_name(code.output_policy_type)
    return RequestSummary(
        id=str(request.id.no_dash),
        status=_status_name(request),
        requested_by=str(request.requesting_user_email),
        requested_at=str(request.request_time),
        function=code.service_func_name,
        inputs=_inputs(code),
        output_policy=f"{policy}({', '.join(f'{k}={v}' for k, v in policy_kwargs.items())})",
        runs_used=_runs_started(config, code),
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


def output_capacity(config: SiteConfig, code: str, runs_allowed: int | None) -> OutputCapacity:
    """How many values (and bits) custom code can carry out per run and over its approved runs."""
    returns = read_returns(code)
    names = sorted(returns.names) if returns is not None else []
    values = min(len(names), config.custom_code_max_values)
    bits = values * FLOAT_BITS + 1
    return OutputCapacity(
        names=names, names_readable=returns is not None and returns.names_readable, values_per_run=values,
        bits_per_run=bits, runs_allowed=runs_allowed, bits_total=None if runs_allowed is None else bits * runs_allowed,
    )


def request_runs(config: SiteConfig, code_id: str) -> list[dict[str, Any]]:
    """Each run of one approved code, oldest first, as the audit log recorded it."""
    fields = ("time", "action", "requested_by", "reference", "why", "report", "seconds")
    return [
        {key: entry[key] for key in fields if key in entry}
        for entry in read_audit_log(config)
        if entry.get("code") == code_id
    ]


def show_request(config: SiteConfig, admin: Any, request_id: str) -> RequestDetail:
    request = find_request(admin, request_id)
    code = request.code.raw_code
    summary = summarise(config, request)
    runs = request_runs(config, str(request.code.id.no_dash))
    thin = parse_thin_request(code)
    if thin is None:
        private = None if not summary.inputs else {n for n, kind in summary.inputs.items() if kind not in _OWN_INPUT_KINDS}
        return RequestDetail(
            summary=summary, code=code, kind="custom code", findings=audit_source(code, private),
            output=output_capacity(config, code, summary.runs_allowed), runs=runs,
        )
    return RequestDetail(summary=summary, code=code, kind="site task", task=_task_description(config, thin.task), runs=runs)


def _log_decision(config: SiteConfig, action: str, summary: RequestSummary, **extra: Any) -> None:
    audit_log.append(config.data_dir, {
        "admin": config.admin_email,
        "action": action,
        "request": summary.id,
        "function": summary.function,
        "requested_by": summary.requested_by,
        **extra,
    })


def read_audit_log(config: SiteConfig, reference: str | None = None) -> list[dict[str, Any]]:
    """The site's audit log; with `reference`, only the entry a refusal message quoted."""
    entries = audit_log.read(config.data_dir)
    return entries if reference is None else [e for e in entries if e.get("reference") == reference]


def approve(config: SiteConfig, admin: Any, request_id: str, max_runs: int | None = None) -> RequestSummary:
    """Approve a pending request, optionally capping its runs below what it asked for."""
    import syft as sy

    request = find_request(admin, request_id)
    before = summarise(config, request)
    if before.status != "pending":
        raise ReviewError(f"request {before.id[:8]} is {before.status}, not pending; nothing changed")
    problem = _policy_problem(request.code) or approval_problem(config, request.code.raw_code)
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
