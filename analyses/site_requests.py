"""Build the thin code requests a data scientist sends to a datasite.

A thin request only names a site task and passes its inputs (see
`datasite_setup.thin_requests`), so the admin approves the site's own installed task code.
Syft refuses two requests with identical code from one user, so each request's function gets a
unique name (`<task>_<label>`); the body never changes.
"""

from __future__ import annotations

import linecache
import re
from typing import Any

from datasite_setup.array_texts import arrays_printed_by_shape

_TEMPLATE = '''def {name}(cases, params):
    return site_task("{task}", cases, params)
'''


def function_name(task: str, label: str) -> str:
    """The syft function name of the thin request for `task` under `label` (stable across runs)."""
    return re.sub(r"\W", "_", f"{task}_{label}")


def thin_function(task: str, label: str) -> Any:
    """A plain function with the thin-request shape whose source `inspect.getsource` can read."""
    name = function_name(task, label)
    source = _TEMPLATE.format(name=name, task=task)
    filename = f"<site-request {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)  # nosec: a fixed template with a checked name
    return namespace[name]


def request_site_task(client: Any, asset: Any, task: str, label: str, max_runs: int) -> Any:
    """Submit a thin request for `task` on `asset`, runnable `max_runs` times once approved."""
    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    from datasite_setup.connection import quiet_syft

    func = thin_function(task, label)
    with quiet_syft():
        code = sy.syft_function(
            input_policy=sy.MixedInputPolicy(cases=asset, params=dict, client=client),
            output_policy=OutputPolicyExecuteCount(limit=max_runs),
        )(func)
        request = client.code.request_code_execution(code)
    if isinstance(request, sy.SyftError):
        raise RuntimeError(f"request for site task '{task}' was not accepted: {request.message}")
    return request


def call_site_task(client: Any, asset: Any, task: str, label: str, params: dict[str, Any]) -> Any:
    """Run an approved thin request and return its result (raises with the site's reason)."""
    import syft as sy

    name = function_name(task, label)
    with arrays_printed_by_shape():
        result = getattr(client.code, name)(cases=asset, params=params)
        if isinstance(result, sy.SyftError):
            raise RuntimeError(result.message)
        value = result.get() if hasattr(result, "get") else result
    if isinstance(value, sy.SyftError):
        raise RuntimeError(value.message)
    return value


def request_status(client: Any, task: str, label: str) -> str | None:
    """"approved", "pending" or "rejected" for this data scientist's request, or None if never sent."""
    from datasite_setup.connection import quiet_syft

    name = function_name(task, label)
    with quiet_syft():
        requests = client.requests.get_all()
    found = [r for r in requests if getattr(r.code, "service_func_name", None) == name]
    if not found:
        return None
    return str(found[-1].status).rsplit(".", 1)[-1].lower()


def ensure_request(client: Any, asset: Any, task: str, label: str, max_runs: int) -> str:
    """Send the request unless it exists; return its status (a rerun never asks twice)."""
    status = request_status(client, task, label)
    if status is None:
        request_site_task(client, asset, task, label, max_runs)
        status = request_status(client, task, label) or "pending"
    return status

