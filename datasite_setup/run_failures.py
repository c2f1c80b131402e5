"""Why an approved run failed, told to the site's admin (and to nobody else).

The sandboxed child reports a failure to the server only as a builtin exception type, so that
nothing the code computed can ride on it; that left the admin with `error:Exception` and no way
to help. `reporting` wraps the function to run so that, on an exception, the child also writes the
exception's message and traceback to its own stderr, which the server keeps for its logs and
never forwards (`IsolatedOutcome.stderr_tail`). `failure_reason` and `failure_report` turn an
outcome into the reason and report written to the audit log. The report is text the code could
influence: it is for the admin's eyes, as the data it may quote is.
"""

from __future__ import annotations

from datasite_setup.isolation import IsolatedOutcome
from datasite_setup.site_config import ExecutionLimits

MARKER = "--- approved run failed ---"
REPORT_CHARS = 4000
RUNNER = "run_reporting_failures"

_RUNNER_SOURCE = '''

def run_reporting_failures(**kwargs):
    try:
        return {function}(**kwargs)
    except BaseException as exc:
        import os
        import traceback

        try:
            report = "".join(traceback.format_exception(exc))[-{chars}:]
            os.write(2, ("\\n{marker}\\n" + report).encode("utf-8", "replace"))
        except BaseException:
            pass
        raise
'''


def reporting(source: str, function: str) -> tuple[str, str]:
    """`source` with a runner appended that calls `function` and reports its exception: (source, runner)."""
    if not function.isidentifier():
        raise ValueError(f"not a function name: {function!r}")
    return source + _RUNNER_SOURCE.format(function=function, chars=REPORT_CHARS, marker=MARKER), RUNNER


def failure_reason(outcome: IsolatedOutcome, limits: ExecutionLimits) -> str:
    """One line saying which limit, refusal or exception ended the run."""
    failure = outcome.failure or "crashed"
    kind, _, detail = failure.partition(":")
    if kind == "refused":
        return f"the sandbox refused {detail} (the code tried something the site does not allow)"
    if failure == "error:CodecError":
        return "the code returned a value the result codec cannot carry (plain data only: numbers, numeric arrays, strings, lists, str-keyed dicts)"
    if kind == "error":
        return f"the code raised {detail}"
    return {
        "timeout": f"stopped at the wall-clock limit of {limits.wall_seconds:g} s ([execution] wall_seconds)",
        "cpu": f"stopped at the CPU-time limit of {limits.cpu_seconds} s ([execution] cpu_seconds)",
        "memory": f"ran out of memory (limit {limits.memory_mb} MB, [execution] memory_mb)",
        "threads": f"started more than {limits.max_threads} threads ([execution] max_threads)",
        "open-files": f"opened more than {limits.max_open_files} files ([execution] max_open_files)",
        "result-size": f"returned more than {limits.max_result_mb} MB ([execution] max_result_mb)",
        "crashed": "the sandboxed child died without a result (crash, or a confinement layer unavailable)",
    }.get(kind, failure)


def failure_report(outcome: IsolatedOutcome) -> str:
    """The exception and traceback the run reported, else the end of the child's stderr."""
    tail = outcome.stderr_tail
    if MARKER in tail:
        return tail.rsplit(MARKER, 1)[1].strip()
    return tail.strip()[-REPORT_CHARS:]
