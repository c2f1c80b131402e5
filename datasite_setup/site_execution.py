"""How this site runs approved code: site tasks or custom code, always isolated, always checked.

The server entry point installs `install(config)`, which replaces syft 0.9.5's in-process
`execute_byte_code` (imported by `syft.service.action.action_service`) with `execute`:

1. A thin request (`thin_requests`) names an enabled site task; its parameters are checked
   against the task's schema; the task's installed code runs, never the request's own text.
   Anything else is custom code: refused unless `allow_custom_code = true`, then run as written.
2. The code runs in a child process (`isolation`) that receives only its declared inputs. An
   input that is a case-store manifest (the asset ingestion publishes: a collection and version,
   whose entries the site reads from its own manifest database) arrives as a `CaseSource`:
   the child reads each case from `data_dir/case_store` when the code asks for it, and may read
   nothing else of `data_dir`; no dataset is copied across the process boundary. The audit line
   of the run names the manifest version it used.
3. The result is decoded safely and must satisfy the task's output contract (custom code: at
   most `custom_code_max_values` finite floats, under the literal names its return statements
   declare, as shown at review). A site task's run also says, privately, which cases entered
   each part of its result (or why it declined); that record is stripped here. An aggregates
   result is first shape-checked, then passes the site's disclosure filters (`disclosure`: small
   groups and bins removed, differential-privacy noise), then meets its contract's full check,
   and last the release ledger (data_dir/release_ledger.json) refuses it if, with what its data
   scientist was released before, it would single out fewer than `min_cohort` cases. A failure,
   violation or such refusal becomes one uniform refusal for the data scientist, quoting a
   reference, and a line in the site's audit log with the real reason (`run_failures`) under
   that reference.

A request asking for differential privacy is charged against its data scientist's epsilon budget
(`[privacy] dp_epsilon_budget`, kept in data_dir/privacy_budget.json) before anything runs. At a
site with `[privacy.update_dp]`, every model update (a weights-contract result) is a differentially
private release whatever the request asks: one more release is charged to the budget before the
run (its epsilon composed with the earlier ones, `disclosure.update_accountant`), and the update
leaves clipped and noised (`disclosure.update_noise`), its training loss withheld. At a site with
`[privacy.sample_dp]` every training run is DP-SGD (`site_tasks.dp_sgd`); its sampling rate and
steps are known after the run, so it is charged then, and its weights leave only if that fits. At a
site with `[privacy.evaluation_dp]` every `evaluate` is charged before it runs and leaves with its
counts noised (`disclosure.evaluation_noise`): the model it scores is a query of the data
scientist's choosing on the site's labels.

syft also runs the function a second time on the mock twin of the inputs; that run returns a
placeholder without executing anything, so the site never spends compute on it.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from datasite_setup import audit_log
from datasite_setup.case_store import STORE_DIR, CaseSource, cases_of_manifest
from datasite_setup.disclosure import (
    DP_SCALARS, NOISE_SCALAR, BudgetExhausted, Policy, PrivacyBudget, Released, ReleaseRefused, SampleNoiseMismatch,
    UpdateAccountant, dp_epsilon, evaluation_noise_problem, read_task_release, update_noise_problems,
)
from datasite_setup.isolation import Limits, run_isolated, start_fork_server
from datasite_setup.output_contracts import AggregatesContract, ContractViolation, ScalarsContract, WeightsContract
from datasite_setup.return_flow import read_returns
from datasite_setup.secure_aggregation.keys import SiteKeys
from datasite_setup.secure_aggregation.masks import EncodingRange
from datasite_setup.secure_aggregation.release import SESSION_PARAM, masked_update, session_problem
from datasite_setup.secure_aggregation.sessions import SessionLedger, SessionRefused
from datasite_setup.run_failures import failure_reason, failure_report, reporting
from datasite_setup.site_config import SiteConfig
from datasite_setup.thin_requests import parse_thin_request
from domains.case_manifest import is_manifest, read_manifest
from domains.case_record import is_mock_case

MOCK_PLACEHOLDER = {"mock_run": True}
EVALUATE = "evaluate"  # the site task whose results `[privacy.evaluation_dp]` noises

_TASK_FUNCTION = "run_task_in_sandbox"
_TASK_HARNESS = f'''
def {_TASK_FUNCTION}(task, cases, params, min_cohort, min_batch, sample_dp):
    from datasite_setup.site_tasks import run_for_parent
    return run_for_parent(task, cases, params, min_cohort, min_batch, sample_dp)
'''


WITHHELD = "{label} did not complete at the site with a result it can release; the site's admin can see why (reference {reference})"


class SiteRefusal(Exception):
    """A run the site refused; the message is safe to show to the data scientist.

    A refusal decided from the request alone (custom code, task, parameters, budgets) says why.
    One that depends on what the code did with the data (it raised, hit a limit, was stopped by
    the sandbox, or returned what its contract refuses) reads the same whatever happened
    (`withheld`): an exception's type or the rule a result broke would carry a few bits per run.
    The reason goes to the audit log under the reference the message quotes.
    """

    @classmethod
    def withheld(cls, config: SiteConfig, label: str, event: dict[str, Any]) -> SiteRefusal:
        reference = secrets.token_hex(4)
        _audit(config, {**event, "reference": reference})
        return cls(WITHHELD.format(label=label, reference=reference))


def _with_case_sources(config: SiteConfig, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Path], int | None]:
    """The run's inputs with each case manifest (the asset `upload` publishes) turned into a lazy
    `CaseSource` over the site's case store, the paths the sandbox must be granted for that, and
    the manifest version the run uses."""
    root = config.data_dir / STORE_DIR
    converted, versions = {}, []
    for key, value in kwargs.items():
        if is_manifest(value):
            converted[key], version = cases_of_manifest(root, value)
            versions.append(version)
        else:
            converted[key] = value
    return converted, ([root] if versions else []), (max(versions) if versions else None)


def _case_list(value: Any) -> list[dict[str, Any]] | None:
    """The cases an input names, as dicts with their case ids (a manifest's entries or case records)."""
    if isinstance(value, CaseSource):
        return [{"case_id": entry.case_id} for entry in value.entries]
    if is_manifest(value):
        return read_manifest(value).get("cases")
    if isinstance(value, list) and value and all(isinstance(c, dict) and "case_id" in c for c in value):
        return value
    return None


def _is_mock_run(kwargs: dict[str, Any]) -> bool:
    case_lists = [cases for cases in map(_case_list, kwargs.values()) if cases]
    return bool(case_lists) and all(is_mock_case(c) for cases in case_lists for c in cases)


def _audit(config: SiteConfig, event: dict[str, Any]) -> None:
    audit_log.append(config.data_dir, event)


def _code_id(code: Any) -> str | None:
    """The approved code's id, by which `datasite-admin show` lists a request's runs (None for a
    code object that carries none)."""
    uid = getattr(code, "id", None)
    return None if uid is None else str(uid.no_dash)


def _site_keys(config: SiteConfig) -> SiteKeys:
    from datasite_setup.credentials import secure_aggregation_seed

    return SiteKeys(config.name, secure_aggregation_seed(config))


def _secure_aggregation_problem(config: SiteConfig, params: dict[str, Any], who: str) -> str | None:
    """What this site refuses about a training request's secure-aggregation session (or its lack)."""
    settings = config.secure_aggregation
    if SESSION_PARAM not in params:
        if settings is not None and settings.required:
            return ("this site releases model updates only masked for secure aggregation; send the request in a "
                    "session (federate train --secure-aggregation)")
        return None
    if settings is None:
        return "this site does not take part in secure aggregation; send the request without 'secure_aggregation'"
    return session_problem(params[SESSION_PARAM], settings, _site_keys(config), who, params["weights"],
                           SessionLedger.at_site(config.data_dir))


def _task_at_parent(config: SiteConfig, code: Any) -> Any:
    """The enabled site task this request names, if the site's parent process answers it."""
    from datasite_setup.site_tasks import TASKS

    thin = parse_thin_request(code.raw_code)
    task = TASKS.get(thin.task) if thin is not None and _enabled(config, thin.task) else None
    return task if task is not None and task.at_parent is not None else None


def _enabled(config: SiteConfig, name: str) -> bool:
    """Whether this site runs the installed task `name` (`[site] enabled_tasks`, default all)."""
    from datasite_setup.site_tasks import TASKS

    return name in TASKS and (config.enabled_tasks is None or name in config.enabled_tasks)


def _answer_at_parent(config: SiteConfig, task: Any, params: Any, who: str, code: Any) -> Any:
    """A task that reads no case (a session key), answered here from the site's secrets."""
    from datasite_setup.site_tasks import ParentFacts

    problems = task.problems(params)
    if problems:
        raise SiteRefusal(f"parameters refused for task '{task.name}': " + "; ".join(problems))
    if config.secure_aggregation is None:
        raise SiteRefusal("this site does not take part in secure aggregation ([secure_aggregation] is not set)")
    answer = task.at_parent(params, ParentFacts(who=who, keys=_site_keys(config)))
    _audit(config, {"action": "ran", "what": f"task {task.name}", "code": _code_id(code), "requested_by": who,
                    "session": params.get("session")})
    return answer


def _plan(config: SiteConfig, code: Any, kwargs: dict[str, Any], who: str) -> tuple[str, str, dict[str, Any], Any, str, dict[str, Any]]:
    """What to run for this request: (source, function, kwargs, contract, label, task params)."""
    from datasite_setup.site_tasks import TASKS, SiteFacts

    thin = parse_thin_request(code.raw_code)
    sample_dp = config.privacy.sample_dp
    facts = SiteFacts(config.privacy.min_cohort, config.privacy.min_batch, None if sample_dp is None else tuple(sample_dp.for_task()))
    if thin is None:
        if not config.allow_custom_code:
            raise SiteRefusal("custom code is not allowed at this site; request a site task instead")
        returns = read_returns(code.raw_code)
        names = frozenset() if returns is None else returns.names  # the names shown at review, and only those
        contract = ScalarsContract(names=names, max_items=config.custom_code_max_values)
        return code.parsed_code, code.unique_func_name, kwargs, contract, "custom code", {}
    if not _enabled(config, thin.task):
        raise SiteRefusal(f"site task '{thin.task}' is not enabled at this site")
    task = TASKS[thin.task]
    params = kwargs.get("params")
    problems = task.problems(params, facts)
    if not problems and (issue := update_noise_problems(params, config.privacy.update_dp)):
        problems = [issue]
    if not problems and task.name == EVALUATE and config.privacy.evaluation_dp is not None:
        from domains import get_domain

        if issue := evaluation_noise_problem(get_domain(params["domain"])):
            problems = [issue]
    contract = None if problems else task.contract(params, facts)
    if isinstance(contract, WeightsContract) and (issue := _secure_aggregation_problem(config, params, who)):
        problems = [issue]
    if problems:
        raise SiteRefusal(f"parameters refused for task '{task.name}': " + "; ".join(problems))
    task_kwargs = {"task": task.name, "cases": kwargs["cases"], "params": params, "min_cohort": facts.min_cohort,
                   "min_batch": facts.min_batch, "sample_dp": None if sample_dp is None else sample_dp.for_task()}
    return _TASK_HARNESS, _TASK_FUNCTION, task_kwargs, contract, f"task {task.name}", params


def _budget(config: SiteConfig) -> PrivacyBudget:
    return PrivacyBudget(config.data_dir / "privacy_budget.json", config.privacy.dp_epsilon_budget)


def _charge_privacy_budget(config: SiteConfig, params: dict[str, Any], who: str, label: str) -> None:
    epsilon = dp_epsilon(params)
    if epsilon is None:
        return
    if "noise" not in config.privacy.filters:
        raise SiteRefusal("this site does not offer differentially private releases; send the request without 'dp'")
    budget = _budget(config)
    try:
        remaining = budget.charge(who, epsilon)
    except BudgetExhausted as exc:
        _audit(config, {"action": "refused-budget", "what": label, "requested_by": who, "dp_epsilon": epsilon})
        raise SiteRefusal(str(exc)) from None
    _audit(config, {"action": "charged-budget", "what": label, "requested_by": who, "dp_epsilon": epsilon,
                    "remaining": round(remaining, 6)})


def _charge_training(config: SiteConfig, who: str, label: str, uses: list[tuple[float, float, int]], delta: float,
                     kind: str = "update_dp") -> float:
    """Charge a model update's (or, `kind` "evaluation_dp", an evaluation's) uses of the Gaussian
    mechanism to `who`'s budget (RDP-composed with the earlier ones); return their epsilon."""
    accountant = UpdateAccountant.at_site(config.data_dir, delta)
    budget = _budget(config)
    try:
        epsilon = accountant.charge(who, uses, budget)
    except BudgetExhausted as exc:
        _audit(config, {"action": "refused-budget", "what": label, "requested_by": who, kind: True})
        raise SiteRefusal(str(exc)) from None
    _audit(config, {"action": "charged-budget", "what": label, "requested_by": who, "dp_epsilon": round(epsilon, 6),
                    kind: True, "remaining": round(budget.limit - budget.spent(who), 6)})
    return epsilon


def _own_inputs(code: Any) -> frozenset[str]:
    """The inputs a request declares as the data scientist's own (syft's `UserOwned`), as opposed to
    the site's assets, which only the admin uploads."""
    declared = next(iter((getattr(code, "input_policy_init_kwargs", None) or {}).values()), {})
    return frozenset(name for name, kind in declared.items()
                     if (kind if isinstance(kind, type) else type(kind)).__name__ == "UserOwned")


def run_request(config: SiteConfig, code: Any, kwargs: dict[str, Any], who: str) -> Any:
    """Run one approved request's code (a syft UserCode); return its result or raise SiteRefusal.

    Only an asset of this site is read as a case manifest: a manifest passed as the data
    scientist's own input (her copy of a reference naming a collection and version, or a document
    listing case ids) would otherwise have the site read the cases it names, whatever dataset
    the request was approved on."""
    forged = sorted(name for name in _own_inputs(code) if is_manifest(kwargs.get(name)))
    if forged:
        raise SiteRefusal.withheld(config, "the request", {
            "action": "refused-run", "code": _code_id(code), "requested_by": who,
            "why": f"input {', '.join(forged)} is a case manifest the data scientist passed herself, not a dataset of this site",
        })
    parent_task = _task_at_parent(config, code)
    if parent_task is not None:
        return _answer_at_parent(config, parent_task, kwargs.get("params"), who, code)
    plan_source, plan_function, plan_kwargs, contract, label, params = _plan(config, code, kwargs, who)
    _charge_privacy_budget(config, params, who, label)
    trains = isinstance(contract, WeightsContract)
    update_dp = config.privacy.update_dp if trains else None
    sample_dp = config.privacy.sample_dp if trains else None
    evaluation_dp = config.privacy.evaluation_dp if label == f"task {EVALUATE}" else None
    update_epsilon = evaluation_epsilon = None
    if update_dp is not None:
        update_epsilon = _charge_training(config, who, label, [(update_dp.release_multiplier(), 1.0, 1)], update_dp.delta)
    if evaluation_dp is not None:
        evaluation_epsilon = _charge_training(config, who, label, [(evaluation_dp.noise_multiplier, 1.0, 1)],
                                              evaluation_dp.delta, kind="evaluation_dp")
    run_source, run_function = reporting(plan_source, plan_function)
    run_kwargs, granted, manifest_version = _with_case_sources(config, plan_kwargs)
    outcome = run_isolated(
        run_source, run_function, run_kwargs, Limits(**asdict(config.limits)), forbidden_paths=[config.data_dir],
        granted_paths=granted, warm=config.fork_server,
    )
    about = {"what": label, "code": _code_id(code), "requested_by": who}
    if isinstance(params, dict) and isinstance(params.get("widths"), dict):
        about["widths"] = params["widths"]  # the model size released (FedMA), checked against the domain's range
    if manifest_version is not None:
        about["manifest_version"] = manifest_version
    if not outcome.ok:
        raise SiteRefusal.withheld(config, label, {
            "action": "refused-run", **about, "why": failure_reason(outcome, config.limits),
            "failure": outcome.failure, "report": failure_report(outcome), "seconds": round(outcome.seconds, 2),
        })
    policy = Policy.for_site(config.privacy.min_cohort, config.privacy.filters, config.data_dir)
    result, cohorts, released = outcome.result, [], Released()
    try:
        if plan_function == _TASK_FUNCTION:
            result, cohorts = read_task_release(result, _case_list(run_kwargs["cases"]) or [])
        if isinstance(contract, AggregatesContract):
            replace(contract, min_cohort=0).check(result)  # the shape the filters rely on
            result, released = policy.protect(result, params, cohorts)
        contract.check(result)
        policy.record(who, result, cohorts, released)
        if evaluation_dp is not None:
            from domains import get_domain

            domain = get_domain(params["domain"])
            result = evaluation_dp.protect(result, domain.evaluation_bounds, domain.metrics_from_counts)
            contract = replace(contract, names=contract.names | {NOISE_SCALAR}, max_items=contract.max_items + 1)
            contract.check(result)
        if update_dp is not None:
            result = update_dp.protect(result, params["weights"], float(params.get("dp_clip", update_dp.clip_norm)))
        if sample_dp is not None:
            update_epsilon = _charge_training(config, who, label, sample_dp.uses(result["scalars"]), sample_dp.delta)
            result = sample_dp.released(result)
        if update_epsilon is not None:
            result["scalars"].update(dp_epsilon_round=update_epsilon, dp_epsilon_spent=_budget(config).spent(who))
            replace(contract, scalar_names=contract.scalar_names | DP_SCALARS).check(result)
        if trains and SESSION_PARAM in params:
            result = masked_update(result, params["weights"], params[SESSION_PARAM], config.secure_aggregation,
                                   _site_keys(config), who, SessionLedger.at_site(config.data_dir))
            about["secure_aggregation"] = params[SESSION_PARAM]["session"]
    except SessionRefused as exc:
        raise SiteRefusal(str(exc)) from None
    except (ContractViolation, SampleNoiseMismatch, EncodingRange) as exc:
        raise SiteRefusal.withheld(config, label, {
            "action": "refused-result", **about, "why": f"output contract: {exc}", "seconds": round(outcome.seconds, 2),
        }) from None
    except ReleaseRefused as exc:
        raise SiteRefusal.withheld(config, label, {
            "action": "refused-release", **about, "why": f"disclosure control: {exc.reason}",
            "seconds": round(outcome.seconds, 2),
        }) from None
    if isinstance(contract, ScalarsContract):
        result = contract.as_floats(result)
    if update_dp is not None:
        about.update(dp_clip=result["scalars"]["dp_clip"], dp_noise_std=result["scalars"]["dp_noise_std"])
    if sample_dp is not None:
        about.update(dp_sample_rate=result["scalars"]["dp_sample_rate"], dp_steps=result["scalars"]["steps"])
    if update_epsilon is not None:
        about["update_dp_epsilon"] = round(update_epsilon, 6)
    if evaluation_epsilon is not None:
        about["evaluation_dp_epsilon"] = round(evaluation_epsilon, 6)
    _audit(config, {"action": "ran", **about, "seconds": round(outcome.seconds, 2), "peak_rss_mb": outcome.peak_rss_mb,
                    "cpu_seconds": outcome.cpu_seconds, **released.audit_fields()})
    return result


def install(config: SiteConfig) -> None:
    """Route every syft user-code execution in this server process through `run_request`, and
    (unless `[execution] fork_server = false`) start the fork server, so that the first run does
    not pay for its imports either."""
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
            except Exception as exc:  # a fault in the site's own checks; its text may quote data
                refusal = SiteRefusal.withheld(config, "the request", {
                    "action": "refused-run", "code": _code_id(code_item), "requested_by": who,
                    "why": f"site error {type(exc).__name__}: {exc}",
                })
                result, errored, message = None, True, str(refusal)
        return UserCodeExecutionOutput(
            user_code_id=code_item.id, stdout="", stderr="", result=result, errored=errored, safe_error_message=message
        )

    action_service.execute_byte_code = execute
    if config.fork_server:
        start_fork_server()
