"""How this site runs approved code: site tasks or custom code, always isolated, always checked.

The server entry point installs `install(config)`, which replaces syft 0.9.5's in-process
`execute_byte_code` (imported by `syft.service.action.action_service`) with `execute`:

1. A thin request (`thin_requests`) names an enabled site task; its parameters are checked
   against the task's schema; the task's installed code runs, never the request's own text.
   Anything else is custom code: refused unless `allow_custom_code = true`, then run as written.
2. The code runs in a child process (`isolation`) that receives only its declared inputs.
3. The result is decoded safely and must satisfy the task's output contract (custom code: named
   finite scalars only). An aggregates result is first shape-checked, then passes disclosure
   control (`disclosure.protect`: small groups and bins removed, differential-privacy noise),
   then meets its contract's full check as the last line. A failure or violation becomes a
   refusal the data scientist sees, with no data values and no traceback, and a line in the
   site's audit log.

A request asking for differential privacy is charged against its data scientist's epsilon budget
(`[privacy] dp_epsilon_budget`, kept in data_dir/privacy_budget.json) before anything runs.

syft also runs the function a second time on the mock twin of the inputs; that run returns a
placeholder without executing anything, so the site never spends compute on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from datasite_setup.disclosure import BudgetExhausted, PrivacyBudget, Released, dp_epsilon, protect
from datasite_setup.isolation import Limits, prewarm, run_isolated
from datasite_setup.output_contracts import AggregatesContract, ContractViolation, ScalarsContract
from datasite_setup.site_config import SiteConfig
from datasite_setup.thin_requests import parse_thin_request

MOCK_CASE_PREFIX = "mock-"
MOCK_PLACEHOLDER = {"mock_run": True}

_TASK_HARNESS = '''
def run_task_in_sandbox(task, cases, params, min_cohort):
    from analyses.site_tasks import run_site_task
    return run_site_task(task, cases, params, min_cohort)
'''


class SiteRefusal(Exception):
    """A run the site refused; the message is safe to show to the data scientist."""


def _is_mock_run(kwargs: dict[str, Any]) -> bool:
    case_lists = [v for v in kwargs.values() if isinstance(v, list) and v and all(isinstance(c, dict) and "case_id" in c for c in v)]
    return bool(case_lists) and all(str(c["case_id"]).startswith(MOCK_CASE_PREFIX) for cases in case_lists for c in cases)


def _audit(config: SiteConfig, event: dict[str, Any]) -> None:
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **event}
    with open(config.data_dir / "audit.log", "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def _plan(config: SiteConfig, code: Any, kwargs: dict[str, Any]) -> tuple[str, str, dict[str, Any], Any, str, dict[str, Any]]:
    """What to run for this request: (source, function, kwargs, contract, label, task params)."""
    from analyses.site_tasks import TASKS, SiteFacts

    thin = parse_thin_request(code.raw_code)
    facts = SiteFacts(min_cohort=config.privacy.min_cohort)
    if thin is None:
        if not config.allow_custom_code:
            raise SiteRefusal("custom code is not allowed at this site; request a site task instead")
        return code.parsed_code, code.unique_func_name, kwargs, ScalarsContract(names=None), "custom code", {}
    enabled = TASKS.keys() if config.enabled_tasks is None else config.enabled_tasks
    if thin.task not in TASKS or thin.task not in enabled:
        raise SiteRefusal(f"site task '{thin.task}' is not enabled at this site")
    task = TASKS[thin.task]
    params = kwargs.get("params")
    problems = task.problems(params)
    if problems:
        raise SiteRefusal(f"parameters refused for task '{task.name}': " + "; ".join(problems))
    task_kwargs = {"task": task.name, "cases": kwargs["cases"], "params": params, "min_cohort": facts.min_cohort}
    return _TASK_HARNESS, "run_task_in_sandbox", task_kwargs, task.contract(params, facts), f"task {task.name}", params


def _charge_privacy_budget(config: SiteConfig, params: dict[str, Any], who: str, label: str) -> None:
    epsilon = dp_epsilon(params)
    if epsilon is None:
        return
    budget = PrivacyBudget(config.data_dir / "privacy_budget.json", config.privacy.dp_epsilon_budget)
    try:
        remaining = budget.charge(who, epsilon)
    except BudgetExhausted as exc:
        _audit(config, {"action": "refused-budget", "what": label, "requested_by": who, "dp_epsilon": epsilon})
        raise SiteRefusal(str(exc)) from None
    _audit(config, {"action": "charged-budget", "what": label, "requested_by": who, "dp_epsilon": epsilon,
                    "remaining": round(remaining, 6)})


def run_request(config: SiteConfig, code: Any, kwargs: dict[str, Any], who: str) -> Any:
    """Run one approved request's code (a syft UserCode); return its result or raise SiteRefusal."""
    plan_source, plan_function, plan_kwargs, contract, label, params = _plan(config, code, kwargs)
    _charge_privacy_budget(config, params, who, label)
    outcome = run_isolated(
        plan_source, plan_function, plan_kwargs, Limits(**asdict(config.limits)), forbidden_paths=[config.data_dir],
        warm=config.warm_spares > 0, spares=config.warm_spares,
    )
    if not outcome.ok:
        _audit(config, {"action": "refused-run", "what": label, "requested_by": who, "why": outcome.failure})
        raise SiteRefusal(f"{label} did not complete at the site ({outcome.failure}); the site's admin has the details")
    result, released = outcome.result, Released()
    try:
        if isinstance(contract, AggregatesContract):
            replace(contract, min_cohort=0).check(result)  # the shape `protect` relies on
            result, released = protect(result, params, config.privacy.min_cohort)
        contract.check(result)
    except ContractViolation as exc:
        _audit(config, {"action": "refused-result", "what": label, "requested_by": who, "why": str(exc)})
        raise SiteRefusal(f"result of {label} refused by the site's output contract: {exc}") from None
    _audit(config, {"action": "ran", "what": label, "requested_by": who, "seconds": round(outcome.seconds, 2),
                    **released.audit_fields()})
    return result


def install(config: SiteConfig) -> None:
    """Route every syft user-code execution in this server process through `run_request`, and
    (unless `[execution] warm_spares = 0`) start the first warm children so that the first run
    does not pay for its imports either."""
    from syft.service.action import action_service
    from syft.service.code.user_code import UserCodeExecutionOutput

    def execute(code_item: Any, kwargs: dict[str, Any], context: Any) -> Any:
        if _is_mock_run(kwargs):
            result, errored, message = dict(MOCK_PLACEHOLDER), False, ""
        else:
            who = str(context.credentials)
            try:
                user = context.server.services.user.get_current_user(context=context)
                who = user.email
            except Exception:  # an admin context has no user record to describe; keep the key
                pass
            try:
                result = run_request(config, code_item, dict(kwargs), who)
                errored, message = False, ""
            except SiteRefusal as exc:
                result, errored, message = None, True, str(exc)
        return UserCodeExecutionOutput(
            user_code_id=code_item.id, stdout="", stderr="", result=result, errored=errored, safe_error_message=message
        )

    action_service.execute_byte_code = execute
    if config.warm_spares:
        prewarm(Limits(**asdict(config.limits)), spares=config.warm_spares)
