"""How a failed run is named: by builtin exception type, or by the limit it ran into.

Messages and tracebacks can carry private values, and a user-defined exception's *name* could
too, so the child reports the nearest builtin type and the parent accepts only these names.
"""

from __future__ import annotations

import builtins
import errno

# Builtin exception classes as they were before any untrusted code ran; a reported type name is
# always one of these, so the name itself cannot carry data.
BUILTIN_EXCEPTIONS = {
    name: cls for name, cls in vars(builtins).items() if isinstance(cls, type) and issubclass(cls, BaseException)
}
# The result would not encode / was larger than the run's max_result_mb / an open ran into max_open_files.
LIMIT_ERRORS = frozenset({"CodecError", "ResultTooLarge", "TooManyOpenFiles"})
REPORTED_ERRORS = frozenset(BUILTIN_EXCEPTIONS) | LIMIT_ERRORS


def error_type(exc: BaseException) -> str:
    """The nearest builtin exception type of `exc`; allocation failures from native code count as
    MemoryError, an open refused by RLIMIT_NOFILE as TooManyOpenFiles."""
    for cls in type(exc).__mro__:
        if BUILTIN_EXCEPTIONS.get(getattr(cls, "__name__", "")) is cls:
            name = cls.__name__
            break
    else:
        name = "BaseException"
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == errno.EMFILE:
        return "TooManyOpenFiles"
    if name == "RuntimeError":
        try:
            message = str(exc)
        except Exception:
            message = ""
        if "can't allocate memory" in message or "bad_alloc" in message or "DefaultCPUAllocator" in message:
            return "MemoryError"
    return name
