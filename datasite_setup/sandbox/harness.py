"""Runs the approved function and turns what happened into its result frame; never lets an exception's text out."""

from __future__ import annotations

import builtins
import io
import sys
from typing import Any

from datasite_setup.sandbox.error_names import error_type
from datasite_setup.sandbox.frames import STDOUT_LIMIT, frame


class _CappedText(io.TextIOBase):
    """Stands in for sys.stdout: keeps the first `limit` characters, so prints do not grow without bound."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = self.limit - self.kept
        piece = str(s)[: max(room, 0)]
        self.parts.append(piece)
        self.kept += len(piece)
        self.dropped = self.dropped or len(piece) < len(s)
        return len(s)

    def text(self) -> str:
        return "".join(self.parts) + ("\n[output truncated]" if self.dropped else "")


def _call(payload: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    namespace: dict[str, Any] = {"__name__": "__approved_code__", "__builtins__": builtins}
    exec(compile(payload["source"], "<approved code>", "exec"), namespace)
    return namespace[payload["function"]](**kwargs)


def _restore(pristine: dict[str, Any], stdout: Any, stderr: Any) -> None:
    """Undo what the code may have rebound: builtins, and sys.stdout/stderr (so a failure in the
    child's own reporting still shows in the parent's stderr tail)."""
    sys.stdout, sys.stderr = stdout, stderr
    namespace = vars(builtins)
    namespace.clear()
    namespace.update(pristine)


def run(payload: dict[str, Any], kwargs: dict[str, Any]) -> bytes:
    """Run the function and return its result frame. What the code does can change this frame;
    that is why the parent believes of it only what the code could have returned anyway."""
    from datasite_setup.result_codec import CodecError

    captured = _CappedText(STDOUT_LIMIT)
    real_stdout, real_stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = captured, _CappedText(0)
    max_bytes = payload["max_result_bytes"]

    def outcome(ok: bool, result: Any = None, error: str | None = None) -> bytes:
        return frame({"ok": ok, "result": result, "error_type": error, "stdout": captured.text()}, max_bytes)

    pristine = dict(vars(builtins))
    try:
        value = _call(payload, kwargs)
    except BaseException as exc:  # noqa: BLE001 - untrusted code may raise anything, SystemExit included
        _restore(pristine, real_stdout, real_stderr)
        return outcome(False, error=error_type(exc))
    _restore(pristine, real_stdout, real_stderr)
    try:
        return outcome(True, value)
    except CodecError as exc:
        error = "ResultTooLarge" if f"exceeds {max_bytes} bytes" in str(exc) else "CodecError"
    except BaseException as exc:  # noqa: BLE001 - the value's own methods run during encoding
        error = error_type(exc)
    del value
    return outcome(False, error=error)
